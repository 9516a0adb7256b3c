"""``AdaptedLinear``: a frozen base layer with one or more adapter kinds attached.

For a group-wise quantized base (``QuantLinear``: packed codes ``q``, float ``scale`` and
``offset`` per (row, group)) the layer computes::

    t  = (q, scale, offset)                  # the base's triple
    t  = kind.transform(t)                   # for each triple kind, in registry order
    y  = x (t.scale * t.codes + t.offset)^T  # + bias
    y += kind.output(x)                      # for each output kind (QA-LoRA's pooled path)

A layer without triple kinds runs the base through its own kernel (``y = base(x)``). A layer with
them dequantizes its triple just in time, one layer at a time, in the compute dtype
(:class:`TripleLinear`): nothing dense is kept between forward and backward, the weight is
rebuilt in backward. Parameters are the kinds' (``lora_A``/``lora_B``, ``log_scale``,
``lota_A``/``lota_B``); the base keeps its packed buffers and receives no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from qalora.adapters.kinds.base import Triple
from qalora.adapters.kinds.registry import get_kind, ordered
from qalora.errors import QaloraError
from qalora.quant.packing import unpack


def base_triple(base: nn.Module, dtype: torch.dtype = torch.float32) -> Triple:
    """The base's ``(q, scale, offset)`` as float tensors in ``dtype`` (codes unpacked)."""
    codes = unpack(base.qweight, base.in_features, base.bits).to(dtype)
    return Triple(codes, base.scale.to(dtype), base.offset.to(dtype), base.group_size)


class TripleLinear(torch.autograd.Function):
    """``y = x W^T`` with ``W = layer.effective_triple(dtype).weight()`` built from the layer's
    parameters; backward rebuilds ``W`` (with autograd) instead of saving it:
    ``grad_x = grad_y W``, parameter grads from ``grad_W = grad_y^T x`` (``[out, in]``, one layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer, *params: torch.Tensor) -> torch.Tensor:
        # x: [M, in]
        # ``params`` are the layer's triple parameters, passed only so autograd links them here
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.save_for_backward(x)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            w = layer.effective_triple(work).weight()                             # [out, in]
            return (x.to(work) @ w.t()).to(x.dtype)                               # [M, out]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        params = layer.triple_parameters()
        work = torch.float64 if ctx.x_dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            w = layer.effective_triple(work).weight()                             # [out, in], graph to params
            g = grad_y.to(work)
            grad_w = g.t() @ x.to(work)                                           # [out, in]
            wanted = [p for p in params if p.requires_grad]
            grads = iter(torch.autograd.grad(w, wanted, grad_w, allow_unused=True)) if wanted else iter(())
        grad_x = (g @ w.detach()).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return (grad_x, None, *[next(grads) if p.requires_grad else None for p in params])


class AdaptedLinear(nn.Module):
    """A frozen ``base`` with adapter ``kinds`` (names from the kind registry) attached.

    ``config`` supplies each kind's settings (``rank``, ``alpha``, ``dropout``, ``lota_omega``;
    a :class:`qalora.config.LoraConfig`). The group size, bits and shape are read from the base.
    """

    def __init__(self, base: nn.Module, kinds, config, name: str = "layer"):
        super().__init__()
        self.kinds = ordered(kinds)
        if not self.kinds:
            raise QaloraError(f"{name}: no adapter kind given")
        for k in self.kinds:
            kind = get_kind(k)
            if not kind.matches(base):
                raise QaloraError(f"adapter kind {k!r} needs {kind.needs} at {name}, found {type(base).__name__}"
                                  + ("; quantize with 'qalora quantize' (rtn or gptq) first"
                                     if "QuantLinear" in kind.needs else ""))
        for p in base.parameters():
            p.requires_grad_(False)
        self.base, self.name = base, name
        self.in_features, self.out_features = base.in_features, base.out_features
        self.group_size = getattr(base, "group_size", None)
        self.bits = getattr(base, "bits", None)
        if self.group_size is not None and self.in_features % self.group_size:
            raise QaloraError(f"group_size {self.group_size} does not divide in_features {self.in_features} of {name}")
        self.rank, self.alpha = config.rank, config.alpha
        self.scaling = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for k in self.kinds:
            get_kind(k).build(self, config)

    # --- the kinds ---------------------------------------------------------------------------
    def _kinds(self, hook: str):
        return [kind for kind in map(get_kind, self.kinds) if getattr(kind, hook) is not None]

    @property
    def has_triple_kinds(self) -> bool:
        return bool(self._kinds("transform"))

    def effective_triple(self, dtype: torch.dtype = torch.float32) -> Triple:
        """The base's triple after every triple kind (differentiable in their parameters)."""
        t = base_triple(self.base, dtype)
        for kind in self._kinds("transform"):
            t = kind.transform(self, t)
        return t

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """``{state key: parameter}`` of every kind (the keys saved in the adapter file)."""
        out = {}
        for k in self.kinds:
            for key in get_kind(k).state_keys:
                out[key] = self.get_parameter(key)
        return out

    def triple_parameters(self) -> list[nn.Parameter]:
        """The parameters of the triple kinds, in a fixed order (what :class:`TripleLinear` differentiates)."""
        return [self.get_parameter(key) for kind in self._kinds("transform") for key in kind.state_keys]

    def ternary_keys(self) -> set[str]:
        return {key for k in self.kinds for key in get_kind(k).ternary}

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> y: [..., out]
        if self.has_triple_kinds:
            lead = x.shape[:-1]
            y = TripleLinear.apply(x.reshape(-1, self.in_features), self, *self.triple_parameters()).reshape(*lead, self.out_features)
            if self.base.bias is not None:
                y = y + self.base.bias.to(y.dtype)
        else:
            y = self.base(x)
        for kind in self._kinds("output"):
            y = y + kind.output(self, x).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"kinds={'+'.join(self.kinds)}, rank={self.rank}, alpha={self.alpha}, group_size={self.group_size}"
