"""Attach adapters to a model's projections and move their parameters in and out.

``add_adapters(model, method, config)`` wraps every target projection in an
:class:`~qalora.adapters.layer.AdaptedLinear` carrying the method's kinds
(:func:`~qalora.adapters.methods.method_kinds`); each kind checks that the base fits it.
State keys are ``<module>.<kind key>`` (``lora_A.weight``, ``log_scale``, ``lota_A`` …), fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from qalora.adapters.layer import AdaptedLinear
from qalora.adapters.methods import method_kinds
from qalora.errors import QaloraError
from qalora.patch import set_submodule


def add_adapters(model: nn.Module, method: str, config) -> list[str]:
    """Freeze ``model`` and wrap every target projection; returns the wrapped module names.

    Refuses a target whose base does not fit the method (e.g. ``qalora`` on a dense layer)."""
    kinds = method_kinds(method, config)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, m in list(model.named_modules()):
        if not any(name.endswith("." + t) or name == t for t in config.targets) or isinstance(m, AdaptedLinear):
            continue
        set_submodule(model, name, AdaptedLinear(m, kinds, config, name=name))
        names.append(name)
    if not names:
        raise QaloraError(f"no module matches targets {', '.join(config.targets)}; "
                          "name projections such as q_proj, v_proj, down_proj")
    return names


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<module>.<key>": parameter}`` of every adapted layer, in module order."""
    return {f"{n}.{k}": p for n, m in adapter_layers(model).items() for k, p in m.adapter_parameters().items()}


def ternary_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in :func:`adapter_parameters`) of the parameters t-SignSGD trains."""
    return {f"{n}.{k}" for n, m in adapter_layers(model).items() for k in m.ternary_keys()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter as an fp32 contiguous copy."""
    return {k: p.detach().float().contiguous().clone() for k, p in adapter_parameters(model).items()}


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model that already has the same adapters attached."""
    params = adapter_parameters(model)
    if set(state) != set(params):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise QaloraError(f"adapter tensors do not match the model: missing {missing[:2]}, unexpected {extra[:2]}")
    for key, t in state.items():
        p = params[key]
        if p.shape != t.shape:
            raise QaloraError(f"adapter tensor {key} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        if not torch.isfinite(t).all():
            raise QaloraError(f"adapter tensor {key} holds non-finite values")
        p.copy_(t)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
