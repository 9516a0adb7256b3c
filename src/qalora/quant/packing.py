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
8      1 code  → 1 byte                            identity
=====  ==========================================  ======================
"""

from __future__ import annotations

from typing import Callable

import torch

from qalora.quant.qparams import check_bits

# codes per unit, bytes per unit
_UNITS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


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


def _pack3(q: torch.Tensor) -> torch.Tensor:
    u = _pad_units(q, 8)                                     # [..., n/8, 8]
    word = (u << _shifts(8, 3, q.device)).sum(-1)            # [..., n/8] 24-bit words
    b = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1)
    return b.to(torch.uint8).flatten(-2)                     # [..., 3n/8]


def _unpack3(p: torch.Tensor, n: int) -> torch.Tensor:
    b = p.to(torch.int32).reshape(*p.shape[:-1], -1, 3)     # [..., n/8, 3]
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    v = (word.unsqueeze(-1) >> _shifts(8, 3, p.device)) & 7  # [..., n/8, 8]
    return v.to(torch.uint8).flatten(-2)[..., :n]


def _pack8(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.uint8).clone()


def _unpack8(p: torch.Tensor, n: int) -> torch.Tensor:
    return p[..., :n].clone()


PACKERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda q: _pack_sub_byte(q, 2),
    3: _pack3,
    4: lambda q: _pack_sub_byte(q, 4),
    8: _pack8,
}
UNPACKERS: dict[int, Callable[[torch.Tensor, int], torch.Tensor]] = {
    2: lambda p, n: _unpack_sub_byte(p, n, 2),
    3: _unpack3,
    4: lambda p, n: _unpack_sub_byte(p, n, 4),
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
