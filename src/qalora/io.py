"""File helpers: atomic output folders, hashing (once per command: :class:`FileCache`), strict JSON reading."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


# Files of a folder that ``AutoTokenizer.from_pretrained`` may read (by name prefix).
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template", "config.json")


def file_key(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """A file's identity on disk: ``(device, inode, size, mtime_ns)``. It survives a rename (every
    qalora output is written to a temporary name, then renamed); any rewrite changes it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class FileCache:
    """What one command has already read and verified, so that it hashes each file once, loads
    each tokenizer once and reads each checkpoint's tensors from disk once.

    Entries are keyed by :func:`file_key` (not by path), so a file renamed into place keeps its
    entry and a file rewritten or replaced gets a new one: nothing stale is served. Explicit, not
    global: a command (``qalora pipeline``, a reproduction) creates one and passes it to the
    stages it runs; every function that takes ``files=None`` behaves as before without one.

    * ``sha256(path)`` — the file's SHA-256, computed on first use (or recorded by ``remember``
      when the command wrote the file itself and hashed it then).
    * ``tokenizer(folder, load)`` — ``load(folder)`` once per distinct tokenizer *content* (the
      SHA-256 of every tokenizer file), so identical copies beside several checkpoints share one.
    * ``tensors(path, read)`` — ``read(path)`` (a verified, memory-mapped state dict) once per
      file; each call gets its own tensor objects over the same storage (a caller rebinding a
      parameter's ``.data`` does not touch another model's).
    """

    def __init__(self) -> None:
        self._sha: dict[tuple, str] = {}
        self._tokenizers: dict[tuple, object] = {}
        self._tensors: dict[tuple, dict] = {}

    def sha256(self, path: str | os.PathLike) -> str:
        key = file_key(path)
        if key not in self._sha:
            self._sha[key] = sha256_file(path)
        return self._sha[key]

    def remember(self, path: str | os.PathLike, digest: str) -> None:
        """Record ``digest`` as the SHA-256 of ``path`` (just written and hashed by this command)."""
        self._sha[file_key(path)] = digest

    def tokenizer(self, folder: str | os.PathLike, load: Callable):
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(TOKENIZER_FILES))
        key = tuple((p.name, self.sha256(p)) for p in files)
        if not key or key not in self._tokenizers:
            tok = load(folder)
            if not key:
                return tok
            self._tokenizers[key] = tok
        return self._tokenizers[key]

    def tensors(self, path: str | os.PathLike, read: Callable) -> dict:
        key = file_key(path)
        if key not in self._tensors:
            self._tensors[key] = read(path)
        return {name: t.detach() for name, t in self._tensors[key].items()}

    def counts(self) -> dict[str, int]:
        """How many files were hashed, tokenizers loaded and tensor files read (for reports/tests)."""
        return {"hashed": len(self._sha), "tokenizers": len(self._tokenizers), "tensor_files": len(self._tensors)}


def model_fingerprint(folder: str | os.PathLike, files: "FileCache | None" = None) -> str:
    """SHA-256 over the weight files of a Hugging Face model folder (their names and each file's
    SHA-256, sorted by name: ``*.safetensors``, else ``*.bin``): what a quantized checkpoint or an
    adapter records as the full-precision model it was made from."""
    folder = Path(folder)
    h = hashlib.sha256()
    weight_files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weight_files:
        raise QaloraError(f"model folder {str(folder)!r} has no weight files")
    for f in weight_files:
        h.update(f.name.encode())
        h.update((files.sha256(f) if files is not None else sha256_file(f)).encode())
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


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text)


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


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a sibling ``.<name>.lock`` file) for the
    block, so that processes which read, merge and rewrite one report do so one at a time
    (``fcntl.flock``; released when the block ends or the process dies)."""
    path = Path(path)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
