"""Ordered kernel registry: the first kernel that supports a layer (and the batch size) wins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qalora.errors import QaloraError
from qalora.kernels import dense, int4, reference
from qalora.kernels.names import KERNEL_CHOICES, KERNEL_NAMES


@dataclass(frozen=True)
class Kernel:
    """One way to compute ``y = x W~^T`` for a ``QuantLinear``.

    Attributes:
        name: what users pass as ``kernel=``.
        supports: ``(module, device) -> bool``.
        prepare: ``(module, device) -> state`` — one-time repacking, cached by the module and
            rebuilt when its buffers change.
        matmul: ``(x [M, in], module, state) -> [M, out]``.
        max_rows: under ``kernel="auto"`` the kernel is used only for ``M <= max_rows``
            (``None``: any M).
    """

    name: str
    supports: Callable[[torch.nn.Module, torch.device], bool]
    prepare: Callable[[torch.nn.Module, torch.device], dict]
    matmul: Callable[[torch.Tensor, torch.nn.Module, dict], torch.Tensor]
    max_rows: dict | None = None


# Measured here (benchmarks/results/kernels.json, AVX2, 2 threads) the int4 kernel beats unpack +
# dequantize + fp32 GEMM in 13 of 15 shape x row-count cells (the README lists the two exceptions),
# so it takes every M it supports; ``max_rows`` lets a machine where dense GEMM wins for large M say so.
KERNELS: list[Kernel] = [
    Kernel("int4", int4.int4_supports, int4.int4_prepare, int4.int4_matmul),
    Kernel("reference", reference.reference_supports, reference.reference_prepare, reference.reference_matmul),
    # after reference, so "auto" never picks it: it holds a dense fp32 copy of the weight
    Kernel("dense", dense.dense_supports, dense.dense_prepare, dense.dense_matmul),
]

if tuple(k.name for k in KERNELS) != KERNEL_NAMES:  # one list of names, kept where the CLI reads it without torch
    raise ImportError(f"kernels.names.KERNEL_NAMES {KERNEL_NAMES} differs from the registry's kernels")


def get_kernel(name: str) -> Kernel:
    for k in KERNELS:
        if k.name == name:
            return k
    raise QaloraError(f"kernel {name!r} is unknown; use one of {', '.join(KERNEL_CHOICES)}")


def select_kernel(module, device: torch.device, rows: int, requested: str = "auto") -> Kernel:
    """Pick the kernel for ``rows`` input rows: a named one (refused if it cannot run this
    layer), or under ``"auto"`` the first registered kernel that supports it."""
    if requested != "auto":
        k = get_kernel(requested)
        if not k.supports(module, device):
            raise QaloraError(
                f"kernel {requested!r} cannot run a {module.bits}-bit g{module.group_size} "
                f"{module.out_features}x{module.in_features} layer on {device.type}; use 'auto' or 'reference'")
        return k
    for k in KERNELS:
        limit = (k.max_rows or {}).get(device.type)
        if (limit is None or rows <= limit) and k.supports(module, device):
            return k
    raise QaloraError(f"no kernel supports this layer on {device.type}")  # unreachable: reference supports all
