"""The pipeline's export stage: the merged model written for each runtime asked for.

    out/model.gguf        llama.cpp (``qalora export --format gguf``), Q4_1 blocks
    out/model.gguf.json   its record
    out/model-mlx/        mlx-lm (``qalora export --format mlx``), MLX affine layers
    out/model-mlx.json    its record

A record holds what the export was made from (the merged weights' SHA-256), its options and the
SHA-256 of every file written. A rerun reuses an export only when the record names the same
checkpoint and options and every file still has its recorded digest; anything else is refused in
one line (delete the export or choose another ``--out``), never overwritten.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from qalora.errors import QaloraError
from qalora.io import read_json, sha256_file, write_json
from qalora.stages.identity import require_same


@dataclass(frozen=True)
class ExportFormat:
    """One runtime the pipeline can write: ``target(root)`` is the file or folder, ``options`` the
    exporter's keyword options (recorded), ``run(merged, target, options, progress)`` writes it."""

    name: str
    runtime: str
    target: Callable[[Path], Path]
    options: tuple
    run: Callable[..., dict]  # (merged, target, options, progress, files) -> report


def _gguf(merged: Path, target: Path, options: dict, progress: bool, files=None) -> dict:
    from qalora.export.gguf import export_gguf

    return export_gguf(merged, target, progress=progress, files=files, **options)


def _mlx(merged: Path, target: Path, options: dict, progress: bool, files=None) -> dict:
    from qalora.export.mlx import export_mlx

    return export_mlx(merged, target, progress=progress, files=files, **options)


FORMATS = (
    ExportFormat("gguf", "llama.cpp", lambda root: root / "model.gguf", (("float_type", "f16"), ("fallback", None)), _gguf),
    ExportFormat("mlx", "mlx-lm", lambda root: root / "model-mlx", (("dtype", "float16"),), _mlx),
)
BY_NAME = {f.name: f for f in FORMATS}


def parse_formats(value: str | Iterable[str] | bool | None) -> tuple[str, ...]:
    """``"gguf,mlx"`` / ``("gguf", "mlx")`` -> ``("gguf", "mlx")``; ``"none"``, ``""``, ``False``,
    ``None`` -> ``()``; ``True`` -> ``("gguf",)`` (the default format). Unknown names are refused."""
    if value is True:
        return ("gguf",)
    if value in (False, None):
        return ()
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = [n for n in names if n and n != "none"]
    if unknown := [n for n in names if n not in BY_NAME]:
        raise QaloraError(f"export format {unknown[0]!r} is unknown; use a comma-separated list of "
                          f"{', '.join(BY_NAME)}, or none")
    return tuple(dict.fromkeys(names))


def record_path(target: Path) -> Path:
    """The record beside an export: ``model.gguf`` -> ``model.gguf.json``, ``model-mlx/`` -> ``model-mlx.json``."""
    return target.with_name(target.name + ".json")


def _files(target: Path, files=None) -> dict[str, str]:
    """``{relative path: sha256}`` of the export (one file, or every file of a folder)."""
    sha = files.sha256 if files is not None else sha256_file
    if target.is_file():
        return {target.name: sha(target)}
    return {str(p.relative_to(target)): sha(p) for p in sorted(target.rglob("*")) if p.is_file()}


def _bytes(target: Path) -> int:
    return target.stat().st_size if target.is_file() else sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def export_stage(fmt: ExportFormat, root: Path, merged: Path, checkpoint_sha256: str, say, progress: bool,
                 files=None) -> dict:
    """Write (or reuse) the ``fmt`` export of ``merged`` under ``root``; returns ``{path, bytes}``
    (plus the exporter's report when written now). ``files``: the command's
    :class:`~qalora.io.FileCache`."""
    target, options = fmt.target(root), dict(fmt.options)
    wanted = {"checkpoint_sha256": checkpoint_sha256, "options": options}
    record = record_path(target)
    if target.exists():
        recorded = read_json(record, "export record") if record.is_file() else None
        require_same(target, f"{fmt.name.upper()} export", recorded, wanted, hint="delete it or choose another --out")
        hashes = recorded.get("files") or ({target.name: recorded["gguf_sha256"]} if "gguf_sha256" in recorded else None)
        if hashes != _files(target, files):
            what = "the file that was" if target.is_file() else "the files that were"
            raise QaloraError(f"{str(target)!r} differs from {what} exported (sha256 in {record.name}); it was "
                              "edited or truncated; delete it or choose another --out")
        say(f"4/5 export: reusing {target}")
        return {"path": str(target), "bytes": _bytes(target)}
    say(f"4/5 export {fmt.name} ({fmt.runtime}) -> {target}")
    if record.exists():
        record.unlink()  # a record without its export describes nothing
    try:
        report = fmt.run(merged, target, options, progress, files)
    except BaseException:
        if target.is_dir():  # an exporter that failed half-way leaves no folder to be mistaken for a result
            shutil.rmtree(target, ignore_errors=True)
        raise
    hashes = _files(target, files)
    extra = {"gguf_sha256": hashes[target.name]} if fmt.name == "gguf" else {}
    write_json(record, {**wanted, "source": str(merged), "files": hashes, **extra})
    return {**report, "path": str(target), "bytes": _bytes(target)}
