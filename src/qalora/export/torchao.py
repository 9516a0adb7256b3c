"""Export a qalora checkpoint as a transformers + torchao folder that
``AutoModelForCausalLM.from_pretrained(out)`` loads on CPU without qalora.

    export_torchao("ckpt", "ckpt-torchao")                       # -> report dict; layout="unpacked"
    export_torchao("ckpt", "ckpt-packed", layout="packed")       # b <= 4: two codes per byte

Each quantized linear becomes a torchao tensor built from the checkpoint's own codes, scales and
float offsets, never re-quantized from a dense weight (the two layouts, their conventions and why
no other torchao 0.18 type serves on CPU: ``torchao_layouts``). Per (row o, group g), unpacked::

    qalora:   w = q * scale + offset                    q in [0, 2^b - 1]
    torchao:  w = (qdata - zero_point) * scale          qdata = q - 2^(b-1), zero_point = -2^(b-1) - offset / scale
    packed:   w = (q - 8) * scale + zero                zero = offset + 8 * scale (tinygemm)

The export is fp32 throughout (scale, zero point, the arithmetic and the unquantized tensors), so
the only differences from qalora's fp32 ``q * scale + offset`` are fp32 roundings:
``|Δw| ≲ 2^-22 · (|offset| + 2^b · scale)`` per group (``2^4`` for packed, whose ``|q - 8| <= 8``).
A bf16 ``scale`` / zero would not do: the zero is of order ``|offset| / scale`` code steps and bf16
keeps 8 significant bits, i.e. up to half a code step of error (load the folder in fp32, its own ``dtype``).

``unpacked`` (``IntxUnpackedToInt8Tensor``, safetensors, any width, the default) loads with a plain
``from_pretrained`` on any CPU and dequantizes every call. ``packed`` (``Int4OpaqueTensor``, torch
pickle ``pytorch_model.bin``, b in 2/3/4) halves the codes' bytes and runs torch's CPU int4 kernel
(fp32: its scalar path), but it loads only after ``import torchao.prototype.quantization.int4`` and its
bytes are laid out for one ATen CPU capability (``cpu_capability``, default this machine's): on a
machine that dispatches to another (AVX512 vs AVX2 vs DEFAULT) the logits are wrong, silently.

A group with ``scale == 0`` dequantizes to its offset whatever its codes (qalora's quantizers never
write one); both layouts keep that. Written into the new folder ``out`` (a temporary sibling renamed
into place when complete): ``config.json`` (``quantization_config``, ``dtype: float32`` and a
``qalora_torchao`` record of the layout), the weights file, ``generation_config.json``, the tokenizer
files, and ``export_info.json`` (source hash, bits, group size, layout, the weight error measured here).
Memory: the model itself plus one layer's unpacked codes at a time.
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
from qalora.export.summary import error_summary, folder_report
from qalora.export.torchao_layouts import (  # noqa: F401  (torchao_qparams, torchao_weight re-exported)
    DEFAULT_LAYOUT,
    PACKED_LOAD,
    Layout,
    _check_capability,
    get_layout,
    packed_refusal,
    torchao_qparams,
    torchao_weight,
)
from qalora.export.torchao_layouts import _torchao_quantization as _torchao
from qalora.export.torchao_layouts import cpu_capability as machine_capability
from qalora.io import atomic_dir, check_new_output, write_json
from qalora.quant.qparams import dequantize
from qalora.quant.weight import QuantizedWeight
from qalora.quiet import import_transformers

INFO_FILE = "export_info.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
ERROR_CHUNK = 1 << 20  # weights per chunk when measuring a layer's error (4 MiB of fp32 per side)


# --------------------------------------------------------------------------- tensors

def weight_error(read_rows, qw: QuantizedWeight) -> tuple[float, float]:
    """``(max |w_torchao - w_qalora|, max |w_qalora|)`` over the layer, both dequantized in fp32
    (``read_rows(r0, r1)``: torchao's rows, see ``Layout.reader``), a few rows at a time so no dense
    copy of the layer is held."""
    rows = max(1, ERROR_CHUNK // qw.in_features)
    codes = qw.codes()
    err = peak = 0.0
    for r in range(0, qw.out_features, rows):
        ours = dequantize(codes[r:r + rows], qw.scale[r:r + rows], qw.offset[r:r + rows], qw.group_size)
        theirs = read_rows(r, r + rows)
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
        raise QaloraError(f"the torchao export writes one torchao config; this checkpoint mixes "
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


def build_model(reader, layers: dict[str, dict], config, progress: bool = True, layout: str = DEFAULT_LAYOUT,
                capability: str | None = None):
    """The transformers model with torchao weights in ``layout`` (``capability``: the packed layout's
    CPU), read tensor by tensor from ``reader`` (a ``SafetensorsFile`` on the checkpoint's weights).

    Returns ``(model, errors)``: ``errors[layer] = {"max_abs_error", "max_abs_weight"}``.
    """
    model = _skeleton(config)
    output = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if getattr(config, "tie_word_embeddings", False) and output in layers:
        config.tie_word_embeddings = False  # a quantized lm_head has its own weights (qalora does not tie it)
        model = _skeleton(config)
    keys = set(reader.keys())
    errors, lay = {}, get_layout(layout)
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
        if lay.name == "packed" and (why := packed_refusal(qw.bits, qw.group_size, qw.out_features)):
            raise QaloraError(f"layer {name!r}: {why}")
        tensor = lay.build(qw, capability)
        module.weight = torch.nn.Parameter(tensor, requires_grad=False)
        err, peak = weight_error(lay.reader(tensor, qw, capability), qw)
        errors[name] = {"max_abs_error": err, "max_abs_weight": peak}
    for key in sorted(keys):
        t = reader.get_tensor(key)
        _set_tensor(model, key, t.float() if t.is_floating_point() else t)
    model.tie_weights()
    if missing := [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]:
        raise QaloraError(f"the checkpoint lacks tensors: {missing[:3]}")
    return model.eval(), errors


def torchao_config(model, layers: dict[str, dict], bits: int, group_size: int, layout: str = DEFAULT_LAYOUT):
    """transformers' ``TorchAoConfig`` describing the quantized layers; dense ``nn.Linear``
    layers (e.g. an unquantized ``lm_head``) are listed in ``modules_to_not_convert``.

    packed: ``Int4WeightOnlyConfig(group_size=L)`` is a label (transformers needs a config it can find;
    torchao's own ``PrototypeInt4WeightOnlyConfig`` is not found by ``config_from_dict`` in 0.18): a
    pre-quantized pickle is loaded as pickled, nothing is quantized again."""
    from transformers import TorchAoConfig

    tq = _torchao()
    if layout == "packed":
        weight = tq.Int4WeightOnlyConfig(group_size=group_size)
    else:
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


def _save_pickled(model, folder: Path) -> None:
    """What ``save_pretrained`` writes, with the weights as one torch pickle (``pytorch_model.bin``):
    safetensors refuses ``Int4OpaqueTensor``. Tied tensors are stored once, as transformers does."""
    model.config.dtype = "float32"
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    state, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            state[name] = t.detach()
    torch.save(state, folder / get_layout("packed").weights_file)


def _layout_record(lay: Layout, bits: int, group_size: int, capability: str | None) -> dict:
    """The layout, as ``config.json``'s ``qalora_torchao`` and the report record it."""
    record = {"layout": lay.name, "tensor": lay.tensor, "convention": lay.convention, "bits": bits,
              "group_size": group_size, "weights_file": lay.weights_file}
    if lay.name == "packed":
        record |= {"cpu_capability": capability, "stored_bits": 4,
                   "load": f"{PACKED_LOAD}; then AutoModelForCausalLM.from_pretrained(path) on a CPU whose "
                           f"torch.backends.cpu.get_cpu_capability() is {capability!r}"}
    else:
        record["load"] = "AutoModelForCausalLM.from_pretrained(path)"
    return record


def export_torchao(model_dir: str | os.PathLike, out: str | os.PathLike, *, layout: str = DEFAULT_LAYOUT,
                   cpu_capability: str | None = None, progress: bool = True) -> dict:
    """Write the qalora checkpoint ``model_dir`` as a transformers + torchao folder ``out`` (new).

    The checkpoint's weights are checked against their recorded SHA-256 first.

    Args:
        layout: ``"unpacked"`` (one int8 per code, safetensors, any width, any CPU) or ``"packed"``
            (two codes per byte for b <= 4, torch pickle, one CPU capability; refused with the reason
            when a layer does not fit: bits 8, group size not 32/64/128/256, out_features % 16).
        cpu_capability: packed only: ``"AVX2"``, ``"AVX512"`` or ``"DEFAULT"``, the ATen CPU
            capability of the machine that will load it; default this machine's.
    Returns:
        the report (also written as ``export_info.json``): path, folder bytes, bits, group size,
        layout (and capability), source checkpoint and hash, versions, the max abs weight error vs
        qalora's fp32 weights (and relative to each layer's max |w|), per layer, and the files copied.
    """
    start = time.perf_counter()
    _torchao()  # refuse early when torchao is missing; it and transformers' torchao glue import quietly
    import_transformers()
    from qalora.safetensors_file import SafetensorsFile
    from transformers import AutoConfig, GenerationConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    lay = get_layout(layout)
    if lay.name != "packed" and cpu_capability is not None:
        raise QaloraError(f"cpu_capability applies to layout='packed' only, not {layout!r}")
    capability = (cpu_capability or machine_capability()) if lay.name == "packed" else None
    if capability is not None:
        _check_capability(capability)
    out = check_new_output(out)
    model_dir = Path(model_dir).expanduser()
    meta = read_meta(model_dir)
    weights = check_weights(model_dir, meta)
    want = weights_sha256(meta)
    bits, group_size = _check_layers(meta["layers"])
    if lay.name == "packed" and (why := packed_refusal(bits, group_size)):
        raise QaloraError(why)
    config = AutoConfig.from_pretrained(model_dir)

    with SafetensorsFile(weights) as reader:
        model, errors = build_model(reader, meta["layers"], config, progress, lay.name, capability)
    qconfig = torchao_config(model, meta["layers"], bits, group_size, lay.name)
    record = _layout_record(lay, bits, group_size, capability)
    model.config.quantization_config = qconfig
    model.config.qalora_torchao = record
    model.hf_quantizer = TorchAoHfQuantizer(qconfig, pre_quantized=False)  # save_pretrained's (unpacked)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)

    err, rel = error_summary(errors)
    label = (f"Int4WeightOnlyConfig(group_size={group_size}) (a label: the weights are pickled)" if lay.name == "packed"
             else f"IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, granularity=PerGroup({group_size}), "
                  "mapping_type=MappingType.ASYMMETRIC)")
    info = {"format": "torchao", "torchao_config": label, **record, "quantized_layers": len(errors),
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "source": str(model_dir.resolve()), "source_sha256": want, "source_method": meta.get("method"),
            "versions": {"torchao": version("torchao"), "transformers": version("transformers"),
                         "torch": torch.__version__},
            "max_abs_error": err, "max_rel_error": rel, "layers": errors}
    with atomic_dir(out) as tmp, _transformers_progress(progress):
        if lay.name == "packed":
            _save_pickled(model, tmp)
        else:
            model.save_pretrained(tmp)
        info["files"] = sorted(p.name for p in tmp.iterdir()) + _copy_side_files(model_dir, tmp) + [INFO_FILE]
        write_json(tmp / INFO_FILE, info)
    report = folder_report(out, weights, info, time.perf_counter() - start)
    if progress:
        print(format_report(report), flush=True)
    return report


def format_report(report: dict) -> str:
    """A few human-readable lines summarising an ``export_torchao`` report."""
    return "\n".join([
        (f"wrote {report['path']} ({report['folder_bytes'] / 2**20:.1f} MiB; qalora weights "
         f"{report['source_bytes'] / 2**20:.1f} MiB): {report['quantized_layers']} layers int{report['bits']} "
         f"g{report['group_size']} as torchao {report['tensor']} ({report['layout']})"),
        (f"max abs weight error vs qalora's fp32 weights: {report['max_abs_error']:.3g} "
         f"({report['max_rel_error']:.2g} of the layer's max |w|; fp32 rounding)"),
        f"load it (needs transformers + torchao, not qalora): {report['load']}"])
