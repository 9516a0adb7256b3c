"""PyTorch's int4 "tinygemm" kernels (``aten._weight_int4pack_mm[_for_cpu]``).

Convention: ``w = (q - 8) * scale + zero`` with bf16 ``scale`` and ``zero`` per (group, row), so
our float offsets map exactly (up to bf16) by ``zero = offset + 8 * scale``. 2- and 3-bit codes
are valid int4 codes, so INT2/INT3 weights run on the same kernel with no loss. They are
centred first, ``q' = q + 8 - 2**(bits-1)`` and ``zero = offset + 2**(bits-1) * scale``: the same
weights, but ``zero`` lands mid-range instead of far outside it, so its bf16 rounding stays
small (with ``zero = offset + 8 * scale`` a 2-bit group's zero is ~5 ranges away and bf16
cancellation costs ~10x more error).

Layouts (torch 2.13):
- CPU: ``_convert_weight_to_int4pack_for_cpu(q int32 [N, K], inner_k_tiles)`` → uint8 [N, K/2];
  needs N % 16 == 0; ``_weight_int4pack_mm_for_cpu(x bf16 [M, K], packed, L, sz bf16 [K/L, N, 2])``.
- CUDA: ``_convert_weight_to_int4pack(uint8 [N, K/2] with byte = q[2k] << 4 | q[2k+1], inner_k_tiles)``;
  needs N % 8 == 0 and K % (inner_k_tiles * 16) == 0.
Group sizes 32, 64, 128, 256.
"""

from __future__ import annotations

import torch

from qalora.quant.packing import unpack

GROUP_SIZES = (32, 64, 128, 256)


def code_shift(bits: int) -> int:
    """Added to ``bits``-bit codes to centre them on the kernel's 8 (0 for 4-bit)."""
    return 8 - 2 ** (bits - 1)


def scales_and_zeros(scale: torch.Tensor, offset: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """``[out, G]`` float scale/offset → bf16 ``[G, out, 2]`` with ``[..., 0] = scale``,
    ``[..., 1] = offset + 2**(bits-1) * scale`` (the kernel's zero for codes shifted by
    ``code_shift(bits)``; ``offset + 8 * scale`` at 4 bits)."""
    zero = offset.float() + float(2 ** (bits - 1)) * scale.float()
    return torch.stack([scale.float().t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()


def _inner_k_tiles(k: int) -> int | None:
    for t in (8, 4, 2):
        if k % (t * 16) == 0:
            return t
    return None


def int4_supports(module, device: torch.device) -> bool:
    n, k = module.out_features, module.in_features
    if module.bits > 4 or module.group_size not in GROUP_SIZES or k % module.group_size:
        return False
    if device.type == "cpu":
        return n % 16 == 0 and k % 2 == 0
    if device.type == "cuda":
        return n % 8 == 0 and _inner_k_tiles(k) is not None
    return False


def int4_prepare(module, device: torch.device) -> dict:
    """Repack the canonical codes into the kernel's layout (done once, cached by the module)."""
    codes = unpack(module.qweight, module.in_features, module.bits).to(device)
    c = codes.to(torch.int32) + code_shift(module.bits)
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 2)
    else:
        nibbles = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, _inner_k_tiles(module.in_features))
    return {"packed": packed, "sz": scales_and_zeros(module.scale, module.offset, module.bits).to(device)}


def int4_matmul(x: torch.Tensor, module, state: dict) -> torch.Tensor:
    """``x [M, in]`` → ``[M, out]`` in ``x.dtype`` (computed in bf16 by the kernel)."""
    xb = x.to(torch.bfloat16).contiguous()
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, state["packed"], module.group_size, state["sz"])
    else:
        y = torch.ops.aten._weight_int4pack_mm(xb, state["packed"], module.group_size, state["sz"])
    return y.to(x.dtype)
