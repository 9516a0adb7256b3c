"""``NF4Linear``: a frozen linear layer whose weight is stored as packed NF4 codes (QLoRA's base)."""

from __future__ import annotations

import torch
from torch import nn

from qalora.nn.frozen import frozen_linear
from qalora.quant.nf4 import check_block_size, nf4_dequantize, nf4_quantize
from qalora.quant.packing import pack, packed_len, unpack


class NF4Linear(nn.Module):
    """``y = x W~^T + b`` with ``W~[o, i] = NF4_CODE[q[o, i]] * absmax[o, i // B]``.

    Buffers (saved in ``state_dict``; the base is frozen, so nothing here is a Parameter):
        qweight: uint8 ``[out, in / 2]``, the codes packed two per byte (``pack(codes, 4)``,
            low nibble first).
        absmax: fp32 ``[out, in / B]``, per-block absolute maximum (``B = block_size``).
        bias: ``[out]`` or absent.

    The forward dequantizes the weight just in time in fp32 (like the affine reference
    kernel) and goes through :func:`qalora.nn.frozen.frozen_linear`, as ``QuantLinear`` does:
    ``grad_x = grad_y @ W~`` with ``W~`` dequantized again in backward, so neither ``x`` nor a
    dense weight is kept alive between forward and backward.
    """

    bits = 4

    def __init__(self, in_features: int, out_features: int, block_size: int = 64, bias: bool = False,
                 device=None, bias_dtype: torch.dtype = torch.float32, name: str = "weight"):
        super().__init__()
        check_block_size(block_size, in_features, name)
        self.in_features, self.out_features = in_features, out_features
        self.block_size = block_size
        blocks = in_features // block_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, 4), dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(out_features, blocks, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, block_size: int = 64,
                    name: str = "weight") -> "NF4Linear":
        """Quantize a dense ``weight [out, in]`` (and keep ``bias [out]`` as is) into a new layer."""
        codes, absmax = nf4_quantize(weight.detach(), block_size, name)
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, block_size, bias=bias is not None, device="meta", name=name)
        m.qweight, m.absmax = pack(codes, 4), absmax
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 ``[out, in]`` in ``0..15``."""
        return unpack(self.qweight, self.in_features, 4)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W~`` as ``[out, in]`` in ``dtype`` (computed in fp32)."""
        return nf4_dequantize(self.codes(), self.absmax, self.block_size, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight: packed codes + absmax (bias not counted)."""
        return (self.qweight.numel() * self.qweight.element_size()
                + self.absmax.numel() * self.absmax.element_size())

    def base_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [M, in] -> [M, out]`` fp32, ``x2 W~^T`` with no bias and no autograd."""
        with torch.no_grad():
            w = self.dequantized_weight(torch.float32)            # [out, in] fp32, freed on return
            return x2.float() @ w.t()                             # [M, out] fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> y: [..., out]
        lead = x.shape[:-1]
        y = frozen_linear(x.reshape(-1, self.in_features), self)  # [M, out] fp32
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"block_size={self.block_size}, bias={self.bias is not None}")
