"""qalora: quantization-aware LoRA — fine-tune group-wise quantized LLMs (INT2/3/4/8) and merge
the adapters into the quantized weights exactly.

The package imports lazily: ``import qalora`` (and ``qalora --help``) loads nothing heavy; each
name below is imported from its module on first use."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LoraConfig": "qalora.config", "QuantConfig": "qalora.config", "TrainConfig": "qalora.config",
    "QaloraError": "qalora.errors", "QuantLinear": "qalora.nn.quant_linear", "QuantizedWeight": "qalora.quant.weight",
    "evaluate": "qalora.api", "generate": "qalora.api", "load_model_and_tokenizer": "qalora.api",
    "quantize": "qalora.api", "load": "qalora.checkpoint", "save_checkpoint": "qalora.checkpoint",
    "quantize_model": "qalora.quant.model", "train": "qalora.training.loop", "merge": "qalora.merging.command",
    "pipeline": "qalora.stages.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qalora' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
