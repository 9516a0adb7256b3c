"""``QuantLinear``: a linear layer whose weight is stored bit-packed with float scale/offset."""

from __future__ import annotations

import torch
from torch import nn

from qalora.kernels.reference import dequantized_weight
from qalora.kernels.registry import KERNEL_CHOICES, select_kernel
from qalora.nn.frozen import frozen_linear
from qalora.quant.packing import check_bits, packed_len  # every stored width (imports: 5, 6)
from qalora.quant.qparams import check_group_size
from qalora.quant.weight import QuantizedWeight


class QuantLinear(nn.Module):
    """``y = x W~^T + b`` with ``W~ = scale * q + offset`` per (row, group of L input columns).

    Buffers (saved in ``state_dict``; the base is frozen, so nothing here is a Parameter):
        qweight: uint8 ``[out, packed_len(in, bits)]`` bit-packed codes.
        scale, offset: fp32 ``[out, in / L]``.
        bias: ``[out]`` or absent.

    ``kernel`` picks the matmul: ``"auto"`` (int4 tinygemm when bits <= 4, L in {32, 64, 128,
    256} and the shape fits the kernel; else reference), ``"int4"`` or ``"reference"``. A kernel's repacked weights are cached per device and rebuilt when the
    buffers change (e.g. after a merge writes new offsets).

    ``bind_kernel(rows, device)`` fixes the kernel and its prepared state for the no-grad calls
    that follow (the decode loop's hot path: no kernel selection, no cache-key check per call,
    and nothing that stops ``torch.compile`` from tracing the call); ``unbind_kernel()`` ends it.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device=None, bias_dtype: torch.dtype = torch.float32, kernel: str = "auto", name: str = "weight"):
        super().__init__()
        check_bits(bits)
        check_group_size(group_size, in_features, name)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.kernel = kernel
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self._kernel_state: dict = {}
        self._bound = None

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        if name not in KERNEL_CHOICES:
            raise ValueError(f"kernel {name!r} is unknown; use one of {', '.join(KERNEL_CHOICES)}")
        self._kernel = name

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str = "auto") -> "QuantLinear":
        m = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, bias=bias is not None,
                device="meta", kernel=kernel)
        m.qweight, m.scale, m.offset = qw.packed, qw.scale, qw.offset
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def quantized_weight(self) -> QuantizedWeight:
        """The buffers as a typed record (shares storage)."""
        return QuantizedWeight(self.qweight, self.scale, self.offset, self.bits, self.group_size, self.in_features)

    def _state_for(self, kernel, device: torch.device) -> dict:
        key = (kernel.name, str(device), self.qweight.data_ptr(), self.qweight._version,
               self.scale.data_ptr(), self.scale._version, self.offset.data_ptr(), self.offset._version)
        cached = self._kernel_state.get(kernel.name)
        if cached is None or cached[0] != key:
            cached = (key, kernel.prepare(self, device))
            self._kernel_state[kernel.name] = cached
        return cached[1]

    def has_kernel_state(self, kernel: str) -> bool:
        """Whether repacked weights for ``kernel`` are cached on this layer."""
        return kernel in self._kernel_state

    def drop_kernel_state(self, kernel: str | None = None) -> None:
        """Forget the repacked weights of ``kernel`` (all kernels when ``None``); rebuilt on next use."""
        if kernel is None:
            self._kernel_state.clear()
        else:
            self._kernel_state.pop(kernel, None)

    def bind_kernel(self, rows: int, device: torch.device) -> None:
        """Use the kernel ``kernel`` selects for ``rows`` input rows, with its state prepared
        now, for every no-grad call until ``unbind_kernel`` (the buffers must not change meanwhile)."""
        kernel = select_kernel(self, device, rows, self._kernel)
        self._bound = (kernel.matmul, self._state_for(kernel, device))

    def unbind_kernel(self) -> None:
        self._bound = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` dense ``scale * q + offset`` (one layer, for backward or inspection)."""
        return dequantized_weight(self, dtype)

    def base_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [M, in] -> [M, out]`` through the selected kernel, no bias, no autograd."""
        kernel = select_kernel(self, x2.device, x2.shape[0], self._kernel)
        with torch.no_grad():
            return kernel.matmul(x2, self, self._state_for(kernel, x2.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> y: [..., out]
        lead = x.shape[:-1]
        bound = self._bound
        if bound is not None and not torch.is_grad_enabled():
            y = bound[0](x.reshape(-1, self.in_features), self, bound[1])  # [M, out]
        else:
            y = frozen_linear(x.reshape(-1, self.in_features), self)  # [M, out]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self._kernel}")
