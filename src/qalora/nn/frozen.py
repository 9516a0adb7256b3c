"""Autograd through a frozen quantized base without keeping anything dense alive.

The base weight gets no gradient, so backward only needs ``grad_x = grad_y · W~`` (``[M, out]
@ [out, in]``). ``FrozenLinear`` computes the forward with the layer's kernel and, in
backward, dequantizes that one layer's weight just in time from the packed buffers. It saves
neither the input nor a dequantized weight, so activation memory is that of the adapters only,
and it composes with gradient checkpointing (the forward is simply run again).
"""

from __future__ import annotations

import torch


class FrozenLinear(torch.autograd.Function):
    """``y = base(x)`` for a frozen quantized layer; ``grad_x = grad_y @ W~``.

    ``module`` must offer ``base_matmul(x [M, in]) -> [M, out]`` (no bias) and
    ``dequantized_weight(dtype) -> [out, in]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module) -> torch.Tensor:
        ctx.module = module
        ctx.x_dtype = x.dtype
        return module.base_matmul(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w = ctx.module.dequantized_weight(torch.float32)           # [out, in], freed after this call
        grad_x = (grad_y.float() @ w).to(ctx.x_dtype)               # [M, in]
        return grad_x, None


def frozen_linear(x: torch.Tensor, module) -> torch.Tensor:
    """``x [M, in] -> [M, out]``; differentiable in ``x`` only when grad is needed."""
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenLinear.apply(x, module)
    return module.base_matmul(x)
