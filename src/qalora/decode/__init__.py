"""Decoding: a KV-cache token loop (``loop``), the one-token step with its kernels
bound and optionally compiled (``step``), sampling (``sampling``) and an in-memory quantized
output head (``head``)."""

from qalora.decode.head import quantize_head
from qalora.decode.loop import decode

__all__ = ["decode", "quantize_head"]
