"""Export an adapter on its own as a standard PEFT LoRA folder, for unmerged serving (many
adapters over one base), and the transformers-native base it sits on.

    export_peft("adapter", "adapter-peft", base_out="base-hf")    # -> report dict
    # then: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base-hf"), "adapter-peft")

QA-LoRA as a plain LoRA. On a base with groups of ``L`` contiguous inputs (``G = in / L``) the
adapter adds ``s * B A pool(x)`` with ``A: [r, G]``, ``B: [out, r]``, ``s = alpha / r`` and
``pool(x)[g] = (1/L) * sum of x[i] over the L inputs i of group g`` (``kinds/qalora.py``). That is
a linear map of ``x``: ``A pool(x) = A' x`` with::

    A'[k, i] = A[k, i // L] / L          # A' = repeat_interleave(A, L, dim=1) / L   [r, in]
    B'       = B                                                                     # [out, r]

so PEFT's ``y += (alpha / r) * B' A' x`` with the same ``r`` and ``alpha`` is the same function.
``A / L`` is exact in fp32 when ``L`` is a power of two (it only moves the exponent). Standard
``lora`` / ``qlora`` adapters already have ``A: [r, in]`` and export as they are. Kinds that change
the base's codes or scales (``peqa``, ``--train-scales``, ``lota``) have no LoRA form: they are
refused, only the merged model (``qalora merge``) carries them. Dropout, a training-time
operation, is written as ``lora_dropout`` but only the inference function is preserved (QA-LoRA
drops out after pooling, PEFT before ``A'``).

Files of the new folder ``out``: ``adapter_config.json`` (``peft_type`` LORA, ``task_type``
CAUSAL_LM, ``r``, ``lora_alpha``, ``target_modules`` = the adapter's target suffixes, matched by
PEFT with the same rule qalora used to attach them, ``base_model_name_or_path``),
``adapter_model.safetensors`` (fp32 ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
``.lora_B.weight`` ``[out, r]``) and ``export_info.json`` (provenance).

The base. A qalora checkpoint is not a transformers folder, so ``base_out`` writes its dense
form (:func:`export_dense_base`): every quantized layer as ``<layer>.weight = scale * q + offset``
in fp32 (the same ``dequantize`` as qalora's reference kernel, bit for bit), everything else as
stored (floats as fp32), streamed one tensor at a time into one ``model.safetensors``; its
``export_info.json`` records the checkpoint's SHA-256, which a later export's ``base_name`` is
checked against (so one base serves many adapters). A ``lora``/``qlora`` adapter's base is already
a transformers folder (a ``qlora`` adapter was trained on its NF4 quantization: PEFT over the
full-precision folder is the usual QLoRA serving, not bit-identical to training).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qalora.adapters.format import adapter_sha256, check_base, read_adapter
from qalora.adapters.methods import get_method
from qalora.errors import QaloraError
from qalora.io import atomic_dir, check_new_output, read_json, write_json
from qalora.safetensors_file import DTYPES, SafetensorsFile, header_bytes

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DENSE_WEIGHTS = "model.safetensors"
INFO_FILE = "export_info.json"
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- the LoRA pairs

def qalora_pair(A: torch.Tensor, B: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """QA-LoRA's ``(A [r, G], B [out, r])`` as a plain LoRA ``(A' [r, G*L], B)`` with
    ``A'[k, i] = A[k, i // L] / L``: ``A' x = A pool(x)`` for every ``x`` (computed in fp64,
    rounded to fp32 once; exact for a power-of-two ``L``)."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or group_size < 1:
        raise ValueError(f"A {tuple(A.shape)}, B {tuple(B.shape)}, group_size {group_size} do not form a QA-LoRA pair")
    wide = (A.double().repeat_interleave(group_size, dim=1) / group_size).float()
    return wide.contiguous(), B.float().contiguous()


def lora_pair(A: torch.Tensor, B: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A standard LoRA's ``(A [r, in], B [out, r])``, unchanged (fp32)."""
    return A.float().contiguous(), B.float().contiguous()


# kind -> (A, B, group_size) -> (A' [r, in], B' [out, r]); kinds not listed have no LoRA form
LORA_FORMS: dict[str, Callable] = {"qalora": qalora_pair, "lora": lora_pair}


def exportable_kinds(cfg: dict, adir) -> str:
    """The adapter's one kind with a LoRA form, or a one-line refusal naming what it changes."""
    kinds = list(cfg["kinds"])
    if len(kinds) == 1 and kinds[0] in LORA_FORMS:
        return kinds[0]
    from qalora.adapters.kinds.registry import get_kind

    changes = sorted({c for k in kinds for c in get_kind(k).changes if c != "offset"})
    raise QaloraError(f"adapter {str(adir)!r} (method {cfg['method']}, kinds {'+'.join(kinds)}) changes the base's "
                      f"{' and '.join(changes)}: no LoRA file carries that, only the merged model (qalora merge)")


def lora_pairs(cfg: dict, state: dict[str, torch.Tensor], adir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A' [r, in], B' [out, r])}`` of a checked adapter: the plain LoRA computing its
    function with scaling ``alpha / r`` (refuses kinds without a LoRA form)."""
    form = LORA_FORMS[exportable_kinds(cfg, adir)]
    return {m: form(state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"], cfg["group_size"])
            for m in cfg["modules"]}


def read_lora_adapter(adapter_dir) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(config, LoRA pairs)`` of an adapter folder: config and weights checked (SHA-256 too)
    by ``adapters/format.py``, then converted by :func:`lora_pairs`."""
    adir = Path(adapter_dir).expanduser()
    cfg, state = read_adapter(adir)
    return cfg, lora_pairs(cfg, state, adir)


def alpha_value(alpha: float) -> int | float:
    """``lora_alpha`` as PEFT configs usually hold it: an int when integral (16.0 -> 16)."""
    return int(alpha) if float(alpha).is_integer() else float(alpha)


# --------------------------------------------------------------------------- the base

def trained_base(cfg: dict, model, adir) -> Path:
    """The base folder ``model`` (default: the adapter's recorded ``base_path``), after checking
    that it is the base the adapter was trained on (its fingerprint is the recorded one)."""
    from qalora.adapters.base import base_fingerprint
    from qalora.default_model import resolve_model

    given = model if model is not None else cfg.get("base_path")
    if given is None:
        raise QaloraError(f"adapter {str(adir)!r} records no base_path; pass the base it was trained on (--model)")
    if get_method(cfg["method"]).base != "quantized":
        path = resolve_model(given)  # an HF folder, or "default" (the embedded model)
    else:
        path = Path(str(given)).expanduser()
        if not path.is_dir():
            raise QaloraError(f"base {str(given)!r} of adapter {str(adir)!r} is not a folder; pass the checkpoint it "
                              "was trained on (--model)")
    check_base(cfg, base_fingerprint(cfg["method"], path), adir, path)
    return path


def checked_base_name(cfg: dict, name, adir) -> str:
    """``name`` (a local folder: a base written by :func:`export_dense_base` or another qalora
    export recording ``source_sha256``, or a lora adapter's own HF folder), checked against the
    adapter's recorded base; returned as an absolute path."""
    from qalora.adapters.base import base_fingerprint

    folder = Path(str(name)).expanduser()
    if not folder.is_dir():
        raise QaloraError(f"base name {str(name)!r} is not a folder; use a base written by --base-out (or the HF "
                          "folder a lora adapter was trained on)")
    if (folder / INFO_FILE).is_file():
        got = read_json(folder / INFO_FILE, "export info").get("source_sha256")
    elif get_method(cfg["method"]).base != "quantized":
        got = base_fingerprint(cfg["method"], folder)
    else:
        raise QaloraError(f"base name {str(folder)!r} has no {INFO_FILE} recording its source checkpoint; "
                          "write the base with --base-out")
    check_base(cfg, got, adir, folder)
    return str(folder.resolve())


def dense_plan(reader, layers: dict[str, dict]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``[(name, dtype, shape)]`` of the dense folder: ``<layer>.weight`` fp32 ``[out, in]`` for
    each quantized layer (its ``qweight``, ``scale``, ``offset`` consumed), every other checkpoint
    tensor as it is (floats as fp32); sorted by name."""
    keys = set(reader.keys())
    plan = []
    for name, spec in layers.items():
        parts = {f"{name}.{p}" for p in ("qweight", "scale", "offset")}
        if spec.get("kind", "affine") != "affine" or not parts <= keys:
            raise QaloraError(f"layer {name!r} is not a complete affine (scale * q + offset) layer of the checkpoint")
        keys -= parts
        plan.append((f"{name}.weight", torch.float32, (spec["out_features"], spec["in_features"])))
    for key in keys:
        sl = reader.get_slice(key)
        stored = sl.get_dtype()
        if stored not in DTYPES:
            raise QaloraError(f"checkpoint tensor {key!r} has dtype {stored}, which the dense base writer does not store")
        dtype = torch.float32 if DTYPES[stored].is_floating_point else DTYPES[stored]
        plan.append((key, dtype, tuple(sl.get_shape())))
    return sorted(plan)


def dense_tensor(reader, name: str, layers: dict[str, dict]) -> torch.Tensor:
    """One tensor of the dense folder: ``scale * q + offset`` (fp32, ``[out, in]``) for a quantized
    layer's ``.weight``, else the checkpoint tensor (floats as fp32)."""
    from qalora.quant.qparams import dequantize
    from qalora.quant.weight import QuantizedWeight

    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module in layers:
        s = layers[module]
        qw = QuantizedWeight(*(reader.get_tensor(f"{module}.{p}") for p in ("qweight", "scale", "offset")),
                             s["bits"], s["group_size"], s["in_features"])
        return dequantize(qw.codes(), qw.scale, qw.offset, s["group_size"])
    t = reader.get_tensor(name)
    return t.float() if t.is_floating_point() else t


def export_dense_base(model_dir: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Write the qalora checkpoint ``model_dir`` as a plain transformers folder ``out`` (new):
    ``config.json`` (``dtype`` float32; a quantized ``lm_head`` untied), ``model.safetensors`` with
    every quantized layer dequantized (``W = scale * q + offset``, fp32, bit-identical to qalora's
    reference kernel weights), tokenizer and generation files, and ``export_info.json``
    (``source_sha256``: the checkpoint's recorded weights SHA-256, checked here first).
    Memory: one tensor at a time. Size: 32 bits per weight."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from qalora.checkpoint import check_weights, read_meta, weights_sha256
    from qalora.export.mlx import SIDE_FILES

    start = time.perf_counter()
    out = check_new_output(out)
    model_dir = Path(model_dir).expanduser()
    meta = read_meta(model_dir)
    weights = check_weights(model_dir, meta)
    layers = meta["layers"]
    config = AutoConfig.from_pretrained(model_dir)
    config.dtype = torch.float32
    if getattr(config, "tie_word_embeddings", False) and "lm_head" in layers:
        config.tie_word_embeddings = False  # a quantized lm_head has its own weights
    with SafetensorsFile(weights) as reader, atomic_dir(out) as tmp:
        plan = dense_plan(reader, layers)
        with open(tmp / DENSE_WEIGHTS, "wb") as f:
            f.write(header_bytes(plan, "the dense base writer"))
            for name, dtype, shape in tqdm(plan, desc="dense base", disable=not progress):
                t = dense_tensor(reader, name, layers).to(dtype).contiguous()
                if tuple(t.shape) != shape:
                    raise QaloraError(f"tensor {name!r} has shape {tuple(t.shape)}, its layer table says {shape}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        config.save_pretrained(tmp)
        copied = [n for n in SIDE_FILES if (model_dir / n).is_file()]
        for n in copied:
            (tmp / n).write_bytes((model_dir / n).read_bytes())
        info = {"format": "dense", "weights": "W = scale * q + offset, fp32 (qalora.quant.qparams.dequantize)",
                "source": str(model_dir.resolve()), "source_sha256": weights_sha256(meta),
                "source_method": meta.get("method"), "bits": meta.get("bits"), "group_size": meta.get("group_size"),
                "dequantized_layers": len(layers), "tensors": len(plan), "files": sorted([DENSE_WEIGHTS, *copied])}
        write_json(tmp / INFO_FILE, info)
    report = {"path": str(out), "folder_bytes": sum(p.stat().st_size for p in out.iterdir()), **info,
              "seconds": round(time.perf_counter() - start, 2)}
    if progress:
        print(f"wrote {out} ({report['folder_bytes'] / 2**20:.1f} MiB): dense fp32 base, {len(layers)} layers "
              "dequantized (scale * q + offset)", flush=True)
    return report


# --------------------------------------------------------------------------- the PEFT folder

def peft_config(cfg: dict, base_name: str | None) -> dict:
    """PEFT's ``adapter_config.json`` for the adapter ``cfg`` (a ``LoraConfig`` of PEFT 0.x)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": cfg["rank"], "lora_alpha": alpha_value(cfg["alpha"]), "lora_dropout": cfg.get("dropout", 0.0),
            "target_modules": sorted(cfg["targets"]), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def peft_state(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """PEFT's saved key names: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``."""
    state = {}
    for module, (a, b) in pairs.items():
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    return state


def export_peft(adapter_dir: str | os.PathLike, out: str | os.PathLike, *, model: str | os.PathLike | None = None,
                base_out: str | os.PathLike | None = None, base_name: str | os.PathLike | None = None,
                progress: bool = True) -> dict:
    """Write the adapter ``adapter_dir`` as a PEFT LoRA folder ``out`` (new).

    Args:
        model: the base the adapter was trained on (qalora checkpoint, or the HF folder of a
            lora/qlora adapter); default its recorded ``base_path``. Checked by fingerprint.
        base_out: also write that qalora checkpoint's dense transformers form there (new folder,
            :func:`export_dense_base`) and record it as ``base_model_name_or_path``.
        base_name: a base folder written before (by ``base_out``), recorded instead; checked
            against the adapter's base through its ``export_info.json``. A qalora adapter needs
            ``base_out`` or ``base_name``; a lora/qlora adapter defaults to its HF folder.
    Returns:
        the report (also written as ``export_info.json``): path, kinds, rank, alpha, modules,
        base, adapter and base SHA-256, and the dense base's report when written.
    """
    start = time.perf_counter()
    out = check_new_output(out)
    adir = Path(adapter_dir).expanduser()
    cfg, pairs = read_lora_adapter(adir)
    quantized = get_method(cfg["method"]).base == "quantized"
    if base_out is not None and base_name is not None:
        raise QaloraError("give base_out (write the dense base) or base_name (one written before), not both")
    if base_out is not None and not quantized:
        raise QaloraError(f"base_out writes a qalora checkpoint's dense form; a {cfg['method']} adapter's base "
                          f"{cfg.get('base_path')!r} is already a transformers folder (leave base_out out)")
    if quantized and base_out is None and base_name is None:
        raise QaloraError(f"a {cfg['method']} adapter sits on a qalora checkpoint, which transformers cannot load: "
                          "pass base_out (--base-out DIR) to write its dense form, or base_name of one written before")
    base = trained_base(cfg, model, adir) if model is not None or base_out is not None or base_name is None else None
    if base_out is not None:
        base_out = check_new_output(base_out)
        if base_out.resolve() == out.resolve():
            raise QaloraError(f"base_out and out are the same path {str(out)!r}; choose two new folders")
        recorded = str(base_out.resolve())
    else:
        recorded = checked_base_name(cfg, base_name, adir) if base_name is not None else str(base.resolve())
    info = {"format": "peft-lora", "source": str(adir.resolve()), "adapter_sha256": adapter_sha256(cfg),
            "method": cfg["method"], "kinds": list(cfg["kinds"]), "rank": cfg["rank"], "alpha": cfg["alpha"],
            "group_size": cfg.get("group_size"), "modules": len(pairs), "base_model_name_or_path": recorded,
            "base_sha256": cfg["base_sha256"],
            "function": ("A' = repeat_interleave(A, L, dim=1) / L, B' = B (QA-LoRA as plain LoRA, same scaling)"
                         if cfg["kinds"] == ["qalora"] else "A, B as trained")}
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:  # the adapter appears only after the base (if any) is complete
        save_file(peft_state(pairs), str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / PEFT_CONFIG, peft_config(cfg, recorded))
        if base_out is not None:
            info["base"] = export_dense_base(base, base_out, progress=progress)
        write_json(tmp / INFO_FILE, info)
    report = {"path": str(out), "folder_bytes": sum(p.stat().st_size for p in out.iterdir()), **info,
              "seconds": round(time.perf_counter() - start, 2)}
    if progress:
        print(f"wrote {out}: PEFT LoRA, {len(pairs)} modules, r {cfg['rank']}, alpha {cfg['alpha']:g} "
              f"({cfg['method']}); base {recorded}", flush=True)
    return report
