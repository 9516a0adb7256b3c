"""Decoding: a KV-cache token loop (``loop``), the one-token step with its kernels
bound and optionally compiled (``step``), sampling (``sampling``), an in-memory quantized
output head (``head``) and the prompt's token ids (``prompt``)."""

from qalora.decode.head import quantize_head
from qalora.decode.loop import decode
from qalora.decode.prompt import prompt_ids

__all__ = ["decode", "prompt_ids", "quantize_head"]
