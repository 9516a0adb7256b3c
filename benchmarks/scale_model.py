"""The sizes behind ``docs/SCALE.md``: what each stage of qalora holds in memory, as a function of
the model's shape, checked against the measured 135M and 1.1B runs and extrapolated to 7B, 13B
and 70B. Pure arithmetic, no torch; every byte count below is a formula with its assumption.

Shapes: Llama decoder, ``L`` layers, hidden ``h``, MLP ``i``, ``a`` heads of dim ``d = h / a``, ``k``
KV heads, vocabulary ``V``. Per layer the seven projections hold::

    W_layer = 2 h·h (q, o) + 2 h·k·d (k, v) + 3 h·i (gate, up, down)      weights
    W       = L · W_layer                                                 quantized weights
    E       = V·h · (1 if tied else 2)                                     embeddings + head (kept in float)

Quantized storage (qalora's canonical form: codes bit-packed, fp32 scale and offset per group of
``g``): ``packed = W · (b/8 + 8/g)`` bytes; at INT4 g32 that is 0.75 bytes per weight (6 bits).
"""

from __future__ import annotations

import dataclasses

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_weights(self) -> int:
        h, kd = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kd + 3 * h * self.mlp

    @property
    def weights(self) -> int:
        return self.layers * self.layer_weights

    @property
    def embedding_weights(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        return self.weights + self.embedding_weights + (2 * self.layers + 1) * self.hidden

    def linears(self) -> list[tuple[int, int]]:
        """``(in, out)`` of one layer's seven projections."""
        h, kd, i = self.hidden, self.kv_heads * self.head_dim, self.mlp
        return [(h, h), (h, kd), (h, kd), (h, h), (h, i), (h, i), (i, h)]


# The measured shapes (``benchmarks/scale.py``, SmolLM2's 49,152-token vocabulary) and Llama-2's.
MEASURED = {
    "smollm2": Shape("135M (SmolLM2 shape)", 30, 576, 1536, 9, 3, 49152, tied=True),
    "tinyllama": Shape("1.1B (TinyLlama shape)", 22, 2048, 5632, 32, 4, 49152),
}
TARGETS = [
    Shape("7B (Llama-2)", 32, 4096, 11008, 32, 32, 32000),
    Shape("13B (Llama-2)", 40, 5120, 13824, 40, 40, 32000),
    Shape("70B (Llama-2)", 80, 8192, 28672, 64, 8, 32000),
]


def packed_bytes(s: Shape, bits: int = 4, group: int = 32) -> float:
    """Bit-packed codes plus fp32 scale and offset per group."""
    return s.weights * (bits / 8 + 8 / group)


def float_bytes(s: Shape, width: int = 4) -> float:
    """Embeddings and head (and norms) in float: fp32 in qalora's checkpoint."""
    return (s.embedding_weights + (2 * s.layers + 1) * s.hidden) * width


def layer_fp32_bytes(s: Shape) -> float:
    """One decoder layer's projections in fp32: what streaming quantization holds at a time."""
    return 4 * s.layer_weights


def hessian_bytes(s: Shape) -> float:
    """GPTQ's largest Hessian and its inverse (fp32 ``in × in``, twice: ``H`` and its Cholesky factor)."""
    return 2 * 4 * max(i for i, _ in s.linears()) ** 2


def calibration_bytes(s: Shape, tokens: int) -> float:
    """GPTQ's calibration activations: the inputs of the current layer and its outputs, fp32."""
    return 2 * 4 * tokens * s.hidden


def adapter_parameters(s: Shape, rank: int = 64, group: int = 32) -> int:
    """QA-LoRA on all seven projections: ``A [r, in/g]`` and ``B [out, r]`` per projection."""
    return s.layers * sum(rank * (i // group) + o * rank for i, o in s.linears())


def adapter_train_bytes(s: Shape, rank: int = 64, group: int = 32) -> float:
    """Adapter parameters, gradients and AdamW's two moments, all fp32: 16 bytes per parameter."""
    return 16 * adapter_parameters(s, rank, group)


def activation_bytes(s: Shape, tokens: int, checkpointing: bool, width: int = 2) -> float:
    """Activations kept for the backward pass, ``width`` bytes per value (2: bf16).

    Without checkpointing each layer keeps ``34 h`` values' worth per token (Korthikanti et al.
    2022's count for a transformer layer, attention through SDPA / flash so no ``T²`` term); with
    checkpointing each layer keeps only its input (``h`` per token) and one layer at a time
    recomputes its ``34 h``. The head's logits and their gradient (fp32, ``2 V`` per token; qalora
    has no chunked cross-entropy yet) come on top in both cases."""
    per_layer = 34 * s.hidden * width
    kept = (s.layers * s.hidden * width + per_layer) if checkpointing else s.layers * per_layer
    return tokens * (kept + 2 * 4 * s.vocab)


def dequant_layer_bytes(s: Shape, width: int = 2) -> float:
    """The largest projection dequantized for one matmul (the working set of the frozen base)."""
    return width * max(i * o for i, o in s.linears())


def train_step_flops(s: Shape, tokens: int, checkpointing: bool) -> float:
    """Frozen-base fine-tuning: forward ``2 W`` per token, backward through the activations only
    (no weight gradients of the base) ``2 W``, recompute ``2 W`` more with checkpointing; the head
    counts like a layer (``2 V h`` each way); the adapters are < 1 % and left out."""
    per_pass = 2 * (s.weights + s.vocab * s.hidden)
    return tokens * per_pass * (3 if checkpointing else 2)
