"""Group-wise affine quantization parameters, the canonical form of every quantized weight.

A weight ``W`` of shape ``[out, in]`` is split along ``in`` into ``in / L`` groups of ``L``
contiguous columns (``L = group_size``). Per row ``o`` and group ``g``::

    W~[o, i] = scale[o, g] * q[o, i] + offset[o, g]        q in {0, ..., 2**bits - 1}

``scale`` and ``offset`` are floating point (fp32 here); conversions to other conventions
(integer zero points, tinygemm zeros, GGUF d/m) happen only at the edges.
"""

from __future__ import annotations

import torch

from qalora.errors import QaloraError
from qalora.quant.bits import SUPPORTED_BITS  # noqa: F401  (re-exported)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QaloraError(f"bits {bits!r} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")


def valid_group_sizes(in_features: int, candidates=(16, 32, 64, 96, 128, 192, 256)) -> list[int]:
    """Group sizes from ``candidates`` that divide ``in_features``."""
    return [g for g in candidates if in_features % g == 0]


def check_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    """Refuse a group size that does not split ``in_features`` into whole groups."""
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size != 0:
        ok = valid_group_sizes(in_features) or [in_features]
        raise QaloraError(
            f"group_size {group_size!r} does not divide in_features {in_features} of {name}; "
            f"use {', '.join(map(str, ok))}"
        )


def minmax_qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (asymmetric) parameters over the last dimension.

    Args:
        w: ``[..., L]`` weights of one group per leading index.
    Returns:
        ``scale, offset`` of shape ``[...]`` (fp32): ``offset = min``,
        ``scale = (max - min) / (2**bits - 1)``; a constant group gets ``scale = 1`` so that
        every code is 0 and the group dequantizes exactly to its value.
    """
    w = w.float()
    lo = w.amin(dim=-1)
    hi = w.amax(dim=-1)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """``q = clamp(round((w - offset) / scale), 0, 2**bits - 1)`` elementwise, as uint8.

    ``w``, ``scale`` and ``offset`` broadcast together (e.g. ``[out, G, L]`` with ``[out, G, 1]``).
    """
    q = torch.round((w.float() - offset) / scale)
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` → ``[out, in / L, L]`` (groups are contiguous input columns)."""
    out_f, in_f = w.shape
    return w.reshape(out_f, in_f // group_size, group_size)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W~ = scale * q + offset`` per group.

    Args:
        codes: ``[out, in]`` integer codes (unpacked).
        scale, offset: ``[out, in / L]``.
    Returns:
        ``[out, in]`` in ``dtype``, computed in fp32 (fp64 when ``dtype`` is fp64: the
        precision check of a merge uses it).
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q = group_view(codes, group_size).to(work)
    w = q * scale.to(work).unsqueeze(-1) + offset.to(work).unsqueeze(-1)
    return w.reshape(codes.shape).to(dtype)
