"""Learnable scales (PEQA, Kim et al. 2023; EfficientQAT's E2E-QP phase): train the step size of
every (row, group), codes and offsets frozen.

The scale is log-parametrised, so it stays positive by construction::

    scale'[o, g] = fp32( scale[o, g] * exp(log_scale[o, g]) )     # log_scale: [out, G], starts at 0

and the forward computes with ``W~ = scale' * q + offset``. The rounding to fp32 is part of the
layer's function: what it computes with is exactly what the merge stores, so the merge is exact
(``exp(0) = 1``: an untrained adapter leaves the scale bit-identical).
"""

from __future__ import annotations

import torch
from torch import nn

from qalora.adapters.kinds.base import Kind, Triple
from qalora.adapters.kinds.qalora import is_group_affine


def build(layer, config) -> None:
    layer.log_scale = nn.Parameter(torch.zeros(layer.out_features, layer.in_features // layer.group_size))


def transform(layer, t: Triple) -> Triple:
    scale = t.scale * torch.exp(layer.log_scale.to(t.scale.dtype))
    scale = scale.to(torch.float32).to(t.scale.dtype)          # what fp32 storage holds
    return Triple(t.codes, scale, t.offset, t.group_size)


SCALES = Kind(name="scales", changes=("scale",), needs="a group-wise INTn QuantLinear (qalora quantize)",
              matches=is_group_affine, build=build, state_keys=("log_scale",), transform=transform)
