"""Reference kernel: unpack the codes, dequantize in fp32, one dense GEMM.

Works for every width and group size, in fp32 (the exact path: merge verification and GPTQ
calibration use it). It dequantizes the whole layer per call, so it is the slow path
(``benchmarks/kernels.py``); ``auto`` uses it only where the int4 kernel cannot run.
"""

from __future__ import annotations

import torch

from qalora.quant.qparams import dequantize
from qalora.quant.packing import unpack


def dequantized_weight(module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[out, in]`` dense ``scale * q + offset`` of a ``QuantLinear``'s buffers."""
    codes = unpack(module.qweight, module.in_features, module.bits)
    return dequantize(codes, module.scale, module.offset, module.group_size, dtype)


def reference_supports(module, device: torch.device) -> bool:
    return True


def reference_prepare(module, device: torch.device) -> dict:
    return {}


def reference_matmul(x: torch.Tensor, module, state: dict) -> torch.Tensor:
    """``x [M, in]`` → ``[M, out]`` in ``x.dtype`` (computed in fp32; in fp64 for fp64 ``x``)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantized_weight(module, work)
    return (x.to(work) @ w.t()).to(x.dtype)
