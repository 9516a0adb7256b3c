"""Loading full-precision Hugging Face models and tokenizers from local folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qalora.default_model import resolve_model
from qalora.errors import QaloraError
from qalora.quiet import import_transformers

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")

import_transformers()  # before any model load imports torchao noisily


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise QaloraError(f"could not load a tokenizer from {str(path)!r} ({str(e).splitlines()[0]})") from None


def load_fp_model(name_or_path: str | os.PathLike | None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, folder)`` for ``"default"``/``None`` (the embedded model) or a local
    HF folder of a Llama/Mistral/Qwen2-style decoder. Never downloads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(str(folder))
    if config.model_type not in SUPPORTED_TYPES:
        raise QaloraError(f"model type {config.model_type!r} of {str(folder)!r} is not supported; "
                          f"use a {', '.join(SUPPORTED_TYPES)} decoder")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError) as e:
        raise QaloraError(f"could not load model weights from {str(folder)!r} ({str(e).splitlines()[0]})") from None
    return model.eval(), load_tokenizer(folder), Path(folder)
