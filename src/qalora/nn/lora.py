"""Adapters around a frozen base layer: QA-LoRA (group-pooled input) and standard LoRA.

QA-LoRA (Xu et al. 2023), on a ``QuantLinear`` with group size ``L``::

    pooled = mean of x over each group of L consecutive input features   # [..., in] -> [..., in/L]
    y      = base(x) + s * B(A(dropout(pooled)))                          # A: [r, in/L], B: [out, r]

with ``s = alpha / r`` and ``B`` zero-initialised (the adapter starts as a no-op). Because the
pooled input is a mean, the adapter adds ``s * (B A)[o, g] / L`` to every weight of group ``g``
in row ``o``: a per-(row, group) constant that folds exactly into the float offsets.

Standard LoRA (the QLoRA and 16-bit baselines): ``y = base(x) + s * B(A(dropout(x)))``,
``A: [r, in]`` — ``L`` times more parameters in ``A`` than QA-LoRA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qalora.errors import QaloraError


def _init_pair(a: nn.Linear, b: nn.Linear) -> None:
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as PEFT / the original LoRA code
    nn.init.zeros_(b.weight)


class QALoRALinear(nn.Module):
    """QA-LoRA on a frozen group-wise quantized ``base``; the group size is read from it.

    Parameters: ``lora_A.weight [r, in/L]``, ``lora_B.weight [out, r]``. The base keeps its
    packed buffers and receives no gradient.
    """

    def __init__(self, base: nn.Module, rank: int = 64, alpha: float = 16.0, dropout: float = 0.0, name: str = "layer"):
        super().__init__()
        group_size = getattr(base, "group_size", None)
        if group_size is None or not hasattr(base, "offset"):
            raise QaloraError(f"QA-LoRA needs a group-wise affine quantized base layer (INTn with float offsets) at "
                              f"{name}, got {type(base).__name__}; quantize with 'qalora quantize' (rtn or gptq) first")
        if getattr(base, "g_idx", None) is not None:
            raise QaloraError(f"{name} stores an input-column permutation (act-order); QA-LoRA needs groups of "
                              "contiguous columns: quantize without act-order")
        in_f, out_f = base.in_features, base.out_features
        if in_f % group_size:
            raise QaloraError(f"group_size {group_size} does not divide in_features {in_f} of {name}")
        self.base, self.group_size = base, group_size
        self.in_features, self.out_features, self.rank, self.alpha = in_f, out_f, rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(in_f // group_size, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_f, bias=False)
        _init_pair(self.lora_A, self.lora_B)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., in/L]``: mean over each group of L consecutive features."""
        return x.reshape(*x.shape[:-1], self.in_features // self.group_size, self.group_size).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]
        y = self.base(x)                                              # [..., out]
        a = self.lora_A(self.dropout(self.pool(x)).to(self.lora_A.weight.dtype))   # [..., r]
        return y + (self.scaling * self.lora_B(a)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, group_size={self.group_size}"


class LoRALinear(nn.Module):
    """Standard LoRA on a frozen ``base`` (``QuantLinear``, ``NF4Linear`` or ``nn.Linear``).

    Parameters: ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``.
    """

    def __init__(self, base: nn.Module, rank: int = 64, alpha: float = 16.0, dropout: float = 0.0, name: str = "layer"):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features, self.rank, self.alpha = base.in_features, base.out_features, rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False)
        _init_pair(self.lora_A, self.lora_B)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)                                              # [..., out]
        a = self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))  # [..., r]
        return y + (self.scaling * self.lora_B(a)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"
