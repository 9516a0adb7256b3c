"""QA-LoRA (Xu et al. 2023): a low-rank adapter on the group-pooled input, folded into the offsets.

On a base with group size ``L`` and ``G = in / L`` groups::

    pooled = mean of x over each group of L consecutive input features   # [..., in] -> [..., G]
    y     += s * B(A(dropout(pooled)))                                    # A: [r, G], B: [out, r]

with ``s = alpha / r`` and ``B`` zero-initialised (the adapter starts as a no-op). Because the
pooled input is a mean, the adapter adds ``s * (B A)[o, g] / L`` to every weight of group ``g``
in row ``o``, a per-(row, group) constant, so the merge is exact::

    offset'[o, g] = offset[o, g] + s * (B @ A)[o, g] / L          # codes and scale unchanged
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qalora.adapters.kinds.base import Kind


def is_group_affine(m: nn.Module) -> bool:
    """A group-wise affine quantized layer with float offsets and contiguous groups."""
    return hasattr(m, "group_size") and hasattr(m, "offset") and hasattr(m, "qweight") \
        and getattr(m, "g_idx", None) is None


def init_pair(a: nn.Linear, b: nn.Linear) -> None:
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as PEFT / the original LoRA code
    nn.init.zeros_(b.weight)


def build(layer, config) -> None:
    groups = layer.in_features // layer.group_size
    layer.lora_A = nn.Linear(groups, config.rank, bias=False)
    layer.lora_B = nn.Linear(config.rank, layer.out_features, bias=False)
    init_pair(layer.lora_A, layer.lora_B)


def pool(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., in] -> [..., in/L]``: mean over each group of L consecutive features."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size).mean(-1)


def output(layer, x: torch.Tensor) -> torch.Tensor:
    # x: [..., in] -> [..., out]
    a = layer.lora_A(layer.dropout(pool(x, layer.group_size)).to(layer.lora_A.weight.dtype))   # [..., r]
    return layer.scaling * layer.lora_B(a)


@torch.no_grad()
def qalora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, group_size: int) -> torch.Tensor:
    """``scaling * (B @ A) / group_size``: ``[out, G]`` in fp64 (``A: [r, G]``, ``B: [out, r]``).

    Added to fp64 offsets and rounded to fp32 once, it gives the fp32 number nearest to the exact
    merged offset (an fp32 delta added in fp32 would round twice)."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"shapes do not chain: A {tuple(A.shape)} needs B [out, {A.shape[0] if A.dim() else '?'}], "
                         f"got B {tuple(B.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size {group_size!r} must be positive")
    return (B.detach().double() @ A.detach().double()) * scaling / group_size


def offset_delta(layer) -> torch.Tensor:
    return qalora_delta(layer.lora_A.weight, layer.lora_B.weight, layer.scaling, layer.group_size)


QALORA = Kind(name="qalora", changes=("offset",), needs="a group-wise INTn QuantLinear (qalora quantize)",
              matches=is_group_affine, build=build, state_keys=("lora_A.weight", "lora_B.weight"),
              output=output, offset_delta=offset_delta)
