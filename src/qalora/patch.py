"""Find a transformers model's linear layers and swap them, through a small registry.

``REPLACEMENTS`` is an ordered list of ``(matches, build)``: the first entry whose ``matches``
accepts a module decides how it is replaced (PEFT's ``dispatch_*`` pattern, no mixins).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from qalora.errors import QaloraError
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.weight import QuantizedWeight

Replacement = tuple[Callable[[nn.Module], bool], Callable[[nn.Module, QuantizedWeight], nn.Module]]


def _linear_to_quant(module: nn.Linear, qw: QuantizedWeight) -> QuantLinear:
    return QuantLinear.from_quantized(qw, module.bias)


REPLACEMENTS: list[Replacement] = [
    (lambda m: type(m) is nn.Linear, _linear_to_quant),
]


def replacement_for(module: nn.Module, qw: QuantizedWeight) -> nn.Module:
    for matches, build in REPLACEMENTS:
        if matches(module):
            return build(module, qw)
    raise QaloraError(f"no quantized replacement is registered for {type(module).__name__}")


def is_quantizable(module: nn.Module) -> bool:
    return any(matches(module) for matches, _ in REPLACEMENTS)


def find_linears(root: nn.Module, skip: tuple[str, ...] = ("lm_head",), prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every quantizable layer under ``root``, in module order,
    except names ending with one of ``skip``."""
    found = []
    for name, m in root.named_modules(prefix=prefix):
        if name and is_quantizable(m) and not any(name == s or name.endswith("." + s) for s in skip):
            found.append((name, m))
    return found


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks (``model.model.layers`` for Llama/Mistral/Qwen2)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n) and name.endswith("layers"):
            return m
    raise QaloraError(f"{type(model).__name__} has no decoder layer stack (expected a Llama/Mistral/Qwen2-style model)")


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Choose the matmul kernel of every ``QuantLinear`` (``auto``, ``int4`` or ``reference``)."""
    for m in quant_layers(model).values():
        m.kernel = kernel


@torch.no_grad()
def quantized_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes of quantized weights (codes + scale + offset), weights that count, and other tensors."""
    q = sum(m.quantized_weight().nbytes for m in quant_layers(model).values())
    n_weights = sum(m.in_features * m.out_features for m in quant_layers(model).values())
    seen, other = set(), 0
    qnames = {f"{n}.{b}" for n in quant_layers(model) for b in ("qweight", "scale", "offset")}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in qnames or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        other += t.numel() * t.element_size()
    return {"quantized_bytes": q, "quantized_weights": n_weights, "other_bytes": other}
