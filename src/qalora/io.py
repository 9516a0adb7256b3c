"""File helpers: atomic output folders, hashing, strict JSON reading."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qalora.errors import QaloraError


def check_new_output(out: str | os.PathLike) -> Path:
    """Refuse an output path that already exists (nothing is ever overwritten)."""
    path = Path(out).expanduser()
    if path.exists():
        raise QaloraError(f"output {str(path)!r} already exists; choose a new path or remove it first")
    if not path.parent.exists():
        raise QaloraError(f"the parent folder of output {str(path)!r} does not exist")
    return path


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``out``, on error delete it.

    A crash or error never leaves a half-written ``out`` behind.
    """
    path = check_new_output(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling path of ``out`` (already checked new); on success it becomes
    ``out`` (mode 0644), on error it is deleted: a half-written ``out`` never appears."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 over the weight files of a Hugging Face model folder (their names and each file's
    SHA-256, sorted by name: ``*.safetensors``, else ``*.bin``): what a quantized checkpoint or an
    adapter records as the full-precision model it was made from."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise QaloraError(f"model folder {str(folder)!r} has no weight files")
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def is_sha256(value) -> bool:
    """Whether ``value`` is a SHA-256 hex digest (64 lower-case hex characters)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def work_dir(out: str | os.PathLike) -> Path:
    """The folder of a resumable multi-stage run (``--out``): created when missing (its parent
    must exist), reused when present; a file in the way is refused."""
    root = Path(out).expanduser()
    if root.exists() and not root.is_dir():
        raise QaloraError(f"--out {str(root)!r} exists and is not a folder")
    if not root.parent.is_dir():
        raise QaloraError(f"the parent folder of --out {str(root)!r} does not exist")
    root.mkdir(exist_ok=True)
    return root


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary sibling renamed over it), so a
    reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON object, turning a missing or malformed file into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise QaloraError(f"{what} {str(path)!r} is missing")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QaloraError(f"{what} {str(path)!r} is corrupt ({e.__class__.__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise QaloraError(f"{what} {str(path)!r} is corrupt (expected a JSON object)")
    return obj
