"""The qalora checkpoint: a folder a user can inspect and ``qalora.load`` reads back.

Layout (format version 1)::

    DIR/qalora.json          format, version, bits, group size, method, source model, layer list,
                             quantization report, sha256 of the weights file
    DIR/model.safetensors    every tensor of the model; quantized linears as ``<name>.qweight``
                             (uint8, bit-packed), ``<name>.scale`` and ``<name>.offset`` (fp32);
                             tied weights stored once
    DIR/config.json, generation_config.json, tokenizer files   (transformers' own)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qalora.errors import QaloraError
from qalora.io import FileCache, atomic_dir, is_sha256, read_json, sha256_file, write_json
from qalora.nn.quant_linear import QuantLinear
from qalora.safetensors_file import load_tensors
from qalora.patch import set_submodule

FORMAT = "qalora"
FORMAT_VERSION = 1
META_FILE = "qalora.json"
WEIGHTS_FILE = "model.safetensors"


def _affine_spec(m: QuantLinear) -> dict:
    return {"kind": "affine", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "group_size": m.group_size, "bias": m.bias is not None}


def _affine_build(spec: dict, name: str, kernel: str) -> QuantLinear:
    return QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                       bias=spec["bias"], device="meta", kernel=kernel, name=name)


# kind -> (layer class, describe a layer, build an empty one on the meta device)
LAYER_KINDS = {"affine": (QuantLinear, _affine_spec, _affine_build)}


def layer_table(model: nn.Module) -> dict[str, dict]:
    """``{module name: spec}`` of every quantized layer, each spec naming its ``kind``."""
    table = {}
    for n, m in model.named_modules():
        for kind, (cls, spec, _) in LAYER_KINDS.items():
            if type(m) is cls:
                table[n] = spec(m)
    return table


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared storage (tied embeddings) kept once, contiguous, on CPU."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def write_checkpoint(model: nn.Module, tokenizer, folder: Path, meta: dict, files: FileCache | None = None) -> dict:
    """Write the checkpoint files into an existing (staging) ``folder``; returns ``qalora.json``.
    ``files``: the command's :class:`~qalora.io.FileCache`, told the weights' SHA-256 (computed
    here), so a later load in the same command does not hash the file again."""
    layers = layer_table(model)
    if not layers:
        raise QaloraError("the model has no quantized layers to save; quantize it first")
    folder = Path(folder)
    save_file(_unique_state(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt", "qalora": str(FORMAT_VERSION)})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    digest = sha256_file(folder / WEIGHTS_FILE)
    if files is not None:
        files.remember(folder / WEIGHTS_FILE, digest)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "layers": layers,
            "sha256": {WEIGHTS_FILE: digest}}
    write_json(folder / META_FILE, full)
    return full


def save_checkpoint(model: nn.Module, tokenizer, out: str | os.PathLike, meta: dict,
                    files: FileCache | None = None) -> dict:
    """Write ``model`` (with its ``QuantLinear`` layers) to a new folder ``out``, atomically.
    Returns the ``qalora.json`` written (``meta`` plus format, layer table and hash)."""
    if not layer_table(model):
        raise QaloraError("the model has no quantized layers to save; quantize it first")
    with atomic_dir(out) as tmp:
        return write_checkpoint(model, tokenizer, tmp, meta, files)


def read_meta(path: str | os.PathLike) -> dict:
    """The checkpoint's ``qalora.json``, validated (format, version, layer table, and the recorded
    SHA-256 of the weights file, without which a checkpoint cannot be verified and is refused)."""
    path = Path(path)
    if not path.is_dir():
        raise QaloraError(f"checkpoint {str(path)!r} is not a folder")
    meta = read_json(path / META_FILE, "qalora checkpoint metadata")
    if meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
        raise QaloraError(f"{str(path / META_FILE)!r} is not a qalora checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise QaloraError(f"checkpoint format version {meta.get('format_version')!r} is not supported; "
                          f"this qalora reads version {FORMAT_VERSION}")
    want = meta.get("sha256")
    if not isinstance(want, dict) or not is_sha256(want.get(WEIGHTS_FILE)):
        raise QaloraError(f"{str(path / META_FILE)!r} has no sha256 of {WEIGHTS_FILE}; "
                          "it was not written by qalora or was edited")
    return meta


def weights_sha256(meta: dict) -> str:
    """The recorded SHA-256 of the weights file (``meta`` from :func:`read_meta`): the
    checkpoint's fingerprint, which adapters, merges and exports record as their input."""
    return meta["sha256"][WEIGHTS_FILE]


def check_weights(path: str | os.PathLike, meta: dict, files: FileCache | None = None) -> Path:
    """The weights file of checkpoint ``path``, after checking that it exists and that its SHA-256
    equals the one recorded in ``qalora.json`` (always: a load is never unverified; with
    ``files``, a file this command already hashed, unchanged since, is not hashed again)."""
    wf = Path(path) / WEIGHTS_FILE
    if not wf.is_file():
        raise QaloraError(f"checkpoint weights {str(wf)!r} are missing")
    if (files.sha256(wf) if files is not None else sha256_file(wf)) != weights_sha256(meta):
        raise QaloraError(f"checkpoint weights {str(wf)!r} are corrupt (sha256 differs from {META_FILE})")
    return wf


def _mapped_tensors(wf: Path) -> dict[str, torch.Tensor]:
    try:  # memory-mapped: pages are read when first touched (rows of a large embedding never are)
        return load_file(str(wf))
    except (SafetensorError, OSError, ValueError) as e:
        raise QaloraError(f"checkpoint weights {str(wf)!r} are corrupt ({e})") from None


def _read_weights(path: Path, meta: dict, mapped: bool = True, files: FileCache | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's verified tensors: memory-mapped, or (``mapped=False``) each in its own
    memory; with ``files``, the file is mapped once per command and later reads come from there."""
    wf = check_weights(path, meta, files)
    if files is not None:
        state = files.tensors(wf, _mapped_tensors)
        return state if mapped else {k: v.clone() for k, v in state.items()}
    return _mapped_tensors(wf) if mapped else load_tensors(wf)


def read_tensors(path: str | os.PathLike, meta: dict, files: FileCache | None = None) -> dict[str, torch.Tensor]:
    """The verified tensors of checkpoint ``path`` (``meta``: its :func:`read_meta`), memory-mapped."""
    return _read_weights(Path(path), meta, True, files)


def load(path: str | os.PathLike, kernel: str = "auto", device: str | torch.device = "cpu", mapped: bool = True,
         files: FileCache | None = None):
    """Load a qalora checkpoint as a plain transformers ``PreTrainedModel`` (eval mode) whose
    quantized linears are ``QuantLinear``; ``generate()`` works on it.

    The model skeleton is built with empty (meta) parameters, so no full-precision copy of the
    quantized weights is ever materialised; buffers computed at init (rotary tables) are real.
    The weights file is checked against its recorded SHA-256 first. ``mapped`` keeps the file
    memory-mapped (pages read when first touched: the cheaper choice when tensors stay as they
    are); ``mapped=False`` reads every tensor into its own memory, the cheaper choice when the
    caller replaces tensors (the merge's fp64 checks), since a map stays resident while any
    tensor still points into it. ``files``: the command's :class:`~qalora.io.FileCache` (the file
    is hashed and read once per command).
    """
    from qalora.quiet import import_transformers

    import_transformers()  # the Python API as quiet as the CLI: torchao's import noise silenced
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    meta = read_meta(path)
    state = _read_weights(path, meta, mapped, files)
    config = AutoConfig.from_pretrained(path)
    dtype = next((t.dtype for n, t in state.items() if t.is_floating_point() and n.endswith("norm.weight")), torch.float32)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in meta["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise QaloraError(f"checkpoint layer {name!r} does not exist in a {config.model_type} model") from None
        kind = spec.get("kind", "affine")
        if kind not in LAYER_KINDS:
            raise QaloraError(f"checkpoint layer {name!r} has kind {kind!r}; this qalora reads "
                              f"{', '.join(LAYER_KINDS)}")
        set_submodule(model, name, LAYER_KINDS[kind][2](spec, name, kernel))
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise QaloraError(f"checkpoint {str(path)!r} has tensors the model lacks: {result.unexpected_keys[:3]}")
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise QaloraError(f"checkpoint {str(path)!r} lacks tensors: {missing[:3]}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.qalora_meta = meta
    return model.to(device).eval()
