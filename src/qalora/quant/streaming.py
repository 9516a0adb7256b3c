"""Load a full-precision model folder one decoder layer at a time, for quantization.

``qalora quantize`` of a 1B model used to hold the whole fp32 model (4 bytes per weight) while
it quantized; at 70B that is 280 GB. Here the model is built as an empty skeleton (parameters on
the meta device; rotary tables, computed at init, real), the tensors outside the decoder stack
(embeddings, final norm, head) are read from the folder's safetensors, and each decoder layer is
read just before it is quantized. Peak memory is then the packed model plus one fp32 layer (plus
GPTQ's calibration activations), whatever the depth::

    skeleton  = from_config(config)                       # meta parameters
    embed, norm, head  <- safetensors                      # fp32
    for i, layer in enumerate(layers):
        layer  <- safetensors[prefix.i.*]                  # fp32, this layer only
        quantize(layer)                                     # fp32 linear weights freed on swap

Tensors are read one at a time with plain file reads (the safetensors layout: an 8-byte header
length, a JSON header of dtypes, shapes and byte ranges, then the data), from ``model.safetensors``
or from the shards named in ``model.safetensors.index.json``. A folder
without safetensors (``pytorch_model.bin``) has no per-tensor access; it is loaded whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qalora.errors import QaloraError
from qalora.io import read_json
from qalora.safetensors_file import SafetensorsFile

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class TensorSource:
    """``{tensor name: safetensors file}`` of a model folder, read one tensor at a time.

    Tensors are read with plain file reads, not a memory map: a map's touched pages count in the
    process's resident memory until it is closed, which would make the whole file look resident."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            index = read_json(self.folder / INDEX, "safetensors shard index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise QaloraError(f"{str(self.folder / INDEX)!r} has no weight_map; it is not a safetensors shard index")
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            raise QaloraError(f"model folder {str(self.folder)!r} has neither {SINGLE} nor {INDEX}")
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            path = self.folder / f
            if not path.is_file():
                raise QaloraError(f"safetensors shard {str(path)!r} named in {INDEX} is missing")
            shard = SafetensorsFile(path)
            for name in shard.keys():
                self._where[name] = shard
        if weight_map is not None:
            lost = [n for n, f in weight_map.items() if n not in self._where or self._where[n].path.name != f]
            if lost:
                raise QaloraError(f"tensor {lost[0]!r} is not in the shard {weight_map[lost[0]]!r} that {INDEX} names")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` as ``dtype`` (floating tensors; others keep theirs), in its own memory."""
        if name not in self._where:
            raise QaloraError(f"model folder {str(self.folder)!r} has no tensor {name!r}")
        t = self._where[name].get_tensor(name)
        return t.to(dtype) if t.is_floating_point() else t


def has_safetensors(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / INDEX).is_file() or (folder / SINGLE).is_file()


def fill(module: nn.Module, prefix: str, source: TensorSource, dtype: torch.dtype = torch.float32,
         skip: tuple[str, ...] = ()) -> None:
    """Replace every meta parameter and persistent buffer of ``module`` (whose state-dict keys
    are ``prefix + name`` in the folder) with the folder's tensor, converted to ``dtype``.
    Names under one of ``skip`` (sub-module prefixes) are left alone."""
    state = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if t.device.type != "meta" or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        value = source.get(prefix + name, dtype)
        if tuple(value.shape) != tuple(t.shape):
            raise QaloraError(f"tensor {prefix + name!r} has shape {tuple(value.shape)} in {str(source.folder)!r}; "
                              f"the model's config expects {tuple(t.shape)}")
        state[name] = value
    if state:
        module.load_state_dict(state, strict=False, assign=True)


def skeleton(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``(model, source, layers_prefix)``: the folder's model with every tensor outside the
    decoder stack loaded and each decoder layer still empty (meta), to be read by
    :func:`layer_loader`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from qalora.patch import decoder_layers

    folder = Path(folder)
    source = TensorSource(folder)
    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        tied = {n for n, m in model.named_modules() if m is out}
    skip = (prefix, *(t for t in tied if f"{t}.weight" not in source))
    fill(model, "", source, dtype, skip=skip)
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval(), source, prefix


def release_freed_memory() -> None:
    """Hand the allocator's freed pages back to the system (glibc's ``malloc_trim``; a no-op
    elsewhere). Freed fp32 layers sit between long-lived packed tensors on the heap, and without
    this the heap keeps their pages, so the peak would grow with depth after all."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def layer_loader(source: TensorSource, prefix: str, dtype: torch.dtype = torch.float32):
    """``load(i, layer)``: read decoder layer ``i``'s tensors from ``source`` into ``layer``
    (after returning the previous layer's freed memory to the system)."""
    def load(i: int, layer: nn.Module) -> None:
        release_freed_memory()
        fill(layer, f"{prefix}.{i}.", source, dtype)
    return load


def check_loaded(model: nn.Module) -> None:
    """Refuse a model that still has meta tensors after streaming (a layer that was never read)."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise QaloraError(f"tensors {left[:3]} were never read from the model folder")
