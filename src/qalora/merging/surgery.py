"""Module surgery of the merge: swap every adapted layer of a model for its merged ``QuantLinear``."""

from __future__ import annotations

import copy

from torch import nn

from qalora.adapters.layer import AdaptedLinear
from qalora.merging.exact import check_exact, merge_layer
from qalora.patch import set_submodule


def merge_model_inplace(model: nn.Module) -> list[str]:
    """Replace every ``AdaptedLinear`` of ``model`` by its merged ``QuantLinear``; returns the names
    replaced (empty when nothing is left to merge, so a second call is a no-op). Refuses, before
    touching anything, a model holding a kind that does not merge exactly (standard LoRA)."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    for n in names:
        check_exact(model.get_submodule(n), n)
    for n in names:
        set_submodule(model, n, merge_layer(model.get_submodule(n), n))
    return names


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the very same tensors:
    costs no weight memory; merging the copy replaces modules, never edits a shared tensor."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)
