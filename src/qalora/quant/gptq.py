"""GPTQ (Frantar et al., 2022): group-wise quantization that compensates rounding error.

For a linear layer ``y = x W^T`` with calibration inputs ``x``, GPTQ minimises the layer
output error ``||X W^T - X W~^T||^2`` column by column. With the Hessian of that loss
``H = 2/n * X^T X`` (``[in, in]``) and ``U`` the upper Cholesky factor of ``H^-1``
(``H^-1 = U^T U``), quantizing column ``i`` and spreading its error over the columns not
yet quantized is::

    err      = (W[:, i] - W~[:, i]) / U[i, i]                      # [out]
    W[:, j] -= err * U[i, j]                         for j > i

The result is the canonical triple of :mod:`qalora.quant.qparams` (same layout as
:func:`qalora.quant.rtn.rtn_quantize`)::

    W~[o, i] = scale[o, g] * q[o, i] + offset[o, g]      (min-max qparams, float offsets)

Choices: columns stay in natural order (no act-order, so groups stay contiguous columns);
each group's qparams are fixed when the sweep reaches its first column, from the group's
*current* (already error-updated) weights.
"""

from __future__ import annotations

import torch

from qalora.errors import QaloraError
from qalora.quant.qparams import check_bits, check_group_size, dequantize, minmax_qparams, quantize_codes

_CHOLESKY_RETRIES = 4  # damping tried: damp, 10*damp, ..., 10**4 * damp


class HessianAccumulator:
    """Running ``H = 2/n * sum_k x_k x_k^T`` over every input row seen, in one ``[in, in]`` fp32 matrix.

    Uses GPTQ's running-mean form, so ``H`` stays O(1) in magnitude however many rows are
    added: with ``n`` rows seen and a chunk ``X`` of ``m`` rows::

        H <- n / (n + m) * H + 2 / (n + m) * X^T X

    Args:
        in_features: size of the last dimension of the activations.
        device: where ``H`` lives (default CPU); chunks are moved there.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if not isinstance(in_features, int) or in_features <= 0:
            raise QaloraError(f"in_features {in_features!r} must be a positive integer")
        self.in_features = in_features
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add activations ``x: [..., in]`` (any leading dims, any float dtype; computed in fp32)."""
        if x.shape[-1] != self.in_features:
            raise QaloraError(f"activations have last dim {x.shape[-1]}, expected in_features {self.in_features}")
        x2 = x.detach().reshape(-1, self.in_features).to(device=self._h.device, dtype=torch.float32)  # [m, in]
        m = x2.shape[0]
        if m == 0:
            return
        total = self._n + m
        # H = beta * H + alpha * X^T X in one fused call
        self._h.addmm_(x2.T, x2, beta=self._n / total, alpha=2.0 / total)
        self._n = total

    @property
    def n_samples(self) -> int:
        """Number of input rows (tokens) seen."""
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        """``[in, in]`` fp32 ``H = 2/n X^T X`` (the accumulator's own tensor: do not modify it)."""
        if self._n == 0:
            raise QaloraError("no calibration activations were added; the Hessian is undefined")
        return self._h


def _inverse_cholesky_upper(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + d * mean(diag H) * I)^-1``, raising ``d`` tenfold on failure."""
    mean_diag = h.diagonal().mean()
    d = damp
    for _ in range(_CHOLESKY_RETRIES + 1):
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        low, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            up, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if info.item() == 0 and bool(torch.isfinite(up).all()):
                return up
        d = d * 10 if d > 0 else 0.01
    raise QaloraError(
        f"the Hessian of {name} is not positive definite even with damping {d / 10:g}; "
        "use more (or more varied) calibration data"
    )


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, *,
                  damp: float = 0.01, block_size: int = 128, name: str = "weight"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ with min-max group-wise qparams, columns in natural order.

    Args:
        weight: ``[out, in]`` (any float dtype; computed in fp32 on a copy).
        hessian: ``[in, in]`` ``H = 2/n X^T X`` of the layer's inputs (see :class:`HessianAccumulator`).
        bits: 2, 3, 4 or 8.
        group_size: ``L``, must divide ``in``.
        damp: ``H += damp * mean(diag H) * I`` before inversion (retried x10 if still not PD).
        block_size: columns per lazy-update block, rounded down to a multiple of ``L``
            (at least ``L``): ``bs = L * max(1, block_size // L)``. Only speed depends on it.
        name: layer name used in error messages.
    Returns:
        ``codes`` uint8 ``[out, in]``, ``scale`` and ``offset`` fp32 ``[out, in / L]``, as
        :func:`qalora.quant.rtn.rtn_quantize`.

    Columns whose ``H[i, i] == 0`` (input always zero) are dead: they get ``H[i, i] = 1`` and
    ``W[:, i] = 0``, as in the reference implementation.

    Blocks are whole groups so that a group's qparams, taken when the sweep reaches its first
    column, see the current weights of all its columns: the errors of a block reach the
    columns after it only when the block ends (one matmul), so the part of a group lying in
    the next block would still miss them and the group would be measured on stale weights.

    With a constant diagonal ``H`` the off-diagonal entries of ``U`` are exactly zero, no
    error propagates, and the result equals :func:`rtn_quantize` bit for bit.
    """
    check_bits(bits)
    if weight.dim() != 2:
        raise QaloraError(f"{name} must be a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    check_group_size(group_size, in_f, name)
    if tuple(hessian.shape) != (in_f, in_f):
        raise QaloraError(f"Hessian of {name} has shape {tuple(hessian.shape)}, expected ({in_f}, {in_f})")
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise QaloraError(f"damp {damp!r} must be a number >= 0 (typical: 0.01)")
    if not isinstance(block_size, int) or block_size <= 0:
        raise QaloraError(f"block_size {block_size!r} must be a positive integer (typical: 128)")

    # Work transposed, wt[i] = W[:, i], so that a column and its rank-1 updates are contiguous.
    wt = weight.detach().to(torch.float32).T.clone(memory_format=torch.contiguous_format)  # [in, out]
    h = hessian.detach().to(device=wt.device, dtype=torch.float32, copy=True)   # [in, in]
    if not bool(torch.isfinite(h).all()):
        raise QaloraError(f"the Hessian of {name} has inf or NaN entries")
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    wt[dead] = 0.0
    u = _inverse_cholesky_upper(h, damp, name)                                 # [in, in], H^-1 = U^T U
    del h

    n_groups = in_f // group_size
    codes_t = torch.empty(in_f, out_f, dtype=torch.uint8, device=wt.device)     # [in, out]
    scale_t = torch.empty(n_groups, out_f, dtype=torch.float32, device=wt.device)
    offset_t = torch.empty(n_groups, out_f, dtype=torch.float32, device=wt.device)
    bs = group_size * max(1, block_size // group_size)

    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = wt[i1:i2]                               # [b, out] view of the block, updated in place
        err1 = torch.empty_like(w1)                  # [b, out] scaled errors of the block
        u1 = u[i1:i2, i1:i2]                         # [b, b]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:                # first column of a group: fix its qparams
                g = col // group_size
                s, o = minmax_qparams(w1[i:i + group_size].T, bits)    # [out], [out]
                scale_t[g] = s
                offset_t[g] = o
            wc = w1[i]                                                 # [out] = W[:, col]
            q = quantize_codes(wc, s, o, bits)                         # [out] uint8
            codes_t[col] = q
            e = err1[i]
            torch.sub(wc, q.float().mul_(s).add_(o), out=e).div_(u1[i, i])
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1.0)         # lazy: only inside the block
        if i2 < in_f:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)          # rest of the matrix at once
    codes, scale, offset = codes_t.T.contiguous(), scale_t.T.contiguous(), offset_t.T.contiguous()
    return codes, scale, offset


def layer_output_error(weight: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor, group_size: int) -> float:
    """Mean squared error between ``x W^T`` and ``x W~^T`` over all elements, ``W~`` = dequantized codes.

    Args:
        weight: ``[out, in]``; x: ``[..., in]``; codes ``[out, in]``; scale, offset ``[out, in / L]``.
    Returns:
        ``mean((x (W - W~)^T)^2)`` as a Python float (computed in fp32).
    """
    delta = weight.float() - dequantize(codes, scale, offset, group_size)     # [out, in]
    y = x.reshape(-1, x.shape[-1]).float() @ delta.T                          # [n, out]
    return float(y.square().mean())
