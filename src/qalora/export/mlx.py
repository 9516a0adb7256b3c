"""Export a qalora checkpoint to an mlx-lm model folder: MLX's affine quantized layers hold our
form as it is.

    export_mlx("ckpt", "ckpt-mlx")                     # -> report dict; then mlx_lm.load("ckpt-mlx")

MLX's ``QuantizedLinear`` (``mx.quantize(..., mode="affine")``) stores, per layer ``[out, in]``:

    weight  uint32 [out, in * bits / 32]   codes, a little-endian bit stream in 32-bit words
    scales  [out, in / L]                  w[o, i] = scales[o, g] * q[o, i] + biases[o, g]
    biases  [out, in / L]                  g = i // L, L in {32, 64, 128}, bits in {2, 3, 4, 8}

That is exactly ``W~ = scale * q + offset``: ``scales = scale``, ``biases = offset`` (cast to
``dtype``, nothing else), and the codes are the ones we store. MLX packs a row's codes as one
little-endian bit stream cut into 32-bit words: code ``k`` occupies bits ``k·b … k·b + b - 1``
of the stream, so at 3 bits 32 codes fill 3 words and codes 10 and 21 straddle a word boundary
(checked against ``mx.dequantize`` in ``tests/export/test_mlx.py``). qalora's packing
(``quant/packing.py``) is the same stream cut into bytes (2-bit: 4 codes a byte, 3-bit: 8 codes
in 3 bytes, 4-bit: 2 a byte, 8-bit: 1), and a row of ``in`` codes, ``in`` a multiple of 32, is
``in·b/8`` bytes = ``in·b/32`` words. So MLX's words are our bytes read four at a time,
little-endian (:func:`mlx_words`): the codes are moved, never unpacked or re-quantized.

What is written into the new folder ``out`` (a temporary sibling renamed into place when
complete; nothing is written when anything is refused):

- ``model.safetensors`` (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  past ``SHARD_BYTES``), with HF tensor names as mlx-lm's models use them: each quantized layer
  as ``<layer>.weight`` (uint32), ``<layer>.scales``, ``<layer>.biases`` (``dtype``) and its
  ``<layer>.bias`` if any (``dtype``); embeddings, norms and an unquantized ``lm_head`` in
  ``dtype``;
- ``config.json``: the checkpoint's transformers config with what mlx-lm reads added —
  ``quantization`` (and the same dict as ``quantization_config``, as mlx-lm writes it):
  ``{"group_size": G, "bits": B, "mode": "affine"}`` for the most common (bits, group) and, for
  every layer that differs, ``"<layer>": {"group_size": …, "bits": …, "mode": "affine"}`` (mlx-lm's
  per-layer override: its loader's ``class_predicate`` returns ``config["quantization"][path]``
  for a listed path); ``rope_theta`` (and ``rope_scaling``) at the top level, read from
  transformers 5's ``rope_parameters``; ``tie_word_embeddings`` false when the checkpoint
  quantized a tied ``lm_head`` (it is written as its own quantized layer);
- ``generation_config.json`` and the tokenizer files, copied (``tokenizer.json`` re-written
  without indentation: the same JSON, half the bytes); ``export_info.json`` (this report).

Model types: ``llama`` and ``mistral`` (mlx-lm maps mistral to its llama model), ``qwen2`` and
``qwen3`` (mlx-lm's own), SiLU-gated MLPs. Memory: one shard of output tensors (plus one layer's codes while measuring).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qalora.checkpoint import check_weights, read_meta, weights_sha256
from qalora.errors import QaloraError
from qalora.export.summary import error_summary, folder_report
from qalora.io import atomic_dir, check_new_output, read_json, write_json
from qalora.quant.qparams import dequantize
from qalora.quant.weight import QuantizedWeight

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BITS = (2, 3, 4, 8)                 # MLX affine also has 1, 5 and 6 bits; qalora writes none of them
GROUP_SIZES = (32, 64, 128)         # what mx.quantize / QuantizedLinear accept
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # -> mlx_lm.models.<name>
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")          # mlx-lm's initialize_rope has these
SHARD_BYTES = 5 << 30               # mlx-lm's own shard size (MAX_FILE_SIZE_GB = 5)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
INFO_FILE = "export_info.json"
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
              "chat_template.json")
ERROR_CHUNK = 1 << 20               # weights per chunk when measuring a layer's error
_FLOAT = ("F16", "BF16", "F32", "F64")
_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "F32": 4, "I32": 4, "U32": 4,
          "F64": 8, "I64": 8, "U64": 8}


# --------------------------------------------------------------------------- tensors

def mlx_words(packed: torch.Tensor) -> torch.Tensor:
    """qalora's packed bytes ``uint8 [out, in·b/8]`` as MLX's ``weight`` ``uint32 [out, in·b/32]``.

    Both are the same little-endian bit stream of a row's codes (module docstring); word ``j``
    is ``byte[4j] | byte[4j+1] << 8 | byte[4j+2] << 16 | byte[4j+3] << 24``, computed as such
    (not a reinterpreting view) so the result is the same on any host byte order.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] % 4:
        raise ValueError(f"packed codes must be uint8 [out, 4k], got {packed.dtype} {tuple(packed.shape)}")
    b = packed.to(torch.int64).reshape(packed.shape[0], -1, 4)        # [out, words, 4]
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return word.to(torch.uint32)


def mlx_qparams(scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype,
                name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, biases)`` = our ``(scale, offset)`` ``[out, in / L]`` cast to ``dtype``;
    refuses values the dtype cannot hold (fp16 overflows past 65504)."""
    scales, biases = scale.to(dtype), offset.to(dtype)
    for what, t, src in (("scales", scales, scale), ("offsets", biases, offset)):
        if not bool(torch.isfinite(t).all()):
            raise QaloraError(f"{name} has {what} reaching {float(src.abs().max()):.4g}, beyond {_dtype_name(dtype)}'s "
                              "range; export with dtype='float32' or 'bfloat16'")
    return scales.contiguous(), biases.contiguous()


def weight_error(qw: QuantizedWeight, scales: torch.Tensor, biases: torch.Tensor) -> tuple[float, float]:
    """``(max |w_mlx - w_qalora|, max |w_qalora|)`` over the layer, ``w_mlx = scales·q + biases``
    with the stored (cast) scales and biases, both evaluated in fp32, a few rows at a time: the
    error of storing scale and offset in the export's dtype (0 for float32). MLX evaluating in
    float16/bfloat16 rounds each weight once more."""
    rows = max(1, ERROR_CHUNK // qw.in_features)
    codes = qw.codes()
    err = peak = 0.0
    for r in range(0, qw.out_features, rows):
        sl = slice(r, r + rows)
        ours = dequantize(codes[sl], qw.scale[sl], qw.offset[sl], qw.group_size)
        theirs = dequantize(codes[sl], scales[sl].float(), biases[sl].float(), qw.group_size)
        err = max(err, float((theirs - ours).abs().max()))
        peak = max(peak, float(ours.abs().max()))
    return err, peak


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


# --------------------------------------------------------------------------- plan

@dataclass
class _Tensor:
    """One output tensor: its name, bytes, and where it comes from."""
    name: str               # mlx-lm (= HF) name, e.g. model.layers.0.mlp.up_proj.scales
    source: str             # checkpoint layer (quantized) or tensor name
    part: str               # "weight" | "scales" | "biases" (quantized layer) | "float" | "raw"
    nbytes: int


def check_layers(layers: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """``(default quantization, per-layer overrides)`` for mlx-lm's ``quantization`` block;
    refuses layers MLX cannot hold (kind, bits, group size)."""
    if not layers:
        raise QaloraError("the checkpoint has no quantized layers; the MLX export writes quantized checkpoints")
    for what, test, accepted in (
            ("kind", lambda s: s.get("kind", "affine") == "affine", "affine (scale * q + offset) layers"),
            ("bits", lambda s: s["bits"] in BITS, f"bits {', '.join(map(str, BITS))}"),
            ("group_size", lambda s: s["group_size"] in GROUP_SIZES,
             f"group sizes {', '.join(map(str, GROUP_SIZES))}; re-quantize with --group-size 32, 64 or 128")):
        if bad := [n for n, s in layers.items() if not test(s)]:
            value = layers[bad[0]].get(what, "affine")
            raise QaloraError(f"{len(bad)} of {len(layers)} quantized layers have {what} {value!r} (first: {bad[0]}); "
                              f"MLX's quantized layers hold {accepted}")
    pairs = Counter((s["bits"], s["group_size"]) for s in layers.values())
    (bits, group_size), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
    overrides = {n: {"group_size": s["group_size"], "bits": s["bits"], "mode": "affine"} for n, s in layers.items()
                 if (s["bits"], s["group_size"]) != (bits, group_size)}
    return {"group_size": group_size, "bits": bits, "mode": "affine"}, overrides


def plan_tensors(shapes: dict[str, tuple[tuple[int, ...], str]], layers: dict[str, dict], itemsize: int) -> list[_Tensor]:
    """Every output tensor with its exact byte size, from the checkpoint's ``{name: (shape,
    safetensors dtype)}``: floats become ``itemsize`` bytes each, other tensors keep theirs.
    Refuses a checkpoint lacking a layer's parts."""
    left = dict(shapes)
    plan = []
    for layer, spec in layers.items():
        parts = [f"{layer}.{p}" for p in ("qweight", "scale", "offset")]
        if missing := [p for p in parts if p not in left]:
            raise QaloraError(f"checkpoint lacks {missing[0]!r} of quantized layer {layer!r}")
        for p in parts:
            del left[p]
        out, groups = spec["out_features"], spec["in_features"] // spec["group_size"]
        plan += [_Tensor(f"{layer}.weight", layer, "weight", out * spec["in_features"] * spec["bits"] // 8),
                 _Tensor(f"{layer}.scales", layer, "scales", out * groups * itemsize),
                 _Tensor(f"{layer}.biases", layer, "biases", out * groups * itemsize)]
    for key, (shape, stored) in left.items():
        if key.endswith("rotary_emb.inv_freq"):  # recomputed by mlx-lm (its sanitize drops them too)
            continue
        n = 1
        for d in shape:
            n *= d
        floating = stored in _FLOAT
        plan.append(_Tensor(key, key, "float" if floating else "raw", n * (itemsize if floating else _BYTES[stored])))
    return sorted(plan, key=lambda t: t.name)


def shard(plan: list[_Tensor], limit: int) -> list[list[_Tensor]]:
    """Consecutive runs of tensors of at most ``limit`` bytes (a bigger tensor gets its own), as
    mlx-lm's ``make_shards``."""
    shards, size = [], 0
    for t in plan:
        if not shards or size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def convert_tensor(t: _Tensor, get, layers: dict[str, dict], dtype: torch.dtype, qparams: dict,
                   errors: dict) -> torch.Tensor:
    """The tensor to write for ``t``; ``get(name)`` reads a checkpoint tensor. A layer's cast
    ``(scales, biases)`` are kept in ``qparams`` for its second part, and its weight error
    (:func:`weight_error`) recorded in ``errors``."""
    if t.part == "raw":
        return get(t.source)
    if t.part == "weight":
        return mlx_words(get(f"{t.source}.qweight"))
    if t.part == "float":
        w = get(t.source)
        out = w.to(dtype).contiguous()
        if not bool(torch.isfinite(out).all()):
            raise QaloraError(f"{t.source} reaches {float(w.abs().max()):.4g}, beyond {_dtype_name(dtype)}'s range; "
                              "export with dtype='float32' or 'bfloat16'")
        return out
    if t.source not in qparams:
        spec = layers[t.source]
        qw = QuantizedWeight(*(get(f"{t.source}.{p}") for p in ("qweight", "scale", "offset")),
                             spec["bits"], spec["group_size"], spec["in_features"])
        qparams[t.source] = mlx_qparams(qw.scale, qw.offset, dtype, t.source)
        err, peak = weight_error(qw, *qparams[t.source])
        errors[t.source] = {"max_abs_error": err, "max_abs_weight": peak}
    return qparams[t.source][0 if t.part == "scales" else 1]


# --------------------------------------------------------------------------- config

def _rope(raw: dict) -> tuple[float | None, dict | None]:
    """``(rope_theta, rope_scaling)`` as mlx-lm's models read them, from transformers 5's
    ``rope_parameters`` or an older config's top-level keys."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise QaloraError(f"per-layer-type RoPE parameters {params!r} are not supported by the MLX exporter")
    theta = params.pop("rope_theta", raw.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise QaloraError(f"RoPE type {rope_type!r} is not supported by the MLX exporter; it writes "
                          f"{', '.join(ROPE_TYPES)}")
    return theta, (params if rope_type != "default" else None)


def mlx_config(raw: dict, quantization: dict, overrides: dict, untie: bool, dtype: str) -> tuple[dict, list[str]]:
    """``(config.json for mlx-lm, notes)`` from the checkpoint's transformers config; refuses
    models mlx-lm's llama / qwen2 / qwen3 would not compute the same way."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise QaloraError(f"the MLX export writes {', '.join(MODEL_TYPES)} models (mlx-lm's llama, qwen2, qwen3); "
                          f"this checkpoint is {model_type!r}")
    act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if act != "silu":
        raise QaloraError(f"hidden_act {act!r} is not supported: mlx-lm's {MODEL_TYPES[model_type]} MLP is SiLU-gated")
    heads = raw["num_attention_heads"]
    notes = []
    if model_type == "qwen2" and raw.get("head_dim") not in (None, raw["hidden_size"] // heads):
        raise QaloraError(f"head_dim {raw['head_dim']} differs from hidden_size / heads; mlx-lm's qwen2 model "
                          "assumes hidden_size / num_attention_heads")
    if model_type == "qwen3" and raw.get("attention_bias"):
        raise QaloraError("attention_bias is true; mlx-lm's qwen3 model has no attention biases")
    if model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        notes.append(f"transformers' {model_type} config enables a sliding window; mlx-lm's {model_type} attends to "
                     "the full context (outputs agree up to the window)")
    if model_type == "mistral" and raw.get("sliding_window"):
        notes.append(f"transformers' Mistral attends within a sliding window of {raw['sliding_window']} tokens; "
                     "mlx-lm's llama attends to the full context (outputs agree up to the window)")
    config = {k: v for k, v in raw.items() if k not in ("quantization_config", "_name_or_path")}
    theta, scaling = _rope(raw)
    if theta is not None:
        config["rope_theta"] = float(theta)
    config.pop("rope_scaling", None)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if untie:
        config["tie_word_embeddings"] = False
        notes.append("lm_head is quantized: written as its own quantized layer, tie_word_embeddings false")
    block = {**quantization, **overrides}
    config.update(quantization=block, quantization_config=dict(block), dtype=dtype)
    return config, notes


# --------------------------------------------------------------------------- export

def export_mlx(model_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float16",
               progress: bool = True, files=None) -> dict:
    """Write the qalora checkpoint ``model_dir`` (quantized or merged) as an mlx-lm folder ``out`` (new).

    Args:
        dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``: scales, biases,
            embeddings, norms and any unquantized matrix; codes are stored as they are.
    Returns:
        the report (also ``export_info.json``): path, folder and weight bytes, the quantization
        block, per-layer overrides, files, notes, and the max abs weight error of storing
        scale/offset in ``dtype`` (overall, relative to each layer's max |w|, and per layer).
    """
    from qalora.safetensors_file import SafetensorsFile
    from safetensors.torch import save_file

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise QaloraError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    out = check_new_output(out)
    model_dir = Path(model_dir).expanduser()
    meta = read_meta(model_dir)
    layers = meta["layers"]
    quantization, overrides = check_layers(layers)
    raw = read_json(model_dir / "config.json", "model config")
    untie = bool(raw.get("tie_word_embeddings", False)) and "lm_head" in layers  # a quantized lm_head is its own
    config, notes = mlx_config(raw, quantization, overrides, untie, dtype)
    weights = check_weights(model_dir, meta, files)  # the recorded SHA-256, always (once per command)

    with SafetensorsFile(weights) as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        plan = plan_tensors(shapes, layers, torch_dtype.itemsize)
        names = {t.name for t in plan}
        if not config.get("tie_word_embeddings", False) and "lm_head.weight" not in names:
            raise QaloraError("the checkpoint has no lm_head but its config does not tie it to the embeddings")
        shards = shard(plan, SHARD_BYTES)
        shard_files = [WEIGHTS_FILE] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        errors = {}
        with atomic_dir(out) as tmp, tqdm(total=len(plan), desc="mlx", disable=not progress) as bar:
            weight_map = {}
            for file, part in zip(shard_files, shards):
                tensors, qparams = {}, {}
                for t in part:
                    tensors[t.name] = convert_tensor(t, f.get_tensor, layers, torch_dtype, qparams, errors)
                    weight_map[t.name] = file
                    bar.update()
                save_file(tensors, str(tmp / file), metadata={"format": "mlx"})
                del tensors, qparams
            if len(shard_files) > 1:
                write_json(tmp / INDEX_FILE, {"metadata": {"total_size": sum(t.nbytes for t in plan)},
                                              "weight_map": dict(sorted(weight_map.items()))})
                shard_files.append(INDEX_FILE)
            write_json(tmp / "config.json", config)
            copied = [n for n in SIDE_FILES if (model_dir / n).is_file()]
            for n in copied:
                if n == "tokenizer.json":  # the same JSON without indentation: 3.5 -> 1.6 MB for SmolLM2
                    (tmp / n).write_text(json.dumps(read_json(model_dir / n, "tokenizer"), ensure_ascii=False,
                                                    separators=(",", ":")), encoding="utf-8")
                else:
                    shutil.copyfile(model_dir / n, tmp / n)
            err, rel = error_summary(errors)
            info = {"format": "mlx", "mlx_model": MODEL_TYPES[config["model_type"]], "model_type": config["model_type"],
                    "dtype": dtype, "quantization": quantization, "overrides": overrides,
                    "quantized_layers": len(layers), "tie_word_embeddings": bool(config.get("tie_word_embeddings")),
                    "source": str(model_dir.resolve()), "source_sha256": weights_sha256(meta),
                    "source_method": meta.get("method"), "notes": notes,
                    "files": sorted(["config.json", *shard_files, *copied, INFO_FILE]),
                    "weights_bytes": sum(t.nbytes for t in plan), "max_abs_error": err, "max_rel_error": rel,
                    "layers": errors}
            write_json(tmp / INFO_FILE, info)
    report = folder_report(out, weights, info, time.perf_counter() - start)
    if progress:
        print(format_report(report), flush=True)
    return report


def format_report(report: dict) -> str:
    """A few human-readable lines summarising an ``export_mlx`` report."""
    q = report["quantization"]
    lines = [f"wrote {report['path']} ({report['folder_bytes'] / 2**20:.1f} MiB; qalora weights "
             f"{report['source_bytes'] / 2**20:.1f} MiB): {report['quantized_layers']} layers as MLX affine "
             f"int{q['bits']} g{q['group_size']}"
             + (f" ({len(report['overrides'])} with their own bits/group)" if report["overrides"] else "")
             + f", {report['dtype']} scales/biases/embeddings, mlx-lm model {report['mlx_model']}",
             (f"max abs weight error vs qalora's fp32 weights: {report['max_abs_error']:.3g} "
              f"({report['max_rel_error']:.2g} of the layer's max |w|; {report['dtype']} storage of scale and offset)"),
             "load it with mlx_lm.load(path) (needs mlx-lm, not qalora)"]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
