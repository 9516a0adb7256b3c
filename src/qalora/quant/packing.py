"""Bit-packing of integer codes along the last dimension, one explicit pack/unpack pair per width.

Codes ``q`` of shape ``[..., n]`` (uint8, values < 2**bits) become bytes ``[..., packed_len(n, bits)]``.
Each row is packed on its own (rows never share a byte), so rows can be sliced, permuted or
sharded in packed form. The last dimension is zero-padded to a whole number of packing units:

=====  ==========================================  ======================
bits   unit                                        layout (little-endian)
=====  ==========================================  ======================
2      4 codes → 1 byte                            byte = q0 | q1<<2 | q2<<4 | q3<<6
3      8 codes → 3 bytes                           24-bit word = Σ q_k << 3k, bytes low→high
4      2 codes → 1 byte                            byte = q0 | q1<<4
5      8 codes → 5 bytes                           40-bit word = Σ q_k << 5k, bytes low→high
6      4 codes → 3 bytes                           24-bit word = Σ q_k << 6k, bytes low→high
8      1 code  → 1 byte                            identity
=====  ==========================================  ======================

Every width the storage holds (``STORED_BITS``): the quantizers write 2, 3, 4 and 8; 5 and 6 are
the widths of imported files (GGUF Q5_0/Q5_1/Q5_K, Q6_K).
"""

from __future__ import annotations

from typing import Callable

import torch

from qalora.errors import QaloraError
from qalora.quant.bits import STORED_BITS

# codes per unit, bytes per unit
_UNITS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 5: (8, 5), 6: (4, 3), 8: (1, 1)}


def check_bits(bits: int) -> None:
    """Refuse a width the packed storage does not hold."""
    if bits not in STORED_BITS:
        raise QaloraError(f"bits {bits!r} cannot be packed; use one of {', '.join(map(str, STORED_BITS))}")


def packed_len(n: int, bits: int) -> int:
    """Bytes per row for ``n`` codes of ``bits`` bits (rounded up to a whole unit)."""
    check_bits(bits)
    codes, nbytes = _UNITS[bits]
    return -(-n // codes) * nbytes


def _pad_units(q: torch.Tensor, codes_per_unit: int) -> torch.Tensor:
    """``[..., n]`` → ``[..., units, codes_per_unit]`` (int32), zero-padded."""
    n = q.shape[-1]
    pad = (-n) % codes_per_unit
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    return q.to(torch.int32).reshape(*q.shape[:-1], -1, codes_per_unit)


def _shifts(codes_per_unit: int, bits: int, device) -> torch.Tensor:
    return torch.arange(codes_per_unit, device=device, dtype=torch.int32) * bits


def _pack_sub_byte(q: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    u = _pad_units(q, per)                                   # [..., n/per, per]
    return (u << _shifts(per, bits, q.device)).sum(-1).to(torch.uint8)


def _unpack_sub_byte(p: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    per = 8 // bits
    v = p.to(torch.int32).unsqueeze(-1) >> _shifts(per, bits, p.device)   # [..., bytes, per]
    return (v & (2**bits - 1)).to(torch.uint8).flatten(-2)[..., :n]


def _word_dtype(nbytes: int) -> torch.dtype:
    return torch.int32 if nbytes <= 3 else torch.int64


def _pack_words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Widths that straddle bytes (3, 5, 6): a unit of codes forms one little-endian word, written
    low byte first (int32 for the 24-bit words of 3 and 6 bits, int64 for 5 bits' 40)."""
    per, nbytes = _UNITS[bits]
    wide = _word_dtype(nbytes)
    u = _pad_units(q, per).to(wide)                                 # [..., n/per, per]
    word = (u << _shifts(per, bits, q.device).to(wide)).sum(-1)     # [..., n/per]
    b = torch.stack([(word >> (8 * k)) & 0xFF for k in range(nbytes)], dim=-1)
    return b.to(torch.uint8).flatten(-2)                           # [..., n/per * nbytes]


def _unpack_words(p: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    per, nbytes = _UNITS[bits]
    wide = _word_dtype(nbytes)
    b = p.to(wide).reshape(*p.shape[:-1], -1, nbytes)              # [..., units, nbytes]
    word = sum(b[..., k] << (8 * k) for k in range(nbytes))
    v = (word.unsqueeze(-1) >> _shifts(per, bits, p.device).to(wide)) & (2**bits - 1)
    return v.to(torch.uint8).flatten(-2)[..., :n]


def _pack8(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.uint8).clone()


def _unpack8(p: torch.Tensor, n: int) -> torch.Tensor:
    return p[..., :n].clone()


PACKERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda q: _pack_sub_byte(q, 2),
    3: lambda q: _pack_words(q, 3),
    4: lambda q: _pack_sub_byte(q, 4),
    5: lambda q: _pack_words(q, 5),
    6: lambda q: _pack_words(q, 6),
    8: _pack8,
}
UNPACKERS: dict[int, Callable[[torch.Tensor, int], torch.Tensor]] = {
    2: lambda p, n: _unpack_sub_byte(p, n, 2),
    3: lambda p, n: _unpack_words(p, n, 3),
    4: lambda p, n: _unpack_sub_byte(p, n, 4),
    5: lambda p, n: _unpack_words(p, n, 5),
    6: lambda p, n: _unpack_words(p, n, 6),
    8: _unpack8,
}


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [..., n]`` (integers in ``0 .. 2**bits - 1``) into uint8 ``[..., packed_len(n, bits)]``."""
    check_bits(bits)
    if codes.dtype.is_floating_point:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    return PACKERS[bits](codes)


def unpack(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., packed_len(n, bits)]`` → uint8 codes ``[..., n]``."""
    check_bits(bits)
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"packed last dim {packed.shape[-1]} != packed_len({n}, {bits}) = {packed_len(n, bits)}")
    return UNPACKERS[bits](packed, n)
