"""Export a qalora checkpoint to a GGUF file llama.cpp (and ollama) run: Llama, Mistral (as
architecture ``llama``), Qwen2 and Qwen3 (``qwen2``, ``qwen3``; the table is ``gguf_arch``),
quantized projections as ``Q4_1``.

    export_gguf("ckpt", "model.gguf")          # -> report dict
    export_float_gguf("hf-folder", "f32.gguf") # the unquantized model, F32: llama.cpp's own floor

What is written:
- metadata: ``general.*``, ``{arch}.*`` hyper-parameters (context, widths, heads, RMS eps, RoPE
  base, head_dim when it is not hidden/heads), file type ``MOSTLY_Q4_1``, quantization version 2;
- the tokenizer (GPT-2 style byte-level BPE ``tokenizer.json`` only): tokens, token types,
  merges, special token ids, chat template;
- tensors with llama.cpp names: every ``QuantLinear`` as Q4_1 (``d = scale``, ``m = offset``,
  exact up to fp16 rounding of d and m, see ``gguf_blocks``); for ``llama`` the Q and K rows
  (and biases) reordered to llama.cpp's rotary layout, Qwen's left in HF order; norms (Qwen3's
  per-head q/k norms too) and biases F32; embeddings (and an untied, unquantized
  ``lm_head``) F16 or F32; ``output.weight`` only when the checkpoint holds an ``lm_head``
  (tied embeddings write none).

Weights that Q4_1 cannot hold (8-bit codes, group sizes not a multiple of 32) are refused,
unless ``fallback="f16"``: then they are written dequantized as F16 and the report records
each one's max abs error against qalora's fp32 weight. The report records that error for every
tensor. Tensors are converted and written one at a time (memory: one layer), into a temporary
file in the output folder that is renamed into place only when complete.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from qalora.checkpoint import check_weights, read_meta
from qalora.errors import QaloraError
from qalora.export import gguf_arch
from qalora.export.gguf_arch import GGUFArch, add_metadata, arch_for, check_tensors
from qalora.export.gguf_blocks import (
    Q4_1_BLOCK,
    Q4_1_BYTES,
    max_abs_diff,
    q4_1_blocks,
    q4_1_unsupported,
    q4_1_weights,
    rotary_row_order,
    to_f16,
)
from qalora.io import atomic_file, check_new_output, read_json
from qalora.quant.qparams import dequantize
from qalora.quant.weight import QuantizedWeight

FALLBACKS = ("f16",)
FLOAT_TYPES = ("f16", "f32")
_GGML = gguf.GGMLQuantizationType
add_llama_metadata = gguf_arch.add_llama_metadata  # moved to gguf_arch; callers import it from here too


# --------------------------------------------------------------------------- tokenizer

def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter treats as control tokens even when not marked special."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _pre_steps(tokenizer: dict) -> list[dict]:
    pre = tokenizer.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _is_byte_level(step: dict) -> bool:
    return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space", False)


# Qwen2/Qwen2.5/Qwen3's tokenizer.json split regex (llama.cpp's "qwen2" pre-tokenizer): digits one by one.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _is_qwen2_split(step: dict) -> bool:
    return step.get("type") == "Split" and (step.get("pattern") or {}).get("Regex") == QWEN2_SPLIT \
        and step.get("behavior") == "Isolated" and not step.get("invert")


# Ordered, first match wins: (llama.cpp pre-tokenizer name, test on (pre-tokenizer steps, name hints)).
PRE_TOKENIZER_RULES = (
    ("smollm", lambda steps, hints: len(steps) == 2 and steps[0].get("type") == "Digits"
     and steps[0].get("individual_digits") and _is_byte_level(steps[1])),
    # Folders rebuilt from SmolLM2's own GGUF (transformers' GGUF loader) lose the Digits step;
    # SmolLM2's vocabulary has no token mixing a digit with anything, so "smollm" and "gpt-2" agree.
    ("smollm", lambda steps, hints: len(steps) == 1 and _is_byte_level(steps[0])
     and any("smollm" in h.lower() for h in hints)),
    ("gpt-2", lambda steps, hints: len(steps) == 1 and _is_byte_level(steps[0])),
    # Qwen's: the split regex, then ByteLevel without its own regex.
    ("qwen2", lambda steps, hints: len(steps) == 2 and _is_qwen2_split(steps[0]) and steps[1].get("type") == "ByteLevel"
     and steps[1].get("use_regex") is False and not steps[1].get("add_prefix_space", False)),
)


def choose_pre_tokenizer(tokenizer: dict, hints: tuple[str, ...] = ()) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` (first matching rule of
    ``PRE_TOKENIZER_RULES``), or ``"default"`` (llama.cpp's generic regex) when none matches."""
    steps = _pre_steps(tokenizer)
    return next((pre for pre, test in PRE_TOKENIZER_RULES if test(steps, hints)), "default")


def bpe_vocab(tokenizer: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for ids ``0 … vocab_size - 1``, as llama.cpp's HF converter makes
    them: vocabulary entries NORMAL; added tokens CONTROL when special (or ``<|…|>``), else
    USER_DEFINED; ids without a token ``[PAD{id}]`` UNUSED."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer.get("decoder") or {}).get("type") != "ByteLevel":
        raise QaloraError("GGUF export supports GPT-2 style byte-level BPE tokenizers (tokenizer.json with a BPE model "
                          f"and a ByteLevel decoder); this one has model {model.get('type')!r}, decoder "
                          f"{(tokenizer.get('decoder') or {}).get('type')!r}")
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens") or []:
        text = added["content"]
        special = added.get("special") or _looks_special(text)
        by_id[added["id"]] = (text, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise QaloraError(f"the tokenizer has token id {max(by_id)} but the model's vocabulary (embedding rows) "
                          f"is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        text, typ = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(typ))
    return tokens, types


def add_tokenizer(writer: gguf.GGUFWriter, folder: str | os.PathLike, vocab_size: int,
                  pre_tokenizer: str | None = None, hints: tuple[str, ...] = ()) -> dict:
    """Write ``folder``'s byte-level BPE tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
    chat template) into ``writer``'s metadata; returns what was written."""
    folder = Path(folder)
    tokenizer = read_json(folder / "tokenizer.json", "tokenizer")
    tokens, types = bpe_vocab(tokenizer, vocab_size)
    pre = pre_tokenizer or choose_pre_tokenizer(tokenizer, hints)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise QaloraError(f"{str(folder / 'tokenizer.json')!r} has no BPE merges; llama.cpp's gpt2 tokenizer needs them")
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(False)  # byte-level BPE chat models (SmolLM2, GPT-2) add no BOS by themselves
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_ids": dict(special.special_token_ids), "chat_template": special.chat_template is not None}


# --------------------------------------------------------------------------- tensors

@dataclass
class _Planned:
    """One GGUF tensor: where it comes from and how it is converted."""
    name: str                   # GGUF name, e.g. blk.0.attn_q.weight
    source: str                 # checkpoint module (quantized) or tensor name
    kind: str                   # "q4_1" | "fallback" (dequantized F16) | "float" (float_type) | "f32"
    shape: tuple[int, ...]      # logical numpy shape, [rows, cols] or [n]
    heads: int | None = None    # rotary row reordering (attn_q / attn_k), else None
    spec: dict | None = None    # quantized layer spec from qalora.json
    reason: str | None = None   # why a quantized layer falls back

    def info(self, float_type: str) -> tuple[tuple[int, ...], np.dtype, int, gguf.GGMLQuantizationType]:
        """(stored numpy shape, numpy dtype, bytes, GGML type) for ``add_tensor_info``."""
        n = int(np.prod(self.shape))
        if self.kind == "q4_1":
            rows, cols = self.shape
            return (rows, cols // Q4_1_BLOCK * Q4_1_BYTES), np.dtype(np.uint8), n // Q4_1_BLOCK * Q4_1_BYTES, _GGML.Q4_1
        if self.kind == "fallback" or (self.kind == "float" and float_type == "f16"):
            return self.shape, np.dtype(np.float16), 2 * n, _GGML.F16
        return self.shape, np.dtype(np.float32), 4 * n, _GGML.F32


def _order(p: _Planned) -> tuple:
    m = re.match(r"blk\.(\d+)\.", p.name)
    return (int(m.group(1)) + 1 if m else (0 if p.name.startswith("token_embd") else 10**9), p.name)


def plan_tensors(shapes: dict[str, tuple[int, ...]], layers: dict[str, dict], config, fallback: str | None,
                 arch: GGUFArch | None = None) -> list[_Planned]:
    """Map every checkpoint tensor to a GGUF tensor of ``arch`` (default: ``arch_for(config)``);
    refuse tensors llama.cpp would not read, missing ones it needs and, without a fallback,
    quantized layers Q4_1 cannot hold."""
    arch = arch or arch_for(config)
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    left = set(shapes)
    plan = []

    def gguf_name(source: str, suffixes=(".weight", ".bias")) -> str:
        name = names.get_name(source, try_suffixes=suffixes)
        if name is None:
            raise QaloraError(f"checkpoint tensor {source!r} has no counterpart in llama.cpp's {arch.name} "
                              f"architecture ({arch.model_type}: embeddings, attention, MLP, norms, lm_head)")
        return name

    for module, spec in layers.items():
        if spec.get("kind", "affine") != "affine":
            raise QaloraError(f"layer {module!r} has kind {spec.get('kind')!r}; the GGUF exporter writes affine "
                              "(scale * q + offset) layers")
        parts = [f"{module}.{p}" for p in ("qweight", "scale", "offset")]
        if missing := [p for p in parts if p not in left]:
            raise QaloraError(f"checkpoint lacks {missing[0]!r} of quantized layer {module!r}")
        left.difference_update(parts)
        name = gguf_name(module + ".weight", (".weight",))
        why = q4_1_unsupported(spec["bits"], spec["group_size"], spec["in_features"])
        if why is not None and fallback is None:
            raise QaloraError(f"{module} (int{spec['bits']}, group_size {spec['group_size']}) cannot be written as "
                              f"GGUF Q4_1: {why}; export with fallback='f16' to write it dequantized as F16 "
                              "(its error is recorded in the report)")
        plan.append(_Planned(name, module, "q4_1" if why is None else "fallback",
                             (spec["out_features"], spec["in_features"]), arch.rotary_heads(name, config), spec, why))
    for key in sorted(left):
        name = gguf_name(key)
        shape = tuple(shapes[key])
        plan.append(_Planned(name, key, "float" if len(shape) == 2 else "f32", shape, arch.rotary_heads(name, config)))
    if not any(p.name == "output.weight" for p in plan) and not getattr(config, "tie_word_embeddings", False):
        raise QaloraError("the checkpoint has no lm_head but its config does not tie it to the embeddings")
    plan.sort(key=_order)
    check_tensors({p.name: p.source for p in plan}, arch, config.num_hidden_layers)
    return plan


def convert_tensor(p: _Planned, get, float_type: str) -> tuple[np.ndarray, float]:
    """``(array to write, max abs error vs qalora's fp32 tensor)``; ``get(name)`` reads a
    checkpoint tensor."""
    if p.spec is None:
        w = get(p.source).float()
        if p.heads:
            w = w[torch.from_numpy(rotary_row_order(w.shape[0], p.heads))]
        if p.kind == "float" and float_type == "f16":
            return to_f16(w, p.source)
        return w.numpy().astype(np.float32, copy=False), 0.0
    s = p.spec
    qw = QuantizedWeight(get(f"{p.source}.qweight"), get(f"{p.source}.scale").float(), get(f"{p.source}.offset").float(),
                         s["bits"], s["group_size"], s["in_features"])
    codes, scale, offset = qw.codes(), qw.scale, qw.offset
    if p.heads:  # rows move whole: codes, scales and offsets together
        order = torch.from_numpy(rotary_row_order(codes.shape[0], p.heads))
        codes, scale, offset = codes[order], scale[order], offset[order]
    exact = dequantize(codes, scale, offset, s["group_size"])  # qalora's fp32 weight [out, in], GGUF row order
    if p.kind == "fallback":
        return to_f16(exact, p.source)
    blocks = q4_1_blocks(codes, scale, offset, s["group_size"], p.source)
    return blocks, max_abs_diff(q4_1_weights(codes, scale, offset, s["group_size"]), exact)


# --------------------------------------------------------------------------- export

def _hints(model_dir: Path, meta: dict) -> tuple[str, ...]:
    raw = read_json(model_dir / "config.json", "model config")
    found = [raw.get("_name_or_path"), raw.get("_model_name_or_path"), meta.get("source_model"),
             meta.get("source_folder"), model_dir.name]
    return tuple(str(h) for h in found if h)


def _write(writer: gguf.GGUFWriter, weights: Path, out: Path, config, arch: GGUFArch, layers: dict[str, dict], *,
           fallback: str | None, float_type: str, tokenizer: tuple,
           progress: bool) -> tuple[list[_Planned], dict, dict]:
    """Plan the tensors of the safetensors file ``weights``, add the tokenizer (``add_tokenizer``'s
    arguments after the writer), then write header, metadata, tensor infos and each tensor as it
    is converted, into a temporary file beside ``out`` renamed to ``out`` only when complete.
    Returns ``(plan, tokenizer report, {gguf name: type, source, max abs error})``."""
    from qalora.safetensors_file import SafetensorsFile

    with SafetensorsFile(weights) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in list(f.keys())}
        plan = plan_tensors(shapes, layers, config, fallback, arch)
        embd = next(p for p in plan if p.name == "token_embd.weight")
        if embd.shape[0] != config.vocab_size:
            raise QaloraError(f"embedding has {embd.shape[0]} rows but config.vocab_size is {config.vocab_size}")
        tok = add_tokenizer(writer, *tokenizer)
        for p in plan:
            shape, dtype, nbytes, ggml = p.info(float_type)
            writer.add_tensor_info(p.name, shape, dtype, nbytes, raw_dtype=ggml if ggml == _GGML.Q4_1 else None)

        tensors = {}
        with atomic_file(out) as tmp:
            try:
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for p in tqdm(plan, desc="gguf", disable=not progress):
                    array, err = convert_tensor(p, f.get_tensor, float_type)
                    writer.write_tensor_data(array)
                    tensors[p.name] = {"type": p.info(float_type)[3].name, "source": p.source, "max_abs_error": err}
            finally:
                writer.close()
    return plan, tok, tensors


def _report(out: Path, plan: list[_Planned], tok: dict, tensors: dict, metadata: dict, start: float) -> dict:
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t["type"]] = types.get(t["type"], 0) + 1
    return {"path": str(out), "file_bytes": out.stat().st_size, "tensor_types": types,
            "max_abs_error": max((t["max_abs_error"] for t in tensors.values()), default=0.0),
            "fallback": {p.name: {"source": p.source, "reason": p.reason, "max_abs_error": tensors[p.name]["max_abs_error"]}
                         for p in plan if p.kind == "fallback"},
            "tensors": tensors, "tokenizer": tok, "metadata": metadata, "seconds": round(time.perf_counter() - start, 2)}


def _check_options(fallback: str | None, float_type: str) -> None:
    if fallback not in (None, *FALLBACKS):
        raise QaloraError(f"fallback {fallback!r} is unknown; use None (refuse) or one of {', '.join(FALLBACKS)}")
    if float_type not in FLOAT_TYPES:
        raise QaloraError(f"float_type {float_type!r} is unknown; use one of {', '.join(FLOAT_TYPES)}")


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, *, fallback: str | None = None,
                float_type: str = "f16", name: str | None = None, pre_tokenizer: str | None = None,
                progress: bool = True, files=None) -> dict:
    """Write the qalora checkpoint ``model_dir`` as a llama.cpp GGUF file ``out_path`` (new).

    Args:
        fallback: ``None`` refuses quantized layers Q4_1 cannot hold; ``"f16"`` writes them
            dequantized as F16 (error recorded in the report).
        float_type: ``"f16"`` or ``"f32"`` for unquantized matrices (embeddings, untied lm_head).
        name: ``general.name`` (default: the checkpoint folder's name).
        pre_tokenizer: llama.cpp pre-tokenizer (default: ``choose_pre_tokenizer``).
        files: the command's :class:`~qalora.io.FileCache` (weights it already hashed are not hashed again).
    Returns:
        the report: path, file bytes, tensor count per GGML type, per tensor its type, source and
        max abs error vs qalora's fp32 weight, fallback tensors, tokenizer and metadata written.
    Raises:
        QaloraError: before anything is written, for a model type, feature or tensor llama.cpp
            would not run as transformers does (``gguf_arch``), or a layer Q4_1 cannot hold.
    """
    from transformers import AutoConfig

    start = time.perf_counter()
    _check_options(fallback, float_type)
    out = check_new_output(out_path)
    model_dir = Path(model_dir).expanduser()
    meta = read_meta(model_dir)
    weights = check_weights(model_dir, meta, files)  # the recorded SHA-256, always (once per command)
    config = AutoConfig.from_pretrained(model_dir)
    arch = arch_for(config)
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    metadata = add_metadata(writer, config, name or model_dir.resolve().name, arch)
    plan, tok, tensors = _write(writer, weights, out, config, arch, meta["layers"], fallback=fallback,
                                float_type=float_type, progress=progress,
                                tokenizer=(model_dir, config.vocab_size, pre_tokenizer, _hints(model_dir, meta)))
    report = _report(out, plan, tok, tensors, metadata, start)
    if progress:
        print(format_report(report), flush=True)
    return report


def export_float_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, *, float_type: str = "f32",
                      name: str | None = None, pre_tokenizer: str | None = None, progress: bool = False) -> dict:
    """Write an unquantized Hugging Face folder (one ``model.safetensors``, config, tokenizer) as
    an F32 (or F16) GGUF with ``export_gguf``'s names, row order, metadata and tokenizer; returns
    its report. llama.cpp on it vs transformers on the folder measures llama.cpp's own arithmetic
    (kernels, F16 KV cache) on the very weights: the floor for a quantized export's figures."""
    from transformers import AutoConfig

    start = time.perf_counter()
    _check_options(None, float_type)
    out = check_new_output(out_path)
    model_dir = Path(model_dir).expanduser()
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise QaloraError(f"{str(weights)!r} is missing; export_float_gguf reads one unsharded model.safetensors")
    config = AutoConfig.from_pretrained(model_dir)
    arch = arch_for(config)
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    file_type = gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType.MOSTLY_F16
    metadata = add_metadata(writer, config, name or model_dir.resolve().name, arch, file_type=file_type)
    tokenizer = (model_dir, config.vocab_size, pre_tokenizer, (model_dir.name,))
    plan, tok, tensors = _write(writer, weights, out, config, arch, {}, fallback=None, float_type=float_type,
                                progress=progress, tokenizer=tokenizer)
    return _report(out, plan, tok, tensors, metadata, start)


def format_report(report: dict) -> str:
    """A few human-readable lines summarising an ``export_gguf`` report."""
    types = ", ".join(f"{n} {t}" for t, n in sorted(report["tensor_types"].items()))
    lines = [f"wrote {report['path']} ({report['file_bytes'] / 2**20:.1f} MiB): {types}",
             (f"tokenizer: {report['tokenizer']['model']}/{report['tokenizer']['pre']}, "
              f"{report['tokenizer']['tokens']} tokens, {report['tokenizer']['merges']} merges"),
             f"max abs error vs qalora's fp32 weights: {report['max_abs_error']:.3g} (fp16 rounding of d, m, floats)"]
    for n, fb in report["fallback"].items():
        lines.append(f"fallback F16: {n} ({fb['source']}): {fb['reason']}; max abs error {fb['max_abs_error']:.3g}")
    return "\n".join(lines)
