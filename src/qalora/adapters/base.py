"""The frozen base of each training method, and the fingerprint an adapter records of it.

- ``quantized`` (``qalora``, ``peqa``, ``lota``): a qalora checkpoint of group-wise INTn layers
  (``qalora quantize``), computing in the run's compute dtype: the reference kernel (fp32 just-in-time
  dequantize + GEMM) for fp32, the bf16 int4 kernel where it runs for bf16.
- ``qlora``: a full-precision model whose target projections are quantized to NF4 (block 64)
  in memory, as QLoRA does.
- ``lora``: the full-precision model itself.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qalora.adapters.methods import get_method
from qalora.checkpoint import META_FILE, load, read_meta
from qalora.errors import QaloraError
from qalora.io import sha256_file
from qalora.models import load_fp_model, load_tokenizer
from qalora.patch import find_linears, set_submodule

NF4_BLOCK = 64


@dataclass
class Base:
    model: nn.Module
    tokenizer: object
    path: str
    sha256: str         # fingerprint of the base weights (and of the NF4 step for qlora)
    group_size: int | None
    bits: int | None


def _fp_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise QaloraError(f"model folder {str(folder)!r} has no weight files")
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def quantize_nf4(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), block_size: int = NF4_BLOCK) -> int:
    """Replace every decoder ``nn.Linear`` by an ``NF4Linear`` (QLoRA's frozen base)."""
    from qalora.nn.nf4_linear import NF4Linear

    layers = find_linears(model, skip)
    for name, m in layers:
        set_submodule(model, name, NF4Linear.from_weight(m.weight.data, m.bias, block_size=block_size, name=name))
    return len(layers)


# compute dtype -> kernel of a quantized base in training and evaluation
BASE_KERNELS = {"fp32": "reference", "bf16": "auto"}


def load_base(method: str, model: str | os.PathLike | None, compute_dtype: str = "fp32") -> Base:
    """Load the frozen base that ``method`` trains on, its kernel chosen by ``compute_dtype``."""
    where = get_method(method).base
    is_ckpt = model not in (None, "default") and (Path(str(model)).expanduser() / META_FILE).is_file()
    if where == "quantized":
        if not is_ckpt:
            raise QaloraError(f"method {method!r} trains on a quantized qalora checkpoint; {str(model)!r} is not one "
                              "(run: qalora quantize --model ... --out QDIR, then --model QDIR)")
        meta = read_meta(model)
        kinds = {spec.get("kind", "affine") for spec in meta["layers"].values()}
        if kinds != {"affine"}:
            raise QaloraError(f"checkpoint {str(model)!r} holds {', '.join(sorted(kinds))} layers; method {method!r} "
                              "needs group-wise INTn (rtn or gptq) layers")
        qm = load(model, kernel=BASE_KERNELS[compute_dtype])
        return Base(qm, load_tokenizer(model), str(model), meta["sha256"]["model.safetensors"],
                    meta.get("group_size"), meta.get("bits"))
    if is_ckpt:
        raise QaloraError(f"method {method!r} trains on a full-precision model; {str(model)!r} is a quantized "
                          "qalora checkpoint (use --method qalora, or pass the original model)")
    fp, tok, folder = load_fp_model(model)
    digest = _fp_fingerprint(folder)
    if where == "nf4":
        quantize_nf4(fp)
        digest = hashlib.sha256(f"{digest}:nf4-block{NF4_BLOCK}".encode()).hexdigest()
        return Base(fp, tok, str(folder), digest, NF4_BLOCK, 4)
    return Base(fp, tok, str(folder), digest, None, None)
