"""qalora: quantization-aware LoRA — fine-tune group-wise quantized LLMs (INT2/3/4/8) and merge
the adapters into the quantized weights exactly."""

from qalora.api import evaluate, generate, load_model_and_tokenizer, quantize
from qalora.checkpoint import load, save_checkpoint
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.weight import QuantizedWeight
from qalora.quantize import quantize_model
from qalora.training.loop import train
from qalora.merging.command import merge
from qalora.pipeline import pipeline

__version__ = "0.1.0"
__all__ = ["LoraConfig", "QaloraError", "QuantConfig", "TrainConfig", "train", "QuantLinear", "QuantizedWeight", "evaluate", "generate", "load",
           "load_model_and_tokenizer", "merge", "pipeline", "quantize", "quantize_model", "save_checkpoint"]
