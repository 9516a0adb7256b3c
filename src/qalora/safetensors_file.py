"""The safetensors layout, read and written without a memory map, one tensor at a time.

Layout: an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets from the end of the header),
then the data.

``safetensors.safe_open`` memory-maps the file: every page a read touches stays counted in the
process's resident memory until the file is closed, so a pass over a 1.5 GB checkpoint tensor by
tensor (quantize's source, an export, the merge's comparison) holds 1.5 GB more than it uses.
:class:`SafetensorsFile` seeks and reads each tensor into its own buffer instead, freed when the
tensor is, after checking every header entry against the file's size. (A whole-model load keeps
``load_file``'s map: there every tensor stays alive anyway, and pages never touched, such as
embedding rows no token uses, are never read.) :func:`header_bytes` writes the header of tensors
a caller then streams into the file back to back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qalora.errors import QaloraError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``{name: (dtype, shape, begin, end)}`` of a safetensors file (absolute byte offsets), every
    entry checked against the file's size (a truncated or foreign file is refused in one line)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise QaloraError(f"model weights {str(path)!r} are not a readable safetensors file ({e})") from None
    start, table = 8 + n, {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[spec["dtype"]], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QaloraError(f"tensor {name!r} in {str(path)!r} has an entry this reader does not take "
                              f"(dtypes {', '.join(DTYPES)})") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0 or start + end > size:
            raise QaloraError(f"tensor {name!r} in {str(path)!r} lies outside the file or has the wrong size "
                              "(a truncated download?)")
        table[name] = (dtype, shape, start + begin, start + end)
    return table


def read_tensor(path: Path, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int, name: str) -> torch.Tensor:
    """One tensor (``begin``/``end``: absolute byte offsets), in its own memory."""
    buf = bytearray(end - begin)
    with open(path, "rb") as f:
        f.seek(begin)
        if f.readinto(buf) != len(buf):
            raise QaloraError(f"tensor {name!r} in {str(path)!r} is cut short (the file changed while reading)")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)


class _Slice:
    def __init__(self, dtype_name: str, shape: tuple[int, ...]):
        self._dtype, self._shape = dtype_name, shape

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._dtype


class SafetensorsFile:
    """``safe_open``'s reading interface (``keys``, ``get_tensor``, ``get_slice(...).get_shape()`` /
    ``.get_dtype()``), without the memory map; usable as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._table = read_header(self.path)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def keys(self) -> list[str]:
        return list(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table

    def entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if name not in self._table:
            raise QaloraError(f"{str(self.path)!r} has no tensor {name!r}")
        return self._table[name]

    def get_tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entry(name)
        return read_tensor(self.path, dtype, shape, begin, end, name)

    def get_slice(self, name: str) -> _Slice:
        dtype, shape, _, _ = self.entry(name)
        return _Slice(NAMES[dtype], shape)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the file (``safetensors.torch.load_file``'s result, without the map)."""
    f = SafetensorsFile(path)
    return {k: f.get_tensor(k) for k in f.keys()}


def header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], what: str = "this writer") -> bytes:
    """The header (8-byte little-endian length + JSON padded with spaces to 8 bytes) of tensors
    stored back to back in ``entries`` order; a dtype outside :data:`DTYPES` is refused, naming ``what``."""
    table, at = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        if dtype not in NAMES:
            raise QaloraError(f"tensor {name!r} has dtype {dtype}, which {what} does not store")
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        table[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
