"""Exact merge of QA-LoRA adapters into group-wise quantized weights, and its verification.

A ``QALoRALinear`` computes ``y = x W~^T + s * B(A(pool(x)))`` where ``pool`` averages each
group of ``L`` contiguous input features, ``A: [r, G]``, ``B: [out, r]``, ``G = in / L`` and
``s = alpha / r``. Written per weight, the adapter adds ``s * (B A)[o, g] / L`` to every weight
of group ``g`` in row ``o`` — a per-(row, group) constant — so it folds into the float offsets::

    offset'[o, g] = offset[o, g] + s * (B @ A)[o, g] / L        # codes q and scale unchanged

No re-quantization happens: the merged model computes the same function as the unmerged
one, up to the fp32 rounding of ``offset'``. ``qalora.merge_verify`` measures that (per layer in
fp64, and on the logits of a few prompts), and ``merge`` (the ``qalora merge`` command) refuses
to write a checkpoint that fails the check.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qalora.adapters import add_adapters, load_adapter_state
from qalora.checkpoint import WEIGHTS_FILE, load, read_meta, write_checkpoint
from qalora.config import LoraConfig
from qalora.errors import QaloraError
from qalora.io import atomic_dir, check_new_output, sha256_file, write_json
from qalora.models import load_tokenizer
from qalora.nn.lora import LoRALinear, QALoRALinear
from qalora.nn.quant_linear import QuantLinear
from qalora.merge_verify import (DEFAULT_PROMPTS, MAX_WEIGHT_ULPS, MIN_TOLERANCE, auto_tolerance, fp64_checks, verify_merge,
                                  weight_errors)
from qalora.patch import set_submodule
from qalora.adapter_files import ADAPTER_FILE, read_adapter_config, read_adapter_tensors

REPORT_FILE = "merge_report.json"

# ---------------------------------------------------------------------------------------------
# Pure tensor function
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def merge_offsets(offset: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  group_size: int) -> torch.Tensor:
    """``offset' = offset + scaling * (B @ A) / group_size``, a new tensor.

    Args:
        offset: ``[out, G]`` float offsets of the quantized layer (fp32).
        A: ``[r, G]`` QA-LoRA down projection (acts on the group-pooled input).
        B: ``[out, r]`` up projection.
        scaling: ``s = alpha / r``.
        group_size: ``L``, input columns per group (the pooling divides by it).
    Returns:
        ``[out, G]`` in ``offset.dtype`` on ``offset.device``.

    Precision: the delta and the sum are computed in float64 and rounded to ``offset.dtype``
    once, so ``offset'`` is the fp32 number nearest to the exact ``offset + s (BA)/L`` (an fp32
    delta added in fp32 would round twice). A zero adapter therefore leaves ``offset`` bit-identical.
    """
    if offset.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"offset, A and B must be matrices, got shapes {tuple(offset.shape)}, "
                         f"{tuple(A.shape)}, {tuple(B.shape)}")
    out_f, groups = offset.shape
    if A.shape[1] != groups or B.shape != (out_f, A.shape[0]):
        raise ValueError(f"shapes do not chain: offset {tuple(offset.shape)} needs A [r, {groups}] and "
                         f"B [{out_f}, r]; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size {group_size!r} must be positive")
    dev = offset.device
    delta = (B.detach().to(dev, torch.float64) @ A.detach().to(dev, torch.float64)) * scaling / group_size  # [out, G]
    return (offset.to(torch.float64) + delta).to(offset.dtype)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

def merge_qalora_layer(layer: QALoRALinear) -> QuantLinear:
    """A new ``QuantLinear`` equal to ``layer`` (base + adapter) with the adapter folded into
    its offsets. ``qweight``, ``scale`` and ``bias`` are the base's very tensors (unchanged);
    only ``offset`` is new. ``layer`` itself is left as it was."""
    base = layer.base
    if not isinstance(base, QuantLinear):
        raise QaloraError(f"cannot merge into a {type(base).__name__}: the exact merge needs a group-wise "
                          "QuantLinear with float offsets")
    merged = QuantLinear(base.in_features, base.out_features, base.bits, base.group_size, bias=base.bias is not None,
                         device="meta", kernel=base.kernel)
    merged.qweight, merged.scale = base.qweight, base.scale
    merged.offset = merge_offsets(base.offset, layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                                  layer.group_size)
    if base.bias is not None:
        merged.bias = base.bias
    return merged


def merge_model_inplace(model: nn.Module) -> list[str]:
    """Replace every ``QALoRALinear`` of ``model`` by its merged ``QuantLinear``; returns the
    names replaced (empty for a model with nothing left to merge, so a second call is a no-op).
    Refuses, before touching anything, a model holding standard LoRA adapters (not exact)."""
    modules = list(model.named_modules())
    lora = [n for n, m in modules if isinstance(m, LoRALinear)]
    if lora:
        raise QaloraError(f"{lora[0]} holds a standard LoRA adapter; only QA-LoRA adapters merge exactly into "
                          "INTn weights (lora/qlora need the lossy --requantize rtn|gptq path)")
    names = [n for n, m in modules if isinstance(m, QALoRALinear)]
    for name in names:
        set_submodule(model, name, merge_qalora_layer(model.get_submodule(name)))
    return names


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the very same tensors:
    costs no weight memory; merging the copy replaces modules, never edits a shared tensor."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------
# Files: qalora merge --model QDIR --adapter ADIR --out MDIR
# ---------------------------------------------------------------------------------------------

def _check_compatible(cfg: dict, meta: dict, adir: Path, model_dir: Path) -> None:
    """Refuse an adapter that cannot merge exactly into this checkpoint, naming what differs."""
    if cfg["method"] != "qalora":
        raise QaloraError(f"adapter {str(adir)!r} was trained with method {cfg['method']!r}; only 'qalora' adapters "
                          "merge exactly into INTn weights. lora/qlora adapters need the lossy --requantize rtn|gptq "
                          "path (merge in full precision, then quantize again), which is not exact")
    kinds = {spec.get("kind", "affine") for spec in meta["layers"].values()}
    if kinds != {"affine"}:
        raise QaloraError(f"checkpoint {str(model_dir)!r} holds {', '.join(sorted(kinds))} layers; the exact merge "
                          "needs group-wise INTn layers with float offsets")
    if cfg["group_size"] != meta.get("group_size"):
        raise QaloraError(f"adapter {str(adir)!r} pools groups of {cfg['group_size']} but checkpoint {str(model_dir)!r} "
                          f"has group_size {meta.get('group_size')}; merge into the checkpoint it was trained on")
    base_sha = meta.get("sha256", {}).get(WEIGHTS_FILE)
    if cfg["base_sha256"] != base_sha:
        raise QaloraError(f"adapter {str(adir)!r} was trained on another base (base_sha256 {str(cfg['base_sha256'])[:12]}… "
                          f"vs {str(base_sha)[:12]}… of {str(model_dir)!r}); merge into the checkpoint it was trained on")


def codes_and_scales_unchanged(merged: nn.Module, names: list[str], weights_file: Path) -> bool:
    """``torch.equal`` of every merged layer's ``qweight`` and ``scale`` with the base file's."""
    with safe_open(str(weights_file), framework="pt") as f:
        for n in names:
            m = merged.get_submodule(n)
            if not (torch.equal(f.get_tensor(f"{n}.qweight"), m.qweight.cpu())
                    and torch.equal(f.get_tensor(f"{n}.scale"), m.scale.cpu())):
                return False
    return True


def merge_summary(n_layers: int, out, report: dict) -> str:
    """The lines ``qalora merge`` prints: what was merged and each check against its limit."""
    ref, i4, w = report["reference"], report.get("int4"), report["weights"]
    lines = [f"qalora merge: {n_layers} adapters merged into {str(out)!r}; codes and scales unchanged",
             f"  {'weights fp64':<17}within {w['max_weight_err_ulps']:.2f} ulp of the adapted weights (limit 0.5)"]
    if report.get("fp64_max_abs_logit_diff") is not None:
        lines.append(f"  {'logits fp64':<17}max |diff| {report['fp64_max_abs_logit_diff']:.2e} (allowed "
                     f"{report['fp64_tolerance']:.2e}; fp32 storage floor {report['fp32_storage_floor']:.2e})")
    floor = report.get("fp32_noise_floor")
    lines.append(f"  {'logits fp32':<17}max |diff| {ref['max_abs_logit_diff']:.2e} (allowed {report['fp32_tolerance']:.2e}"
                 + (f"; fp32 noise floor {floor:.2e}" if floor is not None else "")
                 + f"), top-1 agreement {ref['top1_agreement']:.1%}")
    if i4:
        lines.append(f"  {'logits int4 bf16':<17}max |diff| {i4['max_abs_logit_diff']:.2e}, mean {i4['mean_abs_logit_diff']:.2e}, "
                     f"top-1 agreement {i4['top1_agreement']:.1%} (kernel rounding; not gated)")
    return "\n".join(lines)


def merge(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
          tolerance: float | None = None, noise_floor: bool = True, prompts=DEFAULT_PROMPTS,
          progress: bool = True) -> dict:
    """Merge the QA-LoRA adapter in ``adapter_dir`` into the qalora checkpoint ``model_dir`` and
    write the merged checkpoint to the new folder ``out`` (with ``merge_report.json``).

    The merged model is verified against the unmerged one before anything is written
    (``qalora.merge_verify``): every merged weight must equal the adapted layer's effective
    weight within half an ulp of its fp32 offset (fp64 check); the max |logit difference| with
    both models computed in fp64 — the merge's own error, free of arithmetic noise — must not
    exceed ``max(tolerance, 4 x fp32 storage floor)`` (the logit movement of the merged model when
    its offsets move by random sub-ulp amounts: what fp32 offsets cannot resolve); and the fp32
    (reference kernel) figure must not exceed ``max(tolerance, 4 x fp32 noise floor)``, the floor
    being the unmerged model's own fp32-vs-fp64 drift on the same prompts. ``tolerance`` defaults
    to 1e-4. ``noise_floor=False`` skips the fp64 runs (they need an fp64 copy of the weights) and
    holds the fp32 figure to ``tolerance``. On failure nothing is written and a ``QaloraError`` is
    raised. Returns the merge report.
    """
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise QaloraError(f"tolerance must be a positive number, got {tolerance!r}")
    model_dir, adir = Path(model_dir).expanduser(), Path(adapter_dir).expanduser()
    check_new_output(out)
    cfg = read_adapter_config(adir)
    meta = read_meta(model_dir)
    _check_compatible(cfg, meta, adir, model_dir)
    tensors = read_adapter_tensors(adir)

    tokenizer = load_tokenizer(model_dir)
    unmerged = load(model_dir, kernel="auto")
    lora = LoraConfig(rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg.get("dropout", 0.0), targets=cfg["targets"])
    add_adapters(unmerged, "qalora", lora)
    load_adapter_state(unmerged, tensors)
    unmerged.eval()
    merged = shared_copy(unmerged)
    names = merge_model_inplace(merged)

    weights = weight_errors(unmerged, merged, names)
    if not weights["max_weight_err_ulps"] <= MAX_WEIGHT_ULPS:  # also catches nan
        raise QaloraError(f"merge verification failed: {weights['worst_layer']} differs from the adapted weights by "
                          f"{weights['max_weight_err_ulps']:.3g} ulp of its offsets (an exact merge: <= 0.5); "
                          f"nothing was written to {str(out)!r}")
    verification = verify_merge(unmerged, merged, tokenizer, prompts)
    floors = fp64_checks(unmerged, merged, tokenizer, prompts) if noise_floor else {}
    tolerance = MIN_TOLERANCE if tolerance is None else float(tolerance)
    fp32_tolerance = auto_tolerance(floors.get("fp32_noise_floor"), tolerance)
    checks = [("fp32", verification["reference"]["max_abs_logit_diff"], fp32_tolerance)]
    fp64_tolerance = None
    if floors:
        fp64_tolerance = auto_tolerance(floors["fp32_storage_floor"], tolerance)
        checks.append(("fp64", floors["fp64_max_abs_logit_diff"], fp64_tolerance))
    for dtype, worst, limit in checks:
        if not worst <= limit:  # also catches nan
            raise QaloraError(f"merge verification failed: max |logit difference| {worst:.2e} ({dtype}) exceeds the "
                              f"tolerance {limit:.3g}; nothing was written to {str(out)!r}")
    worst = verification["reference"]["max_abs_logit_diff"]
    if not codes_and_scales_unchanged(merged, names, model_dir / WEIGHTS_FILE):
        raise QaloraError("merge changed quantized codes or scales (a bug: only offsets may change); nothing was written")
    offset_change = max(float((merged.get_submodule(n).offset - unmerged.get_submodule(n).base.offset).abs().max())
                        for n in names)

    adapter_sha = sha256_file(adir / ADAPTER_FILE)
    new_meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "layers", "sha256")}
    new_meta["merged_adapter"] = {"path": str(adir), "sha256": adapter_sha, "method": cfg["method"],
                                  "rank": cfg["rank"], "alpha": cfg["alpha"], "targets": list(cfg["targets"]),
                                  "base_path": str(model_dir), "base_sha256": cfg["base_sha256"]}
    report = {**verification, "weights": weights, **floors, "tolerance": tolerance, "fp32_tolerance": fp32_tolerance,
              "fp64_tolerance": fp64_tolerance,
              "layers_merged": len(names), "modules": names,
              "codes_and_scales_unchanged": True, "max_abs_offset_change": offset_change,
              "adapter": str(adir), "adapter_sha256": adapter_sha, "base": str(model_dir)}
    # checkpoint and report land together: one staging folder, renamed to ``out`` or deleted
    with atomic_dir(out) as tmp:
        write_checkpoint(merged, tokenizer, tmp, new_meta)
        write_json(tmp / REPORT_FILE, report)
    if progress:
        print(merge_summary(len(names), out, report), flush=True)
    return report
