"""LoTA-QAF (Li et al., NeurIPS 2025, arXiv 2505.18724): ternary low-rank adaptation that moves the
integer codes themselves, plus a float remainder per (row, group) that joins the offset.

Parameters (integers in {-1, 0, 1}, stored as fp32, trained by t-SignSGD, see
``qalora.training.tsignsgd``): ``lota_A [r, in]``, ``lota_B [out, r]``. With ``ω`` the threshold
(``lota_omega``, default ``0.75 r`` = 48 at r = 64 as in the paper's code)::

    dW   = B_T @ A_T                                        # [out, in], integers in [-r, r]
    m    = +1 where dW > ω and q < 2^b - 1                  # code moves up, never past the top
           -1 where dW < -ω and q > 0                       # code moves down, never below 0
            0 elsewhere
    mu   = mean over each group of (dW - ω m) / ω           # [out, G], the float remainder
    W~   = scale * (q + m + mu) + offset                    # the layer's weight

Gradients reach ``dW`` through an identity straight-through estimator on ``m`` and exactly
through ``mu`` (``m`` is detached there), as in the reference code. The merge is exact::

    q'      = q + m                                         # every code moves by -1, 0 or +1, in range
    offset' = offset + scale * mu                           # scale unchanged

Codes only (``lota_codes_only``): ``mu = 0``, so the merge writes ``q' = q + m`` and leaves the
offsets (and scales) bit-identical: the form for storage that cannot hold a float offset.

Initialisation: ``A_T`` = Kaiming-normal ternarised at ``0.75 * mean|A|``, ``B_T = 0``, so the
adapter starts as a no-op (``dW = 0``, ``m = 0``, ``mu = 0``).
"""

from __future__ import annotations

import torch
from torch import nn

from qalora.adapters.kinds.base import Kind, Triple
from qalora.adapters.kinds.qalora import is_group_affine

OMEGA_FRACTION = 0.75  # of the rank, as the reference code's 48 at r = 64


def ternarize(w: torch.Tensor, ratio: float = 0.75) -> torch.Tensor:
    """``sign(w) * [|w| > ratio * mean|w|]``: values in {-1, 0, 1}, same dtype."""
    delta = ratio * w.abs().mean()
    return torch.where(w > delta, 1.0, torch.where(w < -delta, -1.0, 0.0)).to(w.dtype)


def build(layer, config) -> None:
    a = torch.empty(config.rank, layer.in_features)
    nn.init.kaiming_normal_(a)
    layer.lota_A = nn.Parameter(ternarize(a))
    layer.lota_B = nn.Parameter(torch.zeros(layer.out_features, config.rank))
    layer.lota_omega = float(config.lota_omega if config.lota_omega is not None else OMEGA_FRACTION * config.rank)
    layer.lota_codes_only = bool(getattr(config, "lota_codes_only", False))


def code_moves(dw: torch.Tensor, codes: torch.Tensor, omega: float, bits: int) -> torch.Tensor:
    """``m [out, in]``: +1 / -1 where ``dw`` passes ``±omega`` (strictly) and the code can move
    that way within ``[0, 2^bits - 1]``; 0 elsewhere. Same dtype as ``dw``, no gradient."""
    top = 2**bits - 1
    up = (dw > omega) & (codes < top)
    down = (dw < -omega) & (codes > 0)
    return up.to(dw.dtype) - down.to(dw.dtype)


def transform(layer, t: Triple) -> Triple:
    dtype = t.scale.dtype
    dw = layer.lota_B.to(dtype) @ layer.lota_A.to(dtype)                        # [out, in]
    m = code_moves(dw.detach(), t.codes, layer.lota_omega, layer.bits)           # [out, in]
    m_ste = m + (dw - dw.detach())                                              # value m, gradient of dw
    out_f, in_f = dw.shape
    L = t.group_size
    if layer.lota_codes_only:                   # codes move, offsets stay bit for bit
        return Triple(t.codes + m_ste, t.scale, t.offset, L)
    mu = ((dw - layer.lota_omega * m) / layer.lota_omega).reshape(out_f, in_f // L, L).mean(-1)  # [out, G]
    return Triple(t.codes + m_ste, t.scale, t.offset + t.scale * mu, L)


LOTA = Kind(name="lota", changes=("codes", "offset"), needs="a group-wise INTn QuantLinear (qalora quantize)",
            matches=is_group_affine, build=build, state_keys=("lota_A", "lota_B"), ternary=("lota_A", "lota_B"),
            transform=transform)
