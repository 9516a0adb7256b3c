"""The optimizers of one run: AdamW (constant LR after linear warmup) for float adapter
parameters, t-SignSGD for ternary ones, one object to step, clip, save and restore."""

from __future__ import annotations

import torch

from qalora.adapters.attach import adapter_parameters, ternary_parameter_names
from qalora.config import TrainConfig
from qalora.training.distributed import full, full_state, shard_like
from qalora.training.tsignsgd import TSignSGD


class Optimizers:
    """``adamw`` over the float parameters (``None`` if there are none), ``tsign`` over the
    ternary ones (``None`` likewise); gradient clipping applies to the float parameters only
    (t-SignSGD uses signs and ranks, which clipping does not change)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        params = adapter_parameters(model)
        ternary = ternary_parameter_names(model)
        self.float_params = [p for k, p in params.items() if k not in ternary and p.requires_grad]
        self.ternary_params = [p for k, p in params.items() if k in ternary and p.requires_grad]
        self.adamw = self.scheduler = self.tsign = None
        if self.float_params:
            self.adamw = torch.optim.AdamW(self.float_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            warm = cfg.warmup_steps
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.adamw, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0)
        if self.ternary_params:
            self.tsign = TSignSGD(self.ternary_params, cfg.steps, cfg.tsign_start, cfg.tsign_mid, cfg.tsign_end,
                                  cfg.tsign_ramp)

    def clip(self, max_norm: float) -> float:
        """Clip the float parameters' gradient norm (0: no clipping); returns the norm of all
        gradients before clipping."""
        grads = [p.grad for p in self.float_params + self.ternary_params if p.grad is not None]
        norms = [full(g.norm()) for g in grads]  # a sharded gradient's norm is gathered whole
        total = float(torch.linalg.vector_norm(torch.stack(norms))) if grads else 0.0
        if max_norm > 0 and self.float_params:
            torch.nn.utils.clip_grad_norm_(self.float_params, max_norm)
        return total

    def step(self) -> None:
        for opt in (self.adamw, self.tsign):
            if opt is not None:
                opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for p in self.float_params + self.ternary_params:
            p.grad = None

    @property
    def lr(self) -> float | None:
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else None

    @property
    def ternary_changed(self) -> int | None:
        return self.tsign.last_changed if self.tsign is not None else None

    def state_dict(self) -> dict:
        """Every state whole (sharded optimizer states gathered: all processes must call this), so a
        checkpoint resumes under any number of processes, sharded or not."""
        return {name: None if obj is None else full_state(obj.state_dict())
                for name, obj in (("adamw", self.adamw), ("scheduler", self.scheduler), ("tsign", self.tsign))}

    def load_state_dict(self, state: dict) -> None:
        for name, obj in (("adamw", self.adamw), ("scheduler", self.scheduler), ("tsign", self.tsign)):
            if obj is not None:
                obj.load_state_dict(state[name])
        if self.adamw is not None:  # whole states back onto sharded parameters
            for group in self.adamw.param_groups:
                for p in group["params"]:
                    st = self.adamw.state.get(p, {})
                    for k, v in list(st.items()):
                        st[k] = shard_like(v, p)
