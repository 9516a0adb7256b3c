"""Attach adapters to a model's projections and move their weights in and out.

``ADAPTERS`` maps a training method to ``(base matches, adapter class)``: ``qalora`` wraps
group-wise affine ``QuantLinear`` layers in ``QALoRALinear``; ``qlora`` wraps ``NF4Linear`` in
``LoRALinear``; ``lora`` wraps plain ``nn.Linear`` in ``LoRALinear``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from qalora.config import LoraConfig
from qalora.errors import QaloraError
from qalora.nn.lora import LoRALinear, QALoRALinear
from qalora.nn.quant_linear import QuantLinear
from qalora.patch import set_submodule


def _is_nf4(m: nn.Module) -> bool:
    return type(m).__name__ == "NF4Linear"


ADAPTERS: dict[str, tuple[Callable[[nn.Module], bool], type, str]] = {
    "qalora": (lambda m: isinstance(m, QuantLinear), QALoRALinear, "a group-wise INTn QuantLinear (qalora quantize)"),
    "qlora": (_is_nf4, LoRALinear, "an NF4 base layer"),
    "lora": (lambda m: type(m) is nn.Linear, LoRALinear, "an unquantized nn.Linear"),
}
ADAPTER_TYPES = (QALoRALinear, LoRALinear)


def add_adapters(model: nn.Module, method: str, config: LoraConfig) -> list[str]:
    """Freeze ``model`` and wrap every target projection; returns the wrapped module names.

    Refuses a target whose base does not fit the method (e.g. ``qalora`` on a dense layer).
    """
    if method not in ADAPTERS:
        raise QaloraError(f"method {method!r} is unknown; use one of {', '.join(ADAPTERS)}")
    matches, cls, wants = ADAPTERS[method]
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, m in list(model.named_modules()):
        if not any(name.endswith("." + t) or name == t for t in config.targets) or isinstance(m, ADAPTER_TYPES):
            continue
        if not matches(m):
            raise QaloraError(f"method {method!r} needs {wants} at {name}, found {type(m).__name__}")
        set_submodule(model, name, cls(m, rank=config.rank, alpha=config.alpha, dropout=config.dropout, name=name))
        names.append(name)
    if not names:
        raise QaloraError(f"no module matches targets {', '.join(config.targets)}; "
                          "name projections such as q_proj, v_proj, down_proj")
    return names


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A.weight": A, "<module>.lora_B.weight": B}`` (fp32, contiguous copies)."""
    out = {}
    for name, m in adapter_layers(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().clone()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().clone()
    return out


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into a model that already has the same adapters attached."""
    layers = adapter_layers(model)
    want = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    if set(state) != want:
        extra, missing = sorted(set(state) - want), sorted(want - set(state))
        raise QaloraError(f"adapter tensors do not match the model: missing {missing[:2]}, unexpected {extra[:2]}")
    for key, t in state.items():
        mod, ab = key.rsplit(".lora_", 1)
        p = getattr(layers[mod], f"lora_{ab[0]}").weight
        if p.shape != t.shape:
            raise QaloraError(f"adapter tensor {key} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        p.copy_(t)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
