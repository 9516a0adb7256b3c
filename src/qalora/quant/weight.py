"""``QuantizedWeight``: the typed record of one group-wise quantized matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qalora.quant.packing import check_bits, pack, packed_len, unpack  # every stored width (imports: 5, 6)
from qalora.quant.qparams import check_group_size, dequantize


@dataclass
class QuantizedWeight:
    """Packed codes plus float scale and offset of a ``[out, in]`` weight.

    ``W~[o, i] = scale[o, i // L] * q[o, i] + offset[o, i // L]``.

    Attributes:
        packed: uint8 ``[out, packed_len(in, bits)]`` (rows packed independently, see ``packing``).
        scale: fp32 ``[out, in / L]``.
        offset: fp32 ``[out, in / L]`` (float offsets: the canonical form, exact under merges).
        bits: 2, 3, 4 or 8.
        group_size: L, groups are contiguous input columns.
        in_features: ``in`` (needed to unpack the padded last unit).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size, self.in_features)
        out = self.packed.shape[0]
        groups = self.in_features // self.group_size
        if tuple(self.packed.shape) != (out, packed_len(self.in_features, self.bits)) or self.packed.dtype != torch.uint8:
            raise ValueError(f"packed has shape {tuple(self.packed.shape)} {self.packed.dtype}, "
                             f"expected ({out}, {packed_len(self.in_features, self.bits)}) uint8")
        for name in ("scale", "offset"):
            t = getattr(self, name)
            if tuple(t.shape) != (out, groups):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({out}, {groups})")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   bits: int, group_size: int) -> "QuantizedWeight":
        """Pack integer ``codes [out, in]`` (values < 2**bits)."""
        if int(codes.max()) >= 2**bits:
            raise ValueError(f"codes reach {int(codes.max())}, above the {bits}-bit maximum {2**bits - 1}")
        return cls(pack(codes, bits), scale.float().contiguous(), offset.float().contiguous(),
                   bits, group_size, codes.shape[1])

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``[out, in]``."""
        return unpack(self.packed, self.in_features, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` dense weight ``scale * q + offset``."""
        return dequantize(self.codes(), self.scale, self.offset, self.group_size, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + scale + offset."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))
