"""Standard LoRA (Hu et al. 2021), the baselines' adapter: ``y += s * B(A(dropout(x)))`` with
``A: [r, in]``, ``B: [out, r]``, ``s = alpha / r``, ``B`` zero-initialised.

Its update ``s * B A`` is a dense ``[out, in]`` matrix: it does not land on a group-wise triple,
so it has no exact merge (``changes = ()``). It merges in full precision and is quantized again
(``qalora merge --requantize``), which is where the QLoRA baselines lose accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from qalora.adapters.kinds.base import Kind
from qalora.adapters.kinds.qalora import init_pair


def _dense_or_nf4(m: nn.Module) -> bool:
    return type(m) is nn.Linear or type(m).__name__ == "NF4Linear"


def build(layer, config) -> None:
    layer.lora_A = nn.Linear(layer.in_features, config.rank, bias=False)
    layer.lora_B = nn.Linear(config.rank, layer.out_features, bias=False)
    init_pair(layer.lora_A, layer.lora_B)


def output(layer, x: torch.Tensor) -> torch.Tensor:
    # x: [..., in] -> [..., out]
    return layer.scaling * layer.lora_B(layer.lora_A(layer.dropout(x).to(layer.lora_A.weight.dtype)))


@torch.no_grad()
def dense_delta(layer) -> torch.Tensor:
    """``s * B @ A``: ``[out, in]`` fp32 (the lossy merge adds it to the dense base weight)."""
    return layer.scaling * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())


LORA = Kind(name="lora", changes=(), needs="an unquantized nn.Linear or an NF4 base layer", matches=_dense_or_nf4,
            build=build, state_keys=("lora_A.weight", "lora_B.weight"), output=output)
