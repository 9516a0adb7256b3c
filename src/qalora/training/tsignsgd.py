"""t-SignSGD (LoTA-QAF): the optimizer of ternary parameters (values in {-1, 0, 1}).

Per parameter tensor ``p`` with gradient ``g``, at step ``k`` (1-based) of ``T``::

    thr = quantile_σ(k)(|g|)                                  # per tensor
    p  <- clamp(round(p - sign(g) * [|g| > thr and |g| > τ]), -1, 1)

so only the largest ``1 - σ`` fraction of gradients moves an entry, by one step, with no
learning rate and no state beyond the step count. ``τ = 1e-9`` ignores vanishing gradients
(an entry whose gradient is exactly zero never moves). The quantile rises linearly::

    σ(k) = start + (mid - start) * k / (ramp T)               k <= ramp T
    σ(k) = mid + (end - mid) * (k - ramp T) / ((1 - ramp) T)  afterwards, end from k = T on

with LoTA-QAF's defaults start 0.95, mid 0.999, end 0.9999, ramp 0.8. The quantile is the
``ceil(σ n)``-th smallest ``|g|`` (the nearest-rank quantile, exact for any tensor size).

Under FSDP2 a parameter and its gradient are sharded: the quantile is taken over the whole
gradient (gathered) and each process updates its own shard, so the update is the one a single
process makes.
"""

from __future__ import annotations

import math

import torch

TAU = 1e-9


def sigma_at(step: int, total: int, start: float = 0.95, mid: float = 0.999, end: float = 0.9999,
             ramp: float = 0.8) -> float:
    """``σ(k)`` for 1-based ``step`` of ``total``."""
    knee = ramp * total
    if step <= knee:
        return start + (mid - start) * step / knee
    if step >= total or knee >= total:
        return end
    return mid + (end - mid) * (step - knee) / (total - knee)


def grad_threshold(g: torch.Tensor, sigma: float) -> torch.Tensor:
    """Nearest-rank ``σ``-quantile of ``|g|`` (a 0-d tensor)."""
    a = g.detach().abs().flatten()
    k = min(max(math.ceil(sigma * a.numel()), 1), a.numel())
    return a.kthvalue(k).values


@torch.no_grad()
def tsign_update(p: torch.Tensor, g: torch.Tensor, sigma: float) -> int:
    """One t-SignSGD update of ``p`` in place; returns how many entries changed (on this process's
    shard when ``p`` is sharded)."""
    from qalora.training.distributed import is_sharded

    if is_sharded(g):
        thr = grad_threshold(g.full_tensor(), sigma)
        p, g = p.to_local(), g.to_local()
    else:
        thr = grad_threshold(g, sigma)
    move = (g.abs() > thr) & (g.abs() > TAU)
    new = (p - torch.sign(g) * move.to(p.dtype)).round().clamp(-1, 1)
    changed = int((new != p).sum())
    p.copy_(new)
    return changed


class TSignSGD(torch.optim.Optimizer):
    """t-SignSGD over ternary parameters; ``total_steps`` fixes the σ schedule. Its state (the
    step count) is in ``state_dict`` so a resumed run continues the same schedule."""

    def __init__(self, params, total_steps: int, start: float = 0.95, mid: float = 0.999, end: float = 0.9999,
                 ramp: float = 0.8):
        if total_steps < 1:
            raise ValueError(f"total_steps {total_steps!r} must be at least 1")
        super().__init__(params, dict(total_steps=total_steps, start=start, mid=mid, end=end, ramp=ramp, step=0))
        self.last_changed = 0

    @torch.no_grad()
    def step(self, closure=None):
        changed, sharded = 0, False
        for group in self.param_groups:
            group["step"] += 1
            sigma = sigma_at(group["step"], group["total_steps"], group["start"], group["mid"], group["end"],
                             group["ramp"])
            for p in group["params"]:
                if p.grad is not None:
                    changed += tsign_update(p, p.grad, sigma)
                    sharded = sharded or hasattr(p, "device_mesh")
        if sharded:  # every process counted its own shard
            import torch.distributed as dist

            total = torch.tensor([changed], dtype=torch.int64)
            dist.all_reduce(total)
            changed = int(total)
        self.last_changed = changed
        return None
