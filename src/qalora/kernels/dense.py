"""Dense kernel: the reference kernel's dequantized fp32 weight, built once and cached.

Computes exactly what ``reference`` computes (same dequantize, same fp32 GEMM, so results are
bit-identical) without unpacking the codes on every call, at the price of holding the dense
fp32 weight — 32 bits per weight — while in use. Meant for evaluation runs of many short
forward passes on models that fit; never chosen by ``kernel="auto"`` (it sits after
``reference`` in the registry), only by name.
"""

from __future__ import annotations

import torch

from qalora.kernels.reference import dequantized_weight, reference_matmul


def dense_supports(module, device: torch.device) -> bool:
    return True


def dense_prepare(module, device: torch.device) -> dict:
    """``{"w": [out, in] fp32}`` on ``device`` (rebuilt by the layer when its buffers change)."""
    return {"w": dequantized_weight(module, torch.float32).to(device)}


def dense_matmul(x: torch.Tensor, module, state: dict) -> torch.Tensor:
    """``x [M, in]`` → ``[M, out]`` in ``x.dtype``, computed in fp32 (fp64 for fp64 ``x``)."""
    if x.dtype == torch.float64:  # the cached weight is fp32: go the reference way
        return reference_matmul(x, module, state)
    return (x.float() @ state["w"].t()).to(x.dtype)
