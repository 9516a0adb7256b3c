"""What an adapter kind is: what it trains, computes and merges (the record every kind fills in).

A layer's frozen base is the canonical triple of a group-wise quantized weight, per (row ``o``,
group ``g`` of ``L`` contiguous input columns)::

    W~[o, i] = scale[o, g] * q[o, i] + offset[o, g]

An adapter kind either rewrites that triple (``transform``: new float codes, scale or offset,
differentiable in the kind's parameters) or adds an output of its own (``output``, e.g. QA-LoRA's
pooled low-rank path). A kind merges exactly when what it learns lands on the triple: codes stay
integers in ``[0, 2^b - 1]``, scale and offset stay floats per (row, group). ``changes`` says which
of ``codes``, ``scale``, ``offset`` a kind may change; the merge refuses anything else. A kind whose
``changes`` is empty (standard LoRA's dense ``B A``) is a baseline: it merges only lossily, by
re-quantization.

The registry itself is ``qalora.adapters.kinds.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

PARTS = ("codes", "scale", "offset")


@dataclass
class Triple:
    """The group-wise affine weight a layer computes with.

    Attributes:
        codes: ``[out, in]`` float codes (integers for a mergeable kind; ``q`` of the base, or
            ``q + dq`` after a code-changing kind).
        scale, offset: ``[out, G]`` with ``G = in / L``.
        group_size: ``L``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int

    def weight(self) -> torch.Tensor:
        """``[out, in]`` dense ``scale * codes + offset`` in the triple's dtype."""
        out_f, in_f = self.codes.shape
        L = self.group_size
        w = self.codes.reshape(out_f, in_f // L, L) * self.scale.unsqueeze(-1) + self.offset.unsqueeze(-1)
        return w.reshape(out_f, in_f)


@dataclass(frozen=True)
class Kind:
    """One kind of adaptation.

    Attributes:
        name: the registry key (``qalora``, ``scales``, ``lota``, ``lora``).
        changes: which of ``codes``, ``scale``, ``offset`` its exact merge may change; ``()`` for
            a kind that needs a dense delta (merges only by re-quantization).
        needs: the base it needs, in words (for errors).
        matches: accepts a base layer.
        build: ``build(layer, config)`` registers the kind's parameters on the adapted layer.
        state_keys: parameter names (relative to the layer) saved in the adapter file.
        ternary: the state keys trained by t-SignSGD (integers in {-1, 0, 1}); the others by AdamW.
        transform: ``transform(layer, triple) -> triple``, differentiable in the parameters.
        output: ``output(layer, x [..., in]) -> [..., out]`` added to the layer's output.
        offset_delta: ``offset_delta(layer) -> [out, G]`` fp64: the exact offset change that
            equals ``output`` (needed for an output kind to merge exactly).
    """

    name: str
    changes: tuple[str, ...]
    needs: str
    matches: Callable[[nn.Module], bool]
    build: Callable
    state_keys: tuple[str, ...]
    ternary: tuple[str, ...] = ()
    transform: Callable | None = None
    output: Callable | None = None
    offset_delta: Callable | None = None

    def __post_init__(self) -> None:
        if not set(self.changes) <= set(PARTS):
            raise ValueError(f"kind {self.name}: changes {self.changes} must be among {PARTS}")
        if self.output is not None and self.changes and self.offset_delta is None:
            raise ValueError(f"kind {self.name}: an exact output kind needs offset_delta")

    @property
    def exact(self) -> bool:
        return bool(self.changes)


