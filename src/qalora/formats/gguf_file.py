"""Read GGUF (llama.cpp) files into qalora's codecs, and write them back byte for byte.

A GGUF file is: a header (magic ``GGUF``, version, tensor and key/value counts), the metadata
key/values, one *tensor info* per tensor (name, dims innermost-first, GGML type, offset of its
data relative to the data section), padding up to ``general.alignment`` (default 32), then the
data section, where every tensor's bytes start at an aligned offset.

``read_gguf`` parses the layout with ``gguf.GGUFReader`` (which computes each tensor's absolute
``data_offset`` = aligned end of the tensor infos + the info's relative offset, and its byte
length from the type's block size/bytes) and keeps only plain facts (``TensorInfo``); tensor
bytes are read from the file on demand. Logical shapes are given in PyTorch order, so ``cols``
(the last dim, GGUF's first) is the contiguous, block-quantized dimension.

Writing back follows one rule: every byte the tuning did not change stays identical: every
metadata key/value, tensor info, alignment padding and untouched tensor's data. ``write_like``
therefore copies the source file and overwrites only the data regions of replaced tensors, whose
new bytes must have exactly the old length (same type; encode with ``gguf_types.encode``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

from qalora.formats import gguf_types
from qalora.formats.gguf_types import GGUF_TYPES, Decoded

FLOAT_TYPES = ("F32", "F16", "BF16")
_PARSE_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. ``shape``: logical shape in PyTorch order (outermost first;
    ``shape[-1]`` is contiguous in the file); ``rows`` = product of the leading dims (1 for a
    vector), ``cols`` = ``shape[-1]``; ``offset``/``nbytes``: absolute byte range of its data."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _unsupported(info: TensorInfo, what: str, accepted) -> ValueError:
    return ValueError(f"tensor {info.name!r} has type {info.type_name}, not supported by {what}; "
                      f"accepted: {', '.join(accepted)}")


@dataclass
class GGUFTensors:
    """The parsed layout of one GGUF file: tensor infos by name (file order), metadata and the
    data section's start and alignment. Tensor data is read from ``path`` when asked for."""

    path: Path
    tensors: dict[str, TensorInfo]
    _metadata: dict[str, Any] = field(repr=False)
    data_offset: int = 0
    alignment: int = 32

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def tensor_info(self, name: str) -> TensorInfo:
        """The ``TensorInfo`` of ``name``; ValueError naming the file if there is none."""
        info = self.tensors.get(name)
        if info is None:
            raise ValueError(f"no tensor {name!r} in {self.path} ({len(self.tensors)} tensors)")
        return info

    def metadata(self) -> dict[str, Any]:
        """Every metadata key → python value (strings decoded, arrays as lists), file order."""
        return dict(self._metadata)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes, uint8 ``[nbytes]``, read from the file."""
        info = self.tensor_info(name)
        data = np.fromfile(self.path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if data.size != info.nbytes:
            raise ValueError(f"{self.path}: data of tensor {name!r} is cut short; the file changed or is truncated")
        return data

    def decoded(self, name: str) -> Decoded:
        """``gguf_types.decode`` of a block-quantized tensor: codes ``[rows, cols]`` etc., from raw
        bytes ``[rows, cols // block_weights * block_bytes]``."""
        info = self.tensor_info(name)
        if info.type_name not in GGUF_TYPES:
            raise _unsupported(info, "decoded()", GGUF_TYPES)
        return gguf_types.decode(info.type_name, self.raw(name).reshape(info.rows, -1), info.cols)

    def float_array(self, name: str) -> np.ndarray:
        """An F32/F16/BF16 tensor as float32: 1-D ``[n]`` for a vector, else ``[rows, cols]``.
        F16 and BF16 widen exactly (BF16: ``uint16 << 16`` viewed as float32)."""
        info = self.tensor_info(name)
        if info.type_name not in FLOAT_TYPES:
            raise _unsupported(info, "float_array()", FLOAT_TYPES)
        raw = self.raw(name)
        if info.type_name == "F32":
            out = raw.view("<f4").astype(np.float32)
        elif info.type_name == "F16":
            out = raw.view("<f2").astype(np.float32)
        else:
            out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        return out if len(info.shape) <= 1 else out.reshape(info.rows, info.cols)


def _open_reader(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ValueError(f"{path}: no such file; expected a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path, "r")
    except _PARSE_ERRORS as exc:
        raise ValueError(f"{path}: truncated or corrupt; expected a complete GGUF file (gguf-py: {_one_line(exc)})") from None
    if reader.byte_order != "I":
        raise ValueError(f"{path}: GGUF of the other byte order (big-endian); expected little-endian")
    return reader


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    out = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's pseudo-fields for the header
            continue
        out[key] = fld.contents()
    return out


def read_gguf(path: str | os.PathLike) -> GGUFTensors:
    """Parse ``path``'s layout. ValueError (one line, naming the path) for a missing, non-GGUF,
    truncated or otherwise unreadable file."""
    path = Path(path)
    reader = _open_reader(path)
    size = path.stat().st_size
    tensors = {}
    for t in reader.tensors:
        info = TensorInfo(name=t.name, type_name=t.tensor_type.name,
                          shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                          offset=int(t.data_offset), nbytes=int(t.n_bytes))
        if info.offset + info.nbytes > size:
            raise ValueError(f"{path}: truncated; tensor {info.name!r} ends at byte "
                             f"{info.offset + info.nbytes} of a {size}-byte file")
        tensors[info.name] = info
    try:
        meta = _metadata(reader)
    except _PARSE_ERRORS as exc:
        raise ValueError(f"{path}: unreadable GGUF metadata: {_one_line(exc)}") from None
    result = GGUFTensors(path, tensors, meta, int(reader.data_offset), int(reader.alignment))
    del reader  # drop the memmap; data is re-read on demand
    return result


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    return b.exists() and os.path.samefile(a, b)


def _checked(src: GGUFTensors, replaced: dict[str, np.ndarray]) -> list[tuple[TensorInfo, np.ndarray]]:
    out = []
    for name, data in replaced.items():
        info = src.tensor_info(name)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise ValueError(f"replacement for tensor {name!r} must be a uint8 array; got "
                             f"{getattr(data, 'dtype', type(data).__name__)}")
        if data.nbytes != info.nbytes:
            raise ValueError(f"replacement for tensor {name!r} ({info.type_name}) has {data.nbytes} bytes; "
                             f"expected {info.nbytes}")
        out.append((info, np.ascontiguousarray(data).reshape(-1)))
    return out


def write_like(source: str | os.PathLike | GGUFTensors, out: str | os.PathLike,
               replaced: dict[str, np.ndarray]) -> None:
    """Write ``out`` as a byte copy of ``source`` in which each tensor named in ``replaced`` holds
    the given raw uint8 bytes (any shape; exactly the tensor's ``nbytes``, in its own type).
    Everything is checked before anything is written; ``out`` appears atomically (temp file in
    its folder, then ``os.replace``) or not at all. ``out`` must not be ``source``."""
    src_path = Path(source.path if isinstance(source, GGUFTensors) else source)
    out = Path(out)
    src = read_gguf(src_path)  # fresh offsets, even if ``source`` was parsed earlier
    if _same_file(src_path, out):
        raise ValueError(f"{out}: refusing to overwrite the source file; write to another path")
    patches = _checked(src, replaced)
    if not out.parent.is_dir():
        raise ValueError(f"{out}: folder {out.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "r+b") as f:
            with open(src_path, "rb") as s:
                shutil.copyfileobj(s, f, 1 << 22)
            for info, data in patches:
                f.seek(info.offset)
                f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(src_path, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
