"""Export a qalora checkpoint as a transformers-native torchao folder that
``AutoModelForCausalLM.from_pretrained(out)`` loads on CPU without qalora (transformers + torchao).

    export_torchao("ckpt", "ckpt-torchao")        # -> report dict

Each quantized linear becomes an ``IntxUnpackedToInt8Tensor`` (torchao's
``IntxWeightOnlyConfig(weight_dtype=torch.int{b}, granularity=PerGroup(L),
mapping_type=MappingType.ASYMMETRIC)``) built from the checkpoint's own codes, scales and
float offsets, never re-quantized from a dense weight. The conventions, per (row o, group g)::

    qalora:   w = q * scale + offset                    q in [0, 2^b - 1]
    torchao:  w = (qdata - zero_point) * scale          qdata in [-2^(b-1), 2^(b-1) - 1]
    =>        qdata = q - 2^(b-1)                        (exact, int8)
              zero_point = -2^(b-1) - offset / scale     (a float; computed in fp64, stored fp32)

torchao dequantizes in the tensor's dtype: ``(qdata.to(dtype) - zero_point.to(dtype)) * scale``.
The export is fp32 throughout (scale, zero point, dequantize arithmetic and the unquantized
tensors), so the only differences from qalora's fp32 ``q * scale + offset`` are fp32 roundings:
``|Δw| ≲ 2^-22 · (|offset| + 2^b · scale)`` per group. A bf16 ``scale`` / ``zero_point`` would
not do: ``zero_point`` is of order ``2^(b-1) + |offset| / scale`` and bf16 keeps 8 significant
bits, i.e. up to half a code step of error. (Loading the folder with ``dtype=torch.bfloat16``
casts them to bf16 all the same: load it in fp32, the folder's own ``dtype``.)

A group with ``scale == 0`` (or an ``offset / scale`` beyond fp32's range) dequantizes to its
offset whatever its codes; qalora's quantizers never write one (a constant group gets scale 1).
Such a group is written as codes 0, scale 1, ``zero_point = -2^(b-1) - offset``: the same weights.

Written into the new folder ``out`` (a temporary sibling renamed into place when complete):
``config.json`` (with ``quantization_config``, ``dtype: float32``), ``model.safetensors``
(torchao's flattened tensors: ``<layer>._weight_qdata`` int8 one code per byte,
``._weight_scale``, ``._weight_zero_point`` fp32), ``generation_config.json``, the tokenizer files,
and ``export_info.json`` (source hash, bits, group size, the weight error measured here).
Memory: the model itself (int8 codes) plus one layer's unpacked codes at a time.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qalora.checkpoint import check_weights, read_meta, weights_sha256
from qalora.errors import QaloraError
from qalora.quiet import quiet_imports
from qalora.io import atomic_dir, check_new_output, write_json
from qalora.quant.qparams import dequantize
from qalora.quant.weight import QuantizedWeight

INFO_FILE = "export_info.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
ERROR_CHUNK = 1 << 20  # weights per chunk when measuring a layer's error (4 MiB of fp32 per side)


def _torchao():
    """torchao's quantization namespace, imported on first use (an optional dependency)."""
    try:
        with quiet_imports():
            import torchao.quantization as tq
    except ImportError:
        raise QaloraError("the torchao export needs torchao; install it with: pip install 'qalora[export]'") from None
    return tq


# --------------------------------------------------------------------------- tensors

def torchao_qparams(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our ``(codes, scale, offset)`` in torchao's convention ``w = (qdata - zero_point) * scale``.

    Args:
        codes: integer ``[out, in]`` in ``0 … 2^b - 1``.
        scale, offset: ``[out, in / L]``.
    Returns:
        ``qdata`` int8 ``[out, in]`` = ``codes - 2^(b-1)``; ``scale`` fp32 ``[out, in / L]``;
        ``zero_point`` fp32 ``[out, in / L]`` = ``-2^(b-1) - offset / scale`` (fp64, rounded
        once). Degenerate groups (scale 0, or ``offset / scale`` not finite in fp32) become codes
        0, scale 1, ``zero_point = -2^(b-1) - offset``: every weight equals ``offset``, as before.
    """
    half = 2 ** (bits - 1)
    s64, o64 = scale.double(), offset.double()
    zero = (-half - o64 / s64).float()
    bad = (scale == 0) | ~torch.isfinite(zero)
    qdata = codes.to(torch.int16) - half
    if bool(bad.any()):
        zero = torch.where(bad, (-half - o64).float(), zero)
        s64 = torch.where(bad, torch.ones_like(s64), s64)
        group = codes.shape[1] // scale.shape[1]
        qdata = torch.where(bad.repeat_interleave(group, dim=1), torch.full_like(qdata, -half), qdata)
    return qdata.to(torch.int8), s64.float(), zero


def torchao_weight(qw: QuantizedWeight):
    """An ``IntxUnpackedToInt8Tensor`` ``[out, in]`` (fp32, block ``(1, L)``) holding ``qw``'s
    codes, scales and float offsets."""
    tq = _torchao()
    qdata, scale, zero = torchao_qparams(qw.codes(), qw.scale, qw.offset, qw.bits)
    return tq.IntxUnpackedToInt8Tensor(qdata, scale, zero, getattr(torch, f"int{qw.bits}"), (1, qw.group_size),
                                       torch.float32, None)


def weight_error(tensor, qw: QuantizedWeight) -> tuple[float, float]:
    """``(max |w_torchao - w_qalora|, max |w_qalora|)`` over the layer, both dequantized in fp32
    (torchao's own ``dequantize``), a few rows at a time so no dense copy of the layer is held."""
    rows = max(1, ERROR_CHUNK // qw.in_features)
    codes = qw.codes()
    err = peak = 0.0
    for r in range(0, qw.out_features, rows):
        ours = dequantize(codes[r:r + rows], qw.scale[r:r + rows], qw.offset[r:r + rows], qw.group_size)
        theirs = tensor[r:r + rows].dequantize()
        err = max(err, float((theirs - ours).abs().max()))
        peak = max(peak, float(ours.abs().max()))
    return err, peak


# --------------------------------------------------------------------------- model

def _check_layers(layers: dict[str, dict]) -> tuple[int, int]:
    """The one ``(bits, group_size)`` every quantized layer shares (one torchao config)."""
    if not layers:
        raise QaloraError("the checkpoint has no quantized layers; the torchao export writes quantized checkpoints")
    kinds = {spec.get("kind", "affine") for spec in layers.values()}
    if kinds != {"affine"}:
        raise QaloraError(f"the torchao exporter writes affine (scale * q + offset) layers; this checkpoint has "
                          f"{', '.join(sorted(kinds))}")
    pairs = sorted({(spec["bits"], spec["group_size"]) for spec in layers.values()})
    if len(pairs) != 1:
        raise QaloraError(f"the torchao export writes one IntxWeightOnlyConfig; this checkpoint mixes "
                          f"(bits, group_size) {pairs}")
    return pairs[0]


def _skeleton(config):
    """The model on the meta device (buffers computed at init, e.g. rotary tables, are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _set_tensor(model, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise QaloraError(f"checkpoint tensor {name!r} has no place in a {model.config.model_type} model")


def build_model(reader, layers: dict[str, dict], config, progress: bool = True):
    """The transformers model with torchao weights, read tensor by tensor from ``reader``
    (a ``safe_open`` handle on the checkpoint's weights).

    Returns ``(model, errors)``: ``errors[layer] = {"max_abs_error", "max_abs_weight"}``.
    """
    model = _skeleton(config)
    output = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if getattr(config, "tie_word_embeddings", False) and output in layers:
        config.tie_word_embeddings = False  # a quantized lm_head has its own weights (qalora does not tie it)
        model = _skeleton(config)
    keys = set(reader.keys())
    errors = {}
    for name, spec in tqdm(layers.items(), desc="torchao", disable=not progress):
        parts = [f"{name}.{p}" for p in ("qweight", "scale", "offset")]
        if missing := [p for p in parts if p not in keys]:
            raise QaloraError(f"checkpoint lacks {missing[0]!r} of quantized layer {name!r}")
        keys.difference_update(parts)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QaloraError(f"checkpoint layer {name!r} does not exist in a {config.model_type} model") from None
        if not isinstance(module, torch.nn.Linear):
            raise QaloraError(f"checkpoint layer {name!r} is a {type(module).__name__} in transformers, not a Linear")
        qw = QuantizedWeight(*(reader.get_tensor(p) for p in parts), spec["bits"], spec["group_size"], spec["in_features"])
        if not (torch.isfinite(qw.scale).all() and torch.isfinite(qw.offset).all()):
            raise QaloraError(f"layer {name!r} has inf or NaN scales or offsets")
        tensor = torchao_weight(qw)
        module.weight = torch.nn.Parameter(tensor, requires_grad=False)
        err, peak = weight_error(tensor, qw)
        errors[name] = {"max_abs_error": err, "max_abs_weight": peak}
    for key in sorted(keys):
        t = reader.get_tensor(key)
        _set_tensor(model, key, t.float() if t.is_floating_point() else t)
    model.tie_weights()
    if missing := [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]:
        raise QaloraError(f"the checkpoint lacks tensors: {missing[:3]}")
    return model.eval(), errors


def torchao_config(model, layers: dict[str, dict], bits: int, group_size: int):
    """transformers' ``TorchAoConfig`` describing the quantized layers; dense ``nn.Linear``
    layers (e.g. an unquantized ``lm_head``) are listed in ``modules_to_not_convert``."""
    from transformers import TorchAoConfig

    tq = _torchao()
    weight = tq.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=tq.PerGroup(group_size),
                                     mapping_type=tq.MappingType.ASYMMETRIC)
    dense = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layers]
    return TorchAoConfig(weight, modules_to_not_convert=dense)


# --------------------------------------------------------------------------- export

@contextmanager
def _transformers_progress(enabled: bool):
    """transformers' own progress bars (``save_pretrained``'s shard writer) on or off for a while."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def export_torchao(model_dir: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Write the qalora checkpoint ``model_dir`` as a transformers + torchao folder ``out`` (new).

    The checkpoint's weights are checked against their recorded SHA-256 first.

    Returns:
        the report (also written as ``export_info.json``): path, folder bytes, bits, group size,
        source checkpoint and hash, versions, the max abs weight error vs qalora's fp32 weights
        (and relative to each layer's max |w|), per layer, and the files copied.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    start = time.perf_counter()
    out = check_new_output(out)
    model_dir = Path(model_dir).expanduser()
    meta = read_meta(model_dir)
    _torchao()  # refuse early when torchao is missing
    weights = check_weights(model_dir, meta)
    want = weights_sha256(meta)
    bits, group_size = _check_layers(meta["layers"])
    config = AutoConfig.from_pretrained(model_dir)

    with safe_open(str(weights), framework="pt") as reader:
        model, errors = build_model(reader, meta["layers"], config, progress)
    qconfig = torchao_config(model, meta["layers"], bits, group_size)
    model.config.quantization_config = qconfig
    model.hf_quantizer = TorchAoHfQuantizer(qconfig, pre_quantized=False)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)

    err = max((e["max_abs_error"] for e in errors.values()), default=0.0)
    rel = max((e["max_abs_error"] / e["max_abs_weight"] for e in errors.values() if e["max_abs_weight"] > 0), default=0.0)
    info = {"format": "torchao", "torchao_config": f"IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, "
            f"granularity=PerGroup({group_size}), mapping_type=MappingType.ASYMMETRIC)",
            "tensor": "IntxUnpackedToInt8Tensor (qdata = q - 2^(b-1), zero_point = -2^(b-1) - offset / scale, fp32)",
            "bits": bits, "group_size": group_size, "quantized_layers": len(errors),
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "source": str(model_dir.resolve()), "source_sha256": want, "source_method": meta.get("method"),
            "versions": {"torchao": version("torchao"), "transformers": version("transformers"),
                         "torch": torch.__version__},
            "max_abs_error": err, "max_rel_error": rel, "layers": errors}
    with atomic_dir(out) as tmp, _transformers_progress(progress):
        model.save_pretrained(tmp)
        info["files"] = sorted(p.name for p in tmp.iterdir()) + _copy_side_files(model_dir, tmp) + [INFO_FILE]
        write_json(tmp / INFO_FILE, info)
    report = {"path": str(out), "folder_bytes": sum(p.stat().st_size for p in out.iterdir()),
              "source_bytes": weights.stat().st_size, **info, "seconds": round(time.perf_counter() - start, 2)}
    if progress:
        print(format_report(report), flush=True)
    return report


def format_report(report: dict) -> str:
    """A few human-readable lines summarising an ``export_torchao`` report."""
    return "\n".join([
        f"wrote {report['path']} ({report['folder_bytes'] / 2**20:.1f} MiB; qalora weights "
        f"{report['source_bytes'] / 2**20:.1f} MiB): {report['quantized_layers']} layers int{report['bits']} "
        f"g{report['group_size']} as torchao IntxUnpackedToInt8Tensor",
        f"max abs weight error vs qalora's fp32 weights: {report['max_abs_error']:.3g} "
        f"({report['max_rel_error']:.2g} of the layer's max |w|; fp32 rounding)",
        "load it with transformers.AutoModelForCausalLM.from_pretrained(path) (needs torchao, not qalora)"])
