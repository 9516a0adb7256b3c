"""Matmul kernels for group-wise quantized weights, chosen by an ordered registry.

Every kernel computes ``y = x W~^T`` for ``x [M, in]`` and the weight of a ``QuantLinear``
and shares one signature (see ``registry.Kernel``). ``reference`` (unpack, dequantize, fp32
GEMM) works for every width and group size; ``int4`` uses PyTorch's tinygemm int4 kernels;
``dense`` is ``reference`` with the dequantized weight cached (fast, 32 bits per weight).
"""

import importlib

_EXPORTS = ("KERNELS", "Kernel", "get_kernel", "select_kernel")  # from .registry, imported on first use (torch)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module("qalora.kernels.registry"), name)
    raise AttributeError(f"module 'qalora.kernels' has no attribute {name!r}")

__all__ = ["KERNELS", "Kernel", "get_kernel", "select_kernel"]
