"""NF4 (4-bit NormalFloat) block-wise absmax quantization, the frozen base of the QLoRA baseline.

NF4 (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314) is a fixed 16-value codebook
``c_0 < ... < c_15`` in ``[-1, 1]`` built from quantiles of a standard normal, with an exact
zero at index 7. A weight ``W [out, in]`` is split along ``in`` into blocks of ``B``
contiguous columns (``B = block_size``, 64 in QLoRA); per row ``o`` and block ``b``::

    a[o, b]   = max_{i in block b} |W[o, i]|                 (absmax; 1 for an all-zero block)
    q[o, i]   = argmin_k |W[o, i] / a[o, b] - c_k|           (nearest code, 0..15)
    W~[o, i]  = c_{q[o, i]} * a[o, b]

Unlike the affine form of :mod:`qalora.quant.qparams` there is no offset: NF4 is symmetric
around zero, and the block's largest-magnitude weight is reproduced exactly (it maps to
``c_0 = -1`` or ``c_15 = 1``). Only the absmax is stored per block (fp32 here; QLoRA's
"double quantization" of the absmax is not implemented).
"""

from __future__ import annotations

import torch

from qalora.errors import QaloraError
from qalora.quant.qparams import valid_group_sizes

# The 16 NF4 values exactly as bitsandbytes hard-codes them in
# ``bitsandbytes.functional.get_4bit_type("nf4")`` (QLoRA, arXiv:2305.14314, Appendix E).
# They are reproduced bit-for-bit (in fp32) by bitsandbytes' own recipe
# ``create_normal_map(offset=0.9677083, use_extra_value=True)``:
#   sorted(norm.ppf(linspace(0.9677083, 0.5, 9)[:-1]) ∪ {0} ∪ -norm.ppf(linspace(0.9677083, 0.5, 8)[:-1])) / max
# (8 positive quantiles, 7 negative, and an exact zero; checked with scipy while writing this file).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
NF4_ZERO_INDEX = 7

# Decision thresholds: midpoints m_k = (c_k + c_{k+1}) / 2, k = 0..14 (fp32). These equal, in
# fp32, the constants of bitsandbytes' ``dQuantizeNF4`` decision tree.
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


def check_block_size(block_size: int, in_features: int, name: str = "weight") -> None:
    """Refuse a block size that does not split ``in_features`` into whole blocks."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0 \
            or in_features % block_size != 0:
        ok = valid_group_sizes(in_features) or [in_features]
        raise QaloraError(
            f"NF4 block_size {block_size!r} does not divide in_features {in_features} of {name}; "
            f"use {', '.join(map(str, ok))}"
        )


def nf4_quantize(weight: torch.Tensor, block_size: int = 64, name: str = "weight"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax NF4 quantization.

    Args:
        weight: ``[out, in]`` floating point (any float dtype; computed in fp32).
        block_size: ``B``, contiguous input columns per block; must divide ``in``.
        name: used in error messages (e.g. the module path).
    Returns:
        ``codes`` uint8 ``[out, in]`` in ``0..15`` (indices into :data:`NF4_CODE`) and
        ``absmax`` fp32 ``[out, in / B]`` with ``absmax = max |W|`` per block (1 for an
        all-zero block, whose codes are then all 7, i.e. exactly 0.0).

    The nearest code is found with ``torch.bucketize`` on the 15 midpoints ``m_k`` between
    adjacent codes (memory ``O(out * in)``, no ``[..., 16]`` broadcast). Ties: a normalized
    value exactly on a midpoint ``m_k`` goes to the lower code ``k`` (``bucketize`` with
    ``right=False``), the same as bitsandbytes' ``x > m_k`` decision tree.
    """
    if weight.dim() != 2:
        raise QaloraError(f"nf4_quantize expects a 2-D weight [out, in], got shape {tuple(weight.shape)} for {name}")
    if not weight.dtype.is_floating_point:
        raise QaloraError(f"nf4_quantize expects a floating point weight, got {weight.dtype} for {name}")
    out_f, in_f = weight.shape
    check_block_size(block_size, in_f, name)
    wb = weight.float().reshape(out_f, in_f // block_size, block_size)    # [out, G, B]
    absmax = wb.abs().amax(dim=-1)                                        # [out, G]
    if not torch.isfinite(absmax).all():
        raise QaloraError(f"{name} has non-finite values (inf/nan); NF4 cannot quantize it")
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    x = wb / absmax.unsqueeze(-1)                                         # [out, G, B] in [-1, 1]
    mid = _NF4_MIDPOINTS.to(x.device)
    codes = torch.bucketize(x, mid, out_int32=True, right=False)          # [out, G, B] in 0..15
    return codes.to(torch.uint8).reshape(out_f, in_f), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W~[o, i] = NF4_CODE[codes[o, i]] * absmax[o, i // B]``.

    Args:
        codes: ``[out, in]`` integer codes in ``0..15`` (unpacked).
        absmax: ``[out, in / B]``.
        block_size: ``B``.
    Returns:
        ``[out, in]`` in ``dtype`` (computed in fp32).
    """
    out_f, in_f = codes.shape
    check_block_size(block_size, in_f)
    if tuple(absmax.shape) != (out_f, in_f // block_size):
        raise QaloraError(f"absmax has shape {tuple(absmax.shape)}; codes {tuple(codes.shape)} with "
                          f"block_size {block_size} need ({out_f}, {in_f // block_size})")
    table = NF4_CODE.to(codes.device)
    v = table[codes.long()].reshape(out_f, in_f // block_size, block_size)   # [out, G, B]
    w = v * absmax.float().unsqueeze(-1)
    return w.reshape(out_f, in_f).to(dtype)
