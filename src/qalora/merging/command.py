"""``qalora merge``: fold an adapter into the qalora checkpoint it was trained on, verify, write.

Every exactly mergeable kind (QA-LoRA offsets, trained scales, LoTA code moves + remainder) lands
on the canonical triple (``qalora.merging.exact``): no re-quantization, the merged model computes
the function the adapted one computed, up to the fp32 rounding of its offsets.
``qalora.merging.verify`` measures that (per layer in fp64, and on the logits of a few prompts) and
:func:`merge` refuses to write a checkpoint that fails a check, or whose codes or scales changed
where the adapter's kinds may not change them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qalora.adapters.format import adapter_sha256, attach, check_base, read_adapter
from qalora.adapters.kinds.registry import get_kind
from qalora.checkpoint import WEIGHTS_FILE, load, read_meta, read_tensors, weights_sha256, write_checkpoint
from qalora.errors import QaloraError
from qalora.io import atomic_dir, check_new_output, write_json
from qalora.merging.surgery import merge_model_inplace, shared_copy
from qalora.merging.verify import (DEFAULT_PROMPTS, MAX_WEIGHT_ULPS, MIN_TOLERANCE, auto_tolerance, fp64_checks,
                                 verify_merge, weight_errors)
from qalora.models import load_tokenizer
from qalora.quant.packing import unpack
from qalora.safetensors_file import SafetensorsFile

REPORT_FILE = "merge_report.json"

def _copy_sidecars(model_dir: Path, tmp: Path, meta: dict) -> None:
    """A checkpoint imported from a file keeps that file's storage form beside its weights
    (``formats.gguf_import``: the sidecars its ``qalora.json`` records by SHA-256): the merged
    checkpoint carries them on, so it can be written back like its source."""
    import shutil

    for name in (meta.get("gguf_source") or {}).get("sidecars", {}):
        shutil.copyfile(model_dir / name, tmp / name)


def _check_compatible(cfg: dict, meta: dict, adir: Path, model_dir: Path) -> None:
    """Refuse an adapter that cannot merge exactly into this checkpoint, naming what differs."""
    lossy = [k for k in cfg["kinds"] if not get_kind(k).exact]
    if lossy:
        raise QaloraError(f"adapter {str(adir)!r} was trained with method {cfg['method']!r}, whose update is dense: "
                          "it does not merge exactly into INTn weights. lora/qlora adapters need the lossy "
                          "--requantize rtn|gptq path (merge in full precision, then quantize again)")
    kinds = {spec.get("kind", "affine") for spec in meta["layers"].values()}
    if kinds != {"affine"}:
        raise QaloraError(f"checkpoint {str(model_dir)!r} holds {', '.join(sorted(kinds))} layers; the exact merge "
                          "needs group-wise INTn layers with float offsets")
    for key, what in (("group_size", "group_size"), ("base_bits", "bits")):
        if cfg.get(key) != meta.get(what):
            raise QaloraError(f"adapter {str(adir)!r} was trained on a {what} {cfg.get(key)} grid but checkpoint "
                              f"{str(model_dir)!r} has {what} {meta.get(what)}; merge into the checkpoint it was "
                              "trained on")
    check_base(cfg, weights_sha256(meta), adir, model_dir)


@torch.no_grad()
def changes_report(merged: nn.Module, names: list[str], weights_file: Path, allowed: set[str],
                   base_tensors: dict | None = None) -> dict:
    """Compare every merged layer's codes, scale and offset with the base file's (read from
    ``weights_file``, or ``base_tensors``: its verified tensors, already read by this command);
    refuse (nothing written) a part that changed where ``allowed`` does not permit it, a code that
    moved by more than one step, or a scale that is not positive. Returns counts of what changed."""
    if base_tensors is not None:
        return _changes(merged, names, base_tensors.__getitem__, allowed)
    with SafetensorsFile(weights_file) as f:  # one layer's tensors at a time
        return _changes(merged, names, f.get_tensor, allowed)


def _changes(merged: nn.Module, names: list[str], get, allowed: set[str]) -> dict:
    n_codes = moved = n_scales = scales_moved = 0
    max_rel_scale = max_offset = 0.0
    for n in names:
        m = merged.get_submodule(n)
        qw, scale, offset = (get(f"{n}.{b}") for b in ("qweight", "scale", "offset"))
        if "codes" not in allowed and not torch.equal(qw, m.qweight.cpu()):
            raise QaloraError(f"merge changed the codes of {n} (a bug: this adapter may not); nothing was written")
        if "scale" not in allowed and not torch.equal(scale, m.scale.cpu()):
            raise QaloraError(f"merge changed the scales of {n} (a bug: this adapter may not); nothing was written")
        if "offset" not in allowed and not torch.equal(offset, m.offset.cpu()):
            raise QaloraError(f"merge changed the offsets of {n} (a bug: this adapter may not); nothing was written")
        dq = unpack(m.qweight.cpu(), m.in_features, m.bits).short() - unpack(qw, m.in_features, m.bits).short()
        if int(dq.abs().max()) > 1:
            raise QaloraError(f"merge moved a code of {n} by {int(dq.abs().max())} steps (at most 1 is allowed); "
                              "nothing was written")
        if not bool((m.scale > 0).all()):
            raise QaloraError(f"merge left a non-positive scale in {n}; nothing was written")
        n_codes += dq.numel()
        moved += int((dq != 0).sum())
        n_scales += scale.numel()
        scales_moved += int((m.scale.cpu() != scale).sum())
        max_rel_scale = max(max_rel_scale, float(((m.scale.cpu() - scale).abs() / scale).max()))
        max_offset = max(max_offset, float((m.offset.cpu() - offset).abs().max()))
    return {"codes_changed": moved, "codes_changed_fraction": moved / max(n_codes, 1), "max_code_step": 1 if moved else 0,
            "scales_changed": scales_moved, "scales_changed_fraction": scales_moved / max(n_scales, 1),
            "max_rel_scale_change": max_rel_scale, "max_abs_offset_change": max_offset}


def merge_summary(n_layers: int, out, report: dict) -> str:
    """The lines ``qalora merge`` prints: what was merged and each check against its limit."""
    ref, i4, w = report["reference"], report.get("int4"), report["weights"]
    c = report["changes"]
    changed = (f"codes changed at {c['codes_changed']:,} positions ({c['codes_changed_fraction']:.3%}, each by ±1)"
               if c["codes_changed"] else "codes unchanged")
    changed += (f"; scales changed in {c['scales_changed_fraction']:.1%} of groups (max {c['max_rel_scale_change']:.2%})"
                if c["scales_changed"] else "; scales unchanged")
    lines = [f"qalora merge: {n_layers} {'+'.join(report['kinds'])} adapters merged into {str(out)!r}; {changed}",
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
          progress: bool = True, files=None) -> dict:
    """Merge the adapter in ``adapter_dir`` (any exactly mergeable method: qalora, peqa, lota) into the qalora checkpoint ``model_dir`` and
    write the merged checkpoint to the new folder ``out`` (with ``merge_report.json``).

    The merged model is verified against the unmerged one before anything is written
    (``qalora.merging.verify``): every merged weight must equal the adapted layer's effective
    weight within half an ulp of its fp32 offset (fp64 check); the max |logit difference| with
    both models computed in fp64 — the merge's own error, free of arithmetic noise — must not
    exceed ``max(tolerance, 4 x fp32 storage floor)`` (the logit movement of the merged model when
    its offsets move by random sub-ulp amounts: what fp32 offsets cannot resolve); and the fp32
    (reference kernel) figure must not exceed ``max(tolerance, 4 x fp32 noise floor)``, the floor
    being the unmerged model's own fp32-vs-fp64 drift on the same prompts. ``tolerance`` defaults
    to 1e-4. ``noise_floor=False`` skips the fp64 runs (they need an fp64 copy of the weights) and
    holds the fp32 figure to ``tolerance``. On failure nothing is written and a ``QaloraError`` is
    raised. Returns the merge report. ``files``: the command's :class:`~qalora.io.FileCache`
    (inputs it already read are not read or hashed again; the merged weights' hash is recorded).
    """
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise QaloraError(f"tolerance must be a positive number, got {tolerance!r}")
    model_dir, adir = Path(model_dir).expanduser(), Path(adapter_dir).expanduser()
    check_new_output(out)
    cfg, tensors = read_adapter(adir, files)
    meta = read_meta(model_dir)
    _check_compatible(cfg, meta, adir, model_dir)

    tokenizer = load_tokenizer(model_dir, files)
    unmerged = load(model_dir, kernel="auto", mapped=False, files=files)  # its floats are swapped for fp64 and back
    attach(unmerged, cfg, tensors)
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
    allowed = {c for k in cfg["kinds"] for c in get_kind(k).changes}
    changes = changes_report(merged, names, model_dir / WEIGHTS_FILE, allowed,
                             None if files is None else read_tensors(model_dir, meta, files))

    adapter_sha = adapter_sha256(cfg)  # verified when the adapter was read
    new_meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "layers", "sha256")}
    new_meta["merged_adapter"] = {"path": str(adir), "sha256": adapter_sha, "method": cfg["method"],
                                  "kinds": list(cfg["kinds"]),
                                  "rank": cfg["rank"], "alpha": cfg["alpha"], "targets": list(cfg["targets"]),
                                  "base_path": str(model_dir), "base_sha256": cfg["base_sha256"]}
    report = {**verification, "weights": weights, **floors, "tolerance": tolerance, "fp32_tolerance": fp32_tolerance,
              "fp64_tolerance": fp64_tolerance,
              "layers_merged": len(names), "modules": names,
              "method": cfg["method"], "kinds": list(cfg["kinds"]), "may_change": sorted(allowed), "changes": changes,
              "codes_and_scales_unchanged": not (changes["codes_changed"] or changes["scales_changed"]),
              "max_abs_offset_change": changes["max_abs_offset_change"],
              "adapter": str(adir), "adapter_sha256": adapter_sha, "base": str(model_dir),
              "base_sha256": weights_sha256(meta)}
    # checkpoint and report land together: one staging folder, renamed to ``out`` or deleted
    with atomic_dir(out) as tmp:
        _copy_sidecars(model_dir, tmp, new_meta)
        write_checkpoint(merged, tokenizer, tmp, new_meta, files)
        write_json(tmp / REPORT_FILE, report)
    if progress:
        print(merge_summary(len(names), out, report), flush=True)
    return report
