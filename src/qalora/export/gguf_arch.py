"""The llama.cpp architectures the GGUF exporter writes: one record per transformers ``model_type``.

    model_type  general.architecture  Q/K rows   per-block tensors beyond llama's nine
    llama       llama                 permuted   optional: q/k/v/output and MLP biases
    mistral     llama                 permuted   optional: as llama
    qwen2       qwen2                 HF order   required: attn_q/attn_k/attn_v biases
    qwen3       qwen3                 HF order   required: attn_q_norm, attn_k_norm ``[head_dim]``;
                                                 no biases (llama.cpp 0.3.36 refuses such a file)

Conventions (llama.cpp's ``convert_hf_to_gguf`` and ``src/models/*.cpp``, gguf-py 0.19):

- Rotary layout. Hugging Face rotates the two halves of each head (``rotate_half``). llama.cpp's
  ``llama`` graph uses NORM RoPE (adjacent pairs), so its converter (``LlamaModel``, which also
  takes ``MistralForCausalLM``) reorders the rows of Q and K into pairs, weights and biases alike
  (``gguf_blocks.rotary_row_order``). ``qwen2`` and ``qwen3`` use NEOX RoPE (halves, as HF), and
  their converter writes the rows unchanged; Qwen3's q/k norms act on each head's ``head_dim``
  entries before RoPE and are written as they are.
- The nine tensors of every block: ``attn_norm``, ``attn_q``, ``attn_k``, ``attn_v``,
  ``attn_output``, ``ffn_norm``, ``ffn_gate``, ``ffn_up``, ``ffn_down`` (``.weight``); outside the
  blocks ``token_embd``, ``output_norm`` and, untied only, ``output``. llama.cpp refuses a file
  with a tensor its architecture does not read ("wrong number of tensors"), so anything else is
  refused here, before a byte is written.
- Metadata: every architecture gets llama.cpp's generic keys (``{arch}.context_length``,
  ``embedding_length``, ``block_count``, ``feed_forward_length``, ``attention.head_count``,
  ``head_count_kv``, ``layer_norm_rms_epsilon``, ``rope.freq_base``), ``attention.key_length`` and
  ``value_length`` when ``head_dim != hidden / heads`` (llama.cpp's default), and linear RoPE
  scaling. The llama writer adds ``rope.dimension_count`` and ``vocab_size`` as the ``LlamaModel``
  converter does; the Qwen converters write neither (llama.cpp then rotates ``key_length``
  dimensions, which is Qwen's ``head_dim``).
- Refused, one line each: model types without a record here (gemma, phi3, …), ``hidden_act``
  other than silu, sliding-window attention (these llama.cpp graphs attend to the whole context),
  per-layer-type RoPE and RoPE types other than default and linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf

from qalora.errors import QaloraError

ROPE_TYPES = ("default", "linear")
BLOCK_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight")   # required; "output.weight" optional (untied)
QKV_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias")


# --------------------------------------------------------------------------- config

def attention_shape(config) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)``; ``head_dim`` defaults to ``hidden_size // heads``."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def rope_parameters(config) -> tuple[float, str, float | None]:
    """``(rope_theta, rope_type, linear factor)`` from transformers 5's ``config.rope_parameters``
    (``{"rope_theta": …, "rope_type": …}``) or an older top-level ``config.rope_theta``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise QaloraError(f"per-layer-type RoPE parameters {params!r} are not supported by the GGUF exporter")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise QaloraError(f"RoPE type {rope_type!r} is not supported by the GGUF exporter; it writes "
                          f"{', '.join(ROPE_TYPES)}")
    factor = params.get("factor")
    if rope_type == "linear" and not factor:
        raise QaloraError(f"linear RoPE scaling without a factor in {params!r}")
    return float(theta), rope_type, factor


def sliding_window(config) -> int | None:
    """The attention window a layer of this config uses, or ``None`` when every layer attends to
    its whole context: from ``layer_types`` (Qwen2/Qwen3: ``"sliding_attention"`` layers use
    ``sliding_window``) or, without it (Mistral), ``sliding_window`` itself when it is shorter than
    ``max_position_embeddings``."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return (window or 0) if any(t != "full_attention" for t in layer_types) else None
    return window if window is not None and window < config.max_position_embeddings else None


# --------------------------------------------------------------------------- the table

def _llama_keys(writer: gguf.GGUFWriter, config) -> dict:
    """``rope.dimension_count`` and ``vocab_size``, as llama.cpp's ``LlamaModel`` converter writes."""
    head_dim = attention_shape(config)[2]
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    return {"rope_dimension_count": head_dim, "vocab_size": config.vocab_size}


def _no_keys(writer: gguf.GGUFWriter, config) -> dict:
    """The Qwen2/Qwen3 converters add nothing to the generic keys for a causal LM."""
    return {}


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers ``model_type`` is written for llama.cpp.

    Attributes:
        model_type: ``config.model_type``.
        arch: the llama.cpp architecture (``general.architecture`` and the key prefix).
        permute_qk: reorder the rows of Q and K (and their biases) to llama.cpp's NORM RoPE pairs.
        required: per-block tensors (name after ``blk.N.``) llama.cpp needs beyond ``BLOCK_TENSORS``.
        optional: per-block tensors llama.cpp reads when present.
        extra_keys: ``(writer, config) -> dict`` writes the architecture's own metadata keys.
    """
    model_type: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    extra_keys: Callable[[gguf.GGUFWriter, object], dict] = _no_keys

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def rotary_heads(self, tensor: str, config) -> int | None:
        """Heads whose rows ``tensor`` (a GGUF name) is reordered by, or ``None`` (no reordering)."""
        if not self.permute_qk or not tensor.startswith("blk."):
            return None
        heads, kv_heads, _ = attention_shape(config)
        return {"attn_q": heads, "attn_k": kv_heads}.get(tensor.split(".")[-2])


_LLAMA_OPTIONAL = (*QKV_BIASES, "attn_output.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")
ARCHS: dict[str, GGUFArch] = {a.model_type: a for a in (
    GGUFArch("llama", gguf.MODEL_ARCH.LLAMA, True, optional=_LLAMA_OPTIONAL, extra_keys=_llama_keys),
    GGUFArch("mistral", gguf.MODEL_ARCH.LLAMA, True, optional=_LLAMA_OPTIONAL, extra_keys=_llama_keys),
    GGUFArch("qwen2", gguf.MODEL_ARCH.QWEN2, False, required=QKV_BIASES),
    GGUFArch("qwen3", gguf.MODEL_ARCH.QWEN3, False, required=("attn_q_norm.weight", "attn_k_norm.weight")),
)}


def arch_for(config) -> GGUFArch:
    """The record for ``config.model_type``, after refusing what llama.cpp would run wrongly."""
    spec = ARCHS.get(config.model_type)
    if spec is None:
        raise QaloraError(f"model_type {config.model_type!r} cannot be exported to GGUF; the exporter writes "
                          f"{', '.join(ARCHS)} (mistral as llama.cpp's llama architecture)")
    check_config(config, spec)
    return spec


def check_config(config, spec: GGUFArch) -> None:
    """Refuse features the llama.cpp graph of ``spec`` does not compute: an activation other than
    silu, sliding-window attention, RoPE other than default/linear."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise QaloraError(f"hidden_act {config.hidden_act!r} is not supported by llama.cpp's {spec.name} "
                          "architecture (silu)")
    window = sliding_window(config)
    if window is not None:
        raise QaloraError(f"sliding-window attention (sliding_window {window}) is not supported: llama.cpp's "
                          f"{spec.name} architecture attends to the whole context; accepted: no sliding-window "
                          "layers (sliding_window null, or not below max_position_embeddings)")
    rope_parameters(config)


def check_tensors(tensors: dict[str, str], spec: GGUFArch, n_layers: int) -> None:
    """Every GGUF tensor (``{gguf name: checkpoint source}``) is one llama.cpp's ``spec`` reads, and
    every block holds ``BLOCK_TENSORS`` and ``spec.required``."""
    accepted = (*BLOCK_TENSORS, *spec.required, *spec.optional)
    for name, source in tensors.items():
        in_block = name.startswith("blk.")
        known = name.split(".", 2)[2] in accepted if in_block else name in (*GLOBAL_TENSORS, "output.weight")
        if not known:
            raise QaloraError(f"checkpoint tensor {source!r} ({name}) is not read by llama.cpp's {spec.name} "
                              f"architecture; it reads {', '.join(GLOBAL_TENSORS)}, output.weight and per block "
                              f"{', '.join(accepted)}")
    for want in GLOBAL_TENSORS:
        if want not in tensors:
            raise QaloraError(f"the checkpoint has no {want} tensor, which llama.cpp's {spec.name} architecture needs")
    for i in range(n_layers):
        for part in (*BLOCK_TENSORS, *spec.required):
            if f"blk.{i}.{part}" not in tensors:
                raise QaloraError(f"layer {i} of the checkpoint has no {part.replace('.', ' ')} (blk.{i}.{part}), "
                                  f"which llama.cpp's {spec.name} architecture ({spec.model_type}) requires")


# --------------------------------------------------------------------------- metadata

def add_metadata(writer: gguf.GGUFWriter, config, name: str, spec: GGUFArch | None = None,
                 file_type: gguf.LlamaFileType = gguf.LlamaFileType.MOSTLY_Q4_1) -> dict:
    """``general.*`` and ``{arch}.*`` keys for a transformers config (``writer.arch`` must be
    ``spec.name``); returns what was written."""
    spec = spec or arch_for(config)
    check_config(config, spec)
    if writer.arch != spec.name:
        raise QaloraError(f"a GGUF writer for architecture {writer.arch!r} cannot hold a {spec.name!r} model")
    heads, kv_heads, head_dim = attention_shape(config)
    theta, rope_type, factor = rope_parameters(config)
    meta = {"architecture": spec.name, "name": name, "context_length": config.max_position_embeddings,
            "embedding_length": config.hidden_size, "block_count": config.num_hidden_layers,
            "feed_forward_length": config.intermediate_size, "head_count": heads, "head_count_kv": kv_heads,
            "layer_norm_rms_epsilon": float(config.rms_norm_eps), "rope_freq_base": theta}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(meta["context_length"])
    writer.add_embedding_length(meta["embedding_length"])
    writer.add_block_count(meta["block_count"])
    writer.add_feed_forward_length(meta["feed_forward_length"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(meta["layer_norm_rms_epsilon"])
    writer.add_rope_freq_base(theta)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        meta["key_length"] = meta["value_length"] = head_dim
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
        meta["rope_scaling_factor"] = float(factor)
    meta.update(spec.extra_keys(writer, config))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return meta


def add_llama_metadata(writer: gguf.GGUFWriter, config, name: str) -> dict:
    """``add_metadata`` for llama-architecture models (``llama``, ``mistral``) only."""
    spec = ARCHS.get(config.model_type)
    if spec is None or spec.arch != gguf.MODEL_ARCH.LLAMA:
        llama = ", ".join(t for t, a in ARCHS.items() if a.arch == gguf.MODEL_ARCH.LLAMA)
        raise QaloraError(f"add_llama_metadata writes llama-architecture models ({llama}); this config is "
                          f"{config.model_type!r}: use add_metadata")
    return add_metadata(writer, config, name, spec)
