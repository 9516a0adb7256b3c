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
from qalora.checkpoint import META_FILE, load, read_meta, weights_sha256
from qalora.errors import QaloraError
from qalora.default_model import resolve_model
from qalora.io import model_fingerprint
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


def _nf4_fingerprint(fp_digest: str) -> str:
    return hashlib.sha256(f"{fp_digest}:nf4-block{NF4_BLOCK}".encode()).hexdigest()


def base_fingerprint(method: str, model: str | os.PathLike | None) -> str:
    """The fingerprint an adapter of ``method`` records of its base ``model``, without loading it:
    the quantized checkpoint's recorded weights SHA-256, or the full-precision folder's
    :func:`~qalora.io.model_fingerprint` (hashed once more with the NF4 step for ``qlora``)."""
    where = get_method(method).base
    if where == "quantized":
        return weights_sha256(read_meta(model))
    digest = model_fingerprint(resolve_model(model))
    return _nf4_fingerprint(digest) if where == "nf4" else digest


def quantize_nf4(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), block_size: int = NF4_BLOCK) -> int:
    """Replace every decoder ``nn.Linear`` by an ``NF4Linear`` (QLoRA's frozen base)."""
    from qalora.nn.nf4_linear import NF4Linear

    layers = find_linears(model, skip)
    for name, m in layers:
        set_submodule(model, name, NF4Linear.from_weight(m.weight.data, m.bias, block_size=block_size, name=name))
    return len(layers)


# compute dtype -> kernel of a quantized base in training and evaluation
BASE_KERNELS = {"fp32": "reference", "bf16": "auto"}


def load_base(method: str, model: str | os.PathLike | None, compute_dtype: str = "fp32", files=None) -> Base:
    """Load the frozen base that ``method`` trains on, its kernel chosen by ``compute_dtype``
    (``files``: the command's :class:`~qalora.io.FileCache`, for a quantized checkpoint)."""
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
        qm = load(model, kernel=BASE_KERNELS[compute_dtype], files=files)
        return Base(qm, load_tokenizer(model, files), str(model), weights_sha256(meta),
                    meta.get("group_size"), meta.get("bits"))
    if is_ckpt:
        raise QaloraError(f"method {method!r} trains on a full-precision model; {str(model)!r} is a quantized "
                          "qalora checkpoint (use --method qalora, or pass the original model)")
    fp, tok, folder = load_fp_model(model)
    digest = model_fingerprint(folder)
    if where == "nf4":
        quantize_nf4(fp)
        digest = _nf4_fingerprint(digest)
        return Base(fp, tok, str(folder), digest, NF4_BLOCK, 4)
    return Base(fp, tok, str(folder), digest, None, None)
