"""Round-to-nearest (min-max) group-wise quantization."""

from __future__ import annotations

import torch

from qalora.quant.qparams import check_bits, check_group_size, group_view, minmax_qparams, quantize_codes


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, name: str = "weight"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max RTN per (row, group).

    Args:
        weight: ``[out, in]``.
    Returns:
        ``codes`` uint8 ``[out, in]``, ``scale`` and ``offset`` fp32 ``[out, in / L]`` with
        ``offset = min``, ``scale = (max - min) / (2**bits - 1)``, ``q = round((W - offset) / scale)``.
    """
    check_bits(bits)
    check_group_size(group_size, weight.shape[1], name)
    wg = group_view(weight.float(), group_size)          # [out, G, L]
    scale, offset = minmax_qparams(wg, bits)             # [out, G]
    codes = quantize_codes(wg, scale.unsqueeze(-1), offset.unsqueeze(-1), bits)
    return codes.reshape(weight.shape), scale, offset
