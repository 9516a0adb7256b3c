"""GGUF (llama.cpp) names and metadata -> Hugging Face names and config: the inverse of qalora's
GGUF exporter (``qalora.export.gguf``, table ``qalora.export.gguf_arch``). Pure functions of a
GGUF's metadata (``read_gguf(...).metadata()``) and tensor names/shapes; nothing is loaded.

    hf_config_dict(meta, names)  -> transformers config dict (model_type llama / qwen2 / qwen3)
    tensor_map(meta, tensors)    -> {gguf name: HFTensor(hf_name, row_order)}

Architectures (``general.architecture``; the accepted per-block tensors are the exporter's
``BLOCK_TENSORS`` + ``required`` + ``optional`` of ``gguf_arch.ARCHS``):

    general.architecture  model_type  class              Q/K rows   beyond the nine block tensors
    llama                 llama       LlamaForCausalLM   permuted   optional biases (q/k/v/output, ffn)
    qwen2                 qwen2       Qwen2ForCausalLM   HF order   attn_q/attn_k/attn_v biases
    qwen3                 qwen3       Qwen3ForCausalLM   HF order   attn_q_norm, attn_k_norm

A GGUF written from a Mistral model says ``llama`` and is read as a Llama (same graph).

Tensor names (``N`` = block index, ``.weight`` and ``.bias`` alike for the projections):

    token_embd.weight            model.embed_tokens.weight
    output_norm.weight           model.norm.weight
    output.weight                lm_head.weight     (absent: tied embeddings)
    blk.N.attn_norm.weight       model.layers.N.input_layernorm.weight
    blk.N.attn_q / attn_k / attn_v / attn_output
                                 model.layers.N.self_attn.q_proj / k_proj / v_proj / o_proj
    blk.N.attn_q_norm / attn_k_norm.weight
                                 model.layers.N.self_attn.q_norm / k_norm.weight   (qwen3)
    blk.N.ffn_norm.weight        model.layers.N.post_attention_layernorm.weight
    blk.N.ffn_gate / ffn_up / ffn_down
                                 model.layers.N.mlp.gate_proj / up_proj / down_proj

Rotary rule. For ``llama`` only, llama.cpp's converter (and qalora's exporter) store the rows of
Q (``head_count`` heads) and K (``head_count_kv`` heads), weights and biases alike, as
``gguf_rows = hf_rows[rotary_row_order(rows, heads)]`` (``gguf_blocks.rotary_row_order``: each
head's two rotate_half halves interleaved into NORM-RoPE pairs). ``HFTensor.row_order`` is its
inverse permutation, ``argsort(rotary_row_order(rows, heads))``, so ``hf_rows =
gguf_rows[row_order]``. Qwen2/Qwen3 use NEOX RoPE (HF's halves): no reordering, ``None``.
Rows move whole, and GGUF block quantization runs along the columns of each row, so the
reorder commutes with it: reorder the decoded codes, scales and offsets (or the dequantized
matrix) by the same index and the result is the same.

Errors are one-line ``ValueError``s naming the value: an architecture outside the table, a tensor
it does not read, a missing required tensor or key, a Q/K row count that does not match the
heads, partial rotary, RoPE scaling other than linear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import numpy as np

from qalora.export.gguf_arch import ARCHS, BLOCK_TENSORS, GLOBAL_TENSORS, GGUFArch
from qalora.export.gguf_blocks import rotary_row_order

_PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
BLOCK_NAMES = {  # GGUF name after "blk.N." -> HF name after "model.layers.N."
    **{f"{g}.{p}": f"{h}.{p}" for g, h in _PROJ.items() for p in ("weight", "bias")},
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _specs() -> dict[str, GGUFArch]:
    """general.architecture -> the exporter's record (the first, so llama's rather than mistral's)."""
    out: dict[str, GGUFArch] = {}
    for spec in ARCHS.values():
        if spec.name in HF_CLASSES:
            out.setdefault(spec.name, spec)
    return out


SPECS = _specs()
SUPPORTED = tuple(SPECS)
_BLOCK = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)")


@dataclass(frozen=True, eq=False)
class HFTensor:
    """Where a GGUF tensor goes: ``hf_name``, and ``row_order`` (``None`` or a read-only int64
    index array) with ``hf_rows = gguf_rows[row_order]``; rows are the first (PyTorch) dim."""

    hf_name: str
    row_order: np.ndarray | None = None

    def apply(self, rows):
        """``rows[row_order]`` (numpy or torch, indexed along dim 0), or ``rows`` unchanged."""
        return rows if self.row_order is None else rows[self.row_order]


# --------------------------------------------------------------------------- metadata

def _arch(metadata: Mapping[str, Any]) -> tuple[str, GGUFArch]:
    arch = metadata.get("general.architecture")
    if arch not in SPECS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED)} "
                         "(a Mistral GGUF is llama)")
    return arch, SPECS[arch]


def _int(metadata: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = metadata.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key}")
    if isinstance(value, (list, tuple)):  # per-layer arrays (some llama.cpp files): must be uniform
        if not value or len(set(value)) != 1:
            raise ValueError(f"GGUF metadata {key} varies per layer ({value!r}); supported: one value for all layers")
        value = value[0]
    return int(value)


def _f32(value) -> float:
    """A float32-stored value as the shortest decimal that round-trips float32 (1e-6 stays 1e-6,
    not 9.99999997e-07); a value that is not a float32 is returned as it is."""
    value = float(value)
    return float(str(np.float32(value))) if float(np.float32(value)) == value else value


def _attention(metadata: Mapping[str, Any], arch: str) -> tuple[int, int, int, int]:
    """``(hidden, heads, kv_heads, head_dim)``; head_dim = key_length or hidden // heads."""
    hidden = _int(metadata, f"{arch}.embedding_length")
    heads = _int(metadata, f"{arch}.attention.head_count")
    kv = _int(metadata, f"{arch}.attention.head_count_kv", heads)
    if heads <= 0 or kv <= 0 or heads % kv:
        raise ValueError(f"GGUF {arch}.attention.head_count {heads} is not a multiple of head_count_kv {kv}")
    key = metadata.get(f"{arch}.attention.key_length")
    if key is None and hidden % heads:
        raise ValueError(f"GGUF {arch}.embedding_length {hidden} does not split into {heads} heads "
                         "and there is no attention.key_length")
    head_dim = int(key) if key is not None else hidden // heads
    value = int(metadata.get(f"{arch}.attention.value_length", head_dim))
    if value != head_dim:
        raise ValueError(f"GGUF {arch}.attention.value_length {value} differs from key_length {head_dim}; "
                         "supported: equal (one head_dim)")
    rot = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"GGUF {arch}.rope.dimension_count {rot} is not head_dim {head_dim}; "
                         "partial rotary is not supported")
    return hidden, heads, kv, head_dim


def _rope(metadata: Mapping[str, Any], arch: str) -> dict:
    """transformers 5 ``rope_parameters``: default, or linear with its factor."""
    theta = _f32(metadata.get(f"{arch}.rope.freq_base", 10000.0))
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    legacy = metadata.get(f"{arch}.rope.scale_linear")  # older files: linear factor only
    if kind == "none" and legacy is not None and float(legacy) != 1.0:
        kind, factor = "linear", legacy
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind != "linear":
        raise ValueError(f"GGUF {arch}.rope.scaling.type {kind!r} is not supported; supported: none, linear")
    if factor is None or not float(factor) > 0:
        raise ValueError(f"GGUF linear RoPE scaling without a positive {arch}.rope.scaling.factor ({factor!r})")
    return {"rope_type": "linear", "rope_theta": theta, "factor": _f32(factor)}


def _vocab_size(metadata: Mapping[str, Any], arch: str) -> int:
    tokens = metadata.get("tokenizer.ggml.tokens")
    declared = metadata.get(f"{arch}.vocab_size")
    if tokens is None and declared is None:
        raise ValueError(f"GGUF metadata has neither tokenizer.ggml.tokens nor {arch}.vocab_size")
    if tokens is not None and declared is not None and len(tokens) != int(declared):
        raise ValueError(f"GGUF {arch}.vocab_size {int(declared)} differs from the {len(tokens)} tokens "
                         "of tokenizer.ggml.tokens")
    return len(tokens) if tokens is not None else int(declared)


def hf_config_dict(metadata: Mapping[str, Any], names: Iterable[str] | None = None) -> dict:
    """A transformers config dict (``AutoConfig.for_model(**d)`` / ``config.json``) for a GGUF.

    ``names`` (the GGUF's tensor names) decides ``tie_word_embeddings`` (True when there is no
    ``output.weight``) and, for llama, ``attention_bias``/``mlp_bias``; without ``names`` those
    keys are left out (transformers' defaults apply). Float32-stored values (eps, RoPE base and
    factor) come back as the shortest decimal that round-trips float32. RoPE is given as
    transformers 5's ``rope_parameters``; the dtype as ``dtype`` (``torch_dtype`` is deprecated).
    """
    arch, spec = _arch(metadata)
    hidden, heads, kv, head_dim = _attention(metadata, arch)
    eps = metadata.get(f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is None:
        raise ValueError(f"GGUF metadata lacks {arch}.attention.layer_norm_rms_epsilon")
    cfg = {"architectures": [HF_CLASSES[arch]], "model_type": spec.model_type, "hidden_size": hidden,
           "intermediate_size": _int(metadata, f"{arch}.feed_forward_length"),
           "num_hidden_layers": _int(metadata, f"{arch}.block_count"), "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": head_dim, "hidden_act": "silu", "rms_norm_eps": _f32(eps),
           "max_position_embeddings": _int(metadata, f"{arch}.context_length"),
           "vocab_size": _vocab_size(metadata, arch), "rope_parameters": _rope(metadata, arch), "dtype": "float32"}
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if metadata.get(f"tokenizer.ggml.{key}") is not None:
            cfg[hf_key] = int(metadata[f"tokenizer.ggml.{key}"])
    if names is not None:
        names = set(names)
        cfg["tie_word_embeddings"] = "output.weight" not in names
        if arch == "llama":
            parts = {m.group(2) for m in map(_BLOCK.fullmatch, names) if m}
            cfg["attention_bias"] = any(f"{p}.bias" in parts for p in ("attn_q", "attn_k", "attn_v", "attn_output"))
            cfg["mlp_bias"] = any(f"{p}.bias" in parts for p in ("ffn_gate", "ffn_up", "ffn_down"))
        elif arch == "qwen3":
            cfg["attention_bias"] = False
    return cfg


# --------------------------------------------------------------------------- tensors

@lru_cache(maxsize=64)
def inverse_rotary_order(rows: int, heads: int) -> np.ndarray:
    """``argsort(rotary_row_order(rows, heads))`` (read-only): undoes the exporter's reorder."""
    if heads <= 0 or rows % (2 * heads):
        raise ValueError(f"{rows} Q/K rows do not split into {heads} heads of even size")
    order = np.argsort(rotary_row_order(rows, heads)).astype(np.int64)
    order.setflags(write=False)
    return order


def _shapes(names) -> dict[str, tuple[int, ...] | None]:
    """``{name: shape or None}`` from names, ``{name: shape}`` or ``{name: TensorInfo}``."""
    if isinstance(names, Mapping):
        return {n: tuple(getattr(v, "shape", v)) for n, v in names.items()}
    return dict.fromkeys(names)


def tensor_map(metadata: Mapping[str, Any], names) -> dict[str, HFTensor]:
    """``{gguf name: HFTensor}`` for every tensor of a GGUF (file order kept).

    ``names``: tensor names, or ``{name: PyTorch-order shape}`` / ``read_gguf(p).tensors``; with
    shapes, Q/K row counts are checked against the heads. ``row_order`` is set for llama's
    ``attn_q``/``attn_k`` weights and biases (module docstring); it acts on rows only, so it
    commutes with block quantization along the columns. Raises ValueError for a tensor the
    architecture does not read, a block index beyond ``block_count`` or a missing required one.
    """
    arch, spec = _arch(metadata)
    layers = _int(metadata, f"{arch}.block_count")
    hidden, heads, kv, head_dim = _attention(metadata, arch)
    heads_cfg = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                                hidden_size=hidden)
    accepted = (*BLOCK_TENSORS, *spec.required, *spec.optional)
    shapes = _shapes(names)
    out = {}
    for name, shape in shapes.items():
        m = _BLOCK.fullmatch(name)
        if m and m.group(2) in accepted and int(m.group(1)) < layers:
            hf_name = f"model.layers.{int(m.group(1))}.{BLOCK_NAMES[m.group(2)]}"
        elif not m and name in GLOBAL_NAMES:
            hf_name = GLOBAL_NAMES[name]
        else:
            raise ValueError(f"GGUF tensor {name!r} is not read by the {arch} architecture ({layers} blocks "
                             f"blk.0-{layers - 1} of {', '.join(accepted)}; {', '.join(GLOBAL_NAMES)})")
        order = None
        rotary = spec.rotary_heads(name, heads_cfg)  # the exporter's rule: Q -> heads, K -> kv heads
        if rotary:
            rows = rotary * head_dim
            if shape is not None and (not shape or shape[0] != rows):
                raise ValueError(f"GGUF tensor {name!r} has shape {shape}; {rotary} heads of {head_dim} "
                                 f"need {rows} rows")
            order = inverse_rotary_order(rows, rotary)
        out[name] = HFTensor(hf_name, order)
    required = [*GLOBAL_TENSORS, *(f"blk.{i}.{p}" for i in range(layers) for p in (*BLOCK_TENSORS, *spec.required))]
    missing = [n for n in required if n not in out]
    if missing:
        raise ValueError(f"GGUF lacks tensor {missing[0]!r} ({len(missing)} missing), which the {arch} "
                         "architecture requires")
    return out
