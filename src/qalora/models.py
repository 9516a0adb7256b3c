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


def _auto_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise QaloraError(f"could not load a tokenizer from {str(path)!r} ({str(e).splitlines()[0]})") from None


def load_tokenizer(path: str | os.PathLike, files=None):
    """The tokenizer of the folder ``path``; with ``files`` (a :class:`qalora.io.FileCache`), loaded
    once per command for each distinct tokenizer (copies beside several checkpoints share one)."""
    if files is None or not Path(path).is_dir():
        return _auto_tokenizer(path)
    return files.tokenizer(path, _auto_tokenizer)


def check_model_type(folder: Path) -> None:
    """Refuse a folder whose config is not one of the supported decoder types."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise QaloraError(f"could not read a model config from {str(folder)[-80:]!r} "
                          f"({reason[:80]}{'…' if len(reason) > 80 else ''}); pass a Hugging Face model folder") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise QaloraError(f"model type {config.model_type!r} of {str(folder)!r} is not supported; "
                          f"use a {', '.join(SUPPORTED_TYPES)} decoder")


def load_fp_skeleton(name_or_path: str | os.PathLike | None):
    """``(model, tokenizer, folder, load_layer)``: like :func:`load_fp_model`, but from a folder
    with safetensors the decoder layers stay empty until ``load_layer(i, layer)`` reads one
    (``qalora.quant.streaming``); ``load_layer`` is ``None`` when the model was loaded whole."""
    from qalora.quant.streaming import has_safetensors, layer_loader, skeleton

    folder = resolve_model(name_or_path)
    if not has_safetensors(folder):
        model, tok, folder = load_fp_model(folder)
        return model, tok, folder, None
    check_model_type(folder)
    tok = load_tokenizer(folder)  # before any weights are read
    model, source, prefix = skeleton(folder)
    return model, tok, Path(folder), layer_loader(source, prefix)


def load_fp_model(name_or_path: str | os.PathLike | None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, folder)`` for ``"default"``/``None`` (the embedded model) or a local
    HF folder of a Llama/Mistral/Qwen2-style decoder. Never downloads."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(name_or_path)
    check_model_type(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError) as e:
        raise QaloraError(f"could not load model weights from {str(folder)!r} ({str(e).splitlines()[0]})") from None
    return model.eval(), load_tokenizer(folder), Path(folder)
