"""``qalora pipeline``: quantize -> train QA-LoRA -> exact merge (verified) -> export (GGUF, MLX) -> table.

Every stage writes a folder (or file) under ``out`` that the matching single command would
have written, so each result can be reused on its own::

    out/quantized/    qalora quantize   (GPTQ by default)
    out/adapter/      qalora train      (QA-LoRA on the default instruction mixture)
    out/merged/       qalora merge      (+ merge_report.json)
    out/model.gguf    qalora export --format gguf   (--export gguf, the default)
    out/model-mlx/    qalora export --format mlx    (--export mlx, or gguf,mlx)
    out/*.json        beside each export: what it was made from, its options, its files' SHA-256
    out/pipeline.json the summary table below, as JSON

Running the same command again resumes: a finished stage whose recorded inputs equal the
requested ones is reused (the source model's fingerprint and the quantization config; the base
checkpoint's SHA-256 and the training config; the adapter's and the base's SHA-256; the merged
weights' SHA-256 and the export options), an interrupted training run is resumed from its last
checkpoint, and a stage recorded with other inputs is refused (one line, nothing written) rather
than mixed in (:mod:`qalora.stages.identity`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from qalora.checkpoint import weights_sha256
from qalora.config import LoraConfig, PipelineConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.io import FileCache, model_fingerprint, read_json, work_dir, write_json
from qalora.stages.export import BY_NAME, export_stage, parse_formats
from qalora.stages.identity import normalized, require_same

SUMMARY_FILE = "pipeline.json"
SPEED_PROMPT = "Write a short paragraph about why the sky is blue."


@dataclasses.dataclass(frozen=True)
class PipelinePaths:
    """Where each stage of a pipeline rooted at ``root`` writes."""

    root: Path

    @property
    def quantized(self) -> Path:
        return self.root / "quantized"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[qalora pipeline] {msg}", flush=True)


def _stage_quantize(model, paths: PipelinePaths, quant: QuantConfig, progress: bool, files: FileCache) -> dict:
    from qalora.api import quantize
    from qalora.checkpoint import read_meta
    from qalora.default_model import resolve_model

    if paths.quantized.exists():
        meta = read_meta(paths.quantized)
        require_same(paths.quantized, "quantized model",
                     {"source_sha256": meta.get("source_sha256"),
                      "quant_config": normalized(QuantConfig, meta.get("quant_config") or {})},
                     {"source_sha256": model_fingerprint(resolve_model(model), files), "quant_config": quant.to_dict()})
        _say(f"1/5 quantize: reusing {paths.quantized}", progress)
        return meta
    _say(f"1/5 quantize: INT{quant.bits} g{quant.group_size} {quant.method} -> {paths.quantized}", progress)
    return quantize(model, paths.quantized, quant, progress=progress, files=files)


def _stage_train(paths: PipelinePaths, cfg: TrainConfig, lora: LoraConfig, base_sha256: str, progress: bool,
                 files: FileCache) -> dict:
    from qalora.adapters.format import ADAPTER_CONFIG, lora_config_of, read_adapter_config
    from qalora.training.loop import RUN_FILE, train

    if (paths.adapter / ADAPTER_CONFIG).is_file():
        done = read_adapter_config(paths.adapter)
        require_same(paths.adapter, "adapter",
                     {"base_sha256": done["base_sha256"], "train_config": normalized(TrainConfig, done.get("train_config") or {}),
                      "lora": lora_config_of(done).to_dict()},
                     {"base_sha256": base_sha256, "train_config": cfg.to_dict(), "lora": lora.to_dict()})
        _say(f"2/5 train: reusing {paths.adapter}", progress)
        return done
    resume = (paths.adapter / RUN_FILE).is_file()  # train() refuses a run begun on another base or config
    _say(f"2/5 train: QA-LoRA, {cfg.steps} steps{' (resuming)' if resume else ''} -> {paths.adapter}", progress)
    return train(paths.quantized, paths.adapter, cfg, lora, resume=resume, progress=progress, files=files)


def _stage_merge(paths: PipelinePaths, base_sha256: str, progress: bool, files: FileCache) -> dict:
    from qalora.adapters.format import ADAPTER_FILE
    from qalora.merging.command import REPORT_FILE, merge

    if (paths.merged / REPORT_FILE).is_file():
        report = read_json(paths.merged / REPORT_FILE, "merge report")
        require_same(paths.merged, "merged model", report,
                     {"adapter_sha256": files.sha256(paths.adapter / ADAPTER_FILE), "base_sha256": base_sha256})
        _say(f"3/5 merge: reusing {paths.merged}", progress)
        return report
    _say(f"3/5 merge + verify -> {paths.merged}", progress)
    return merge(paths.quantized, paths.adapter, paths.merged, progress=progress, files=files)


def _stage_exports(paths: PipelinePaths, formats: tuple[str, ...], progress: bool, files: FileCache) -> dict[str, dict]:
    from qalora.checkpoint import read_meta

    sha = weights_sha256(read_meta(paths.merged))
    return {name: export_stage(BY_NAME[name], paths.root, paths.merged, sha, lambda m: _say(m, progress), progress, files)
            for name in formats}


def decode_tokens_per_s(model, tokenizer, new_tokens: int = 64, prompt: str = SPEED_PROMPT) -> float:
    """Greedy decode speed at batch 1 through ``qalora.decode`` (the path of ``qalora generate``):
    ``new_tokens`` generated tokens (eos suppressed, so every run is as long) / seconds, after a
    short warm-up decode (kernel preparation and caches are not counted)."""
    from qalora.config import DecodeConfig
    from qalora.decode import decode, prompt_ids

    ids = prompt_ids(tokenizer, prompt, chat=True)
    decode(model, ids, DecodeConfig(max_new_tokens=4), min_new_tokens=4)
    t0 = time.perf_counter()
    decode(model, ids, DecodeConfig(max_new_tokens=new_tokens), eos_token_id=tokenizer.eos_token_id,
           min_new_tokens=new_tokens)
    return new_tokens / (time.perf_counter() - t0)


def _stage_speed(paths: PipelinePaths, new_tokens: int, progress: bool, files: FileCache) -> dict:
    from qalora.adapters.format import load_adapted
    from qalora.checkpoint import load
    from qalora.models import load_tokenizer
    from qalora.patch import set_kernel

    _say(f"5/5 speed: greedy decode of {new_tokens} tokens, merged vs quantized + unmerged adapter", progress)
    # both on the kernel "auto" picks; the unmerged model also runs its adapters (fp32, per layer)
    tok = load_tokenizer(paths.merged, files)
    merged = load(paths.merged, kernel="auto", files=files)
    merged_tps = decode_tokens_per_s(merged, tok, new_tokens)
    del merged
    unmerged, _, _ = load_adapted(paths.quantized, paths.adapter, files=files)
    set_kernel(unmerged, "auto")
    unmerged_tps = decode_tokens_per_s(unmerged.eval(), tok, new_tokens)
    return {"merged_tokens_per_s": merged_tps, "unmerged_tokens_per_s": unmerged_tps, "new_tokens": new_tokens,
            "threads": torch.get_num_threads()}


def pipeline(model: str | os.PathLike | None = "default", out: str | os.PathLike = "qalora-pipeline", *,
             quant: QuantConfig | None = None, lora: LoraConfig | None = None, train_cfg: TrainConfig | None = None,
             export: str | tuple[str, ...] | bool = "gguf", speed_tokens: int = 64, progress: bool = True) -> dict:
    """Run (or resume) the whole path on ``model`` under the folder ``out``; returns the summary
    also written to ``out/pipeline.json`` (see :func:`format_table`). ``export``: the runtimes to
    write the merged model for, ``"gguf"`` (default), ``"mlx"``, ``"gguf,mlx"`` or ``"none"``
    (:mod:`qalora.stages.export`)."""
    defaults = PipelineConfig()
    quant = quant or defaults.quant_config()
    lora = lora or defaults.lora_config()
    train_cfg = train_cfg or defaults.train_config()
    if train_cfg.method != "qalora":
        raise QaloraError(f"the pipeline trains QA-LoRA (its adapters merge exactly); got method {train_cfg.method!r}")
    formats = parse_formats(export)
    if isinstance(speed_tokens, bool) or not isinstance(speed_tokens, int) or speed_tokens < 1:
        raise QaloraError(f"speed_tokens must be an integer >= 1, got {speed_tokens!r}")
    root = work_dir(out)
    paths = PipelinePaths(root)

    times: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.time()
        result = fn(*args)
        times[name] = round(time.time() - t0, 1)
        return result

    files = FileCache()  # each file of this run hashed, and each checkpoint and tokenizer read, once
    qmeta = timed("quantize", _stage_quantize, model, paths, quant, progress, files)
    base_sha256 = weights_sha256(qmeta)
    adapter = timed("train", _stage_train, paths, train_cfg, lora, base_sha256, progress, files)
    report = timed("merge", _stage_merge, paths, base_sha256, progress, files)
    exports = timed("export", _stage_exports, paths, formats, progress, files) if formats else {}
    speed = timed("speed", _stage_speed, paths, speed_tokens, progress, files)

    qbytes = (paths.quantized / "model.safetensors").stat().st_size
    mbytes = (paths.merged / "model.safetensors").stat().st_size
    summary = {
        "model": str(model), "source_sha256": qmeta.get("source_sha256"), "base_sha256": base_sha256,
        "adapter_sha256": report.get("adapter_sha256"), "out": str(root), "bits": quant.bits, "group_size": quant.group_size,
        "quant_method": quant.method, "bits_per_quantized_weight": qmeta["report"].get("bits_per_quantized_weight"),
        "quantized_bytes": qbytes, "merged_bytes": mbytes,
        "gguf_bytes": exports["gguf"]["bytes"] if "gguf" in exports else None,
        "mlx_bytes": exports["mlx"]["bytes"] if "mlx" in exports else None, "exports": {k: v["path"] for k, v in exports.items()},
        "train_steps": adapter["steps"], "trainable_parameters": adapter["trainable_parameters"],
        "val_loss_before": adapter["val_loss_start"], "val_loss_after": adapter["val_loss_end"],
        "seconds_per_step": adapter["seconds_per_step"],
        "merge": {k: report.get(k) for k in ("reference", "int4", "weights", "fp32_noise_floor",
                                             "fp64_max_abs_logit_diff", "fp32_storage_floor", "tolerance",
                                             "fp32_tolerance", "fp64_tolerance")},
        "speed": speed, "stage_seconds": times,
    }
    write_json(paths.summary, summary)
    return summary


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def format_table(s: dict) -> str:
    """The pipeline summary as an aligned two-column text table."""
    m = s["merge"]
    ref, i4 = m["reference"], m.get("int4")
    rows = [
        ("weights", f"INT{s['bits']} g{s['group_size']} {s['quant_method'].upper()} "
                    f"({s['bits_per_quantized_weight']:.2f} bits/weight incl. scale+offset)"),
        ("size on disk", f"quantized {_mb(s['quantized_bytes'])}, merged {_mb(s['merged_bytes'])}, "
                         f"GGUF {_mb(s['gguf_bytes'])}" + (f", MLX {_mb(s['mlx_bytes'])}" if s.get("mlx_bytes") else "")),
        ("QA-LoRA", f"{s['trainable_parameters']:,} trainable parameters, {s['train_steps']} steps, "
                    f"{s['seconds_per_step']:.2f} s/step"),
        ("validation loss", f"{s['val_loss_before']:.4f} before tuning -> {s['val_loss_after']:.4f} after"),
        ("merge error fp64", f"max |Δlogit| {m['fp64_max_abs_logit_diff']:.2e} (fp32 storage floor "
                             f"{m.get('fp32_storage_floor') or float('nan'):.2e}, allowed "
                             f"{m.get('fp64_tolerance') or m['tolerance']:.1e}); "
                             f"weights within {m['weights']['max_weight_err_ulps']:.2f} ulp"
         if m.get("fp64_max_abs_logit_diff") is not None else "not measured"),
        ("merge error fp32", f"max |Δlogit| {ref['max_abs_logit_diff']:.2e} (fp32 noise floor "
                             f"{m['fp32_noise_floor']:.2e}), top-1 {ref['top1_agreement']:.0%}"
         if m.get("fp32_noise_floor") is not None else f"max |Δlogit| {ref['max_abs_logit_diff']:.2e}"),
        ("merge error int4", "-" if not i4 else f"max |Δlogit| {i4['max_abs_logit_diff']:.2e} (bf16 kernel), "
                                                f"top-1 {i4['top1_agreement']:.0%}"),
        ("decode tokens/s", f"merged {s['speed']['merged_tokens_per_s']:.1f} vs unmerged "
                            f"{s['speed']['unmerged_tokens_per_s']:.1f} (batch 1, {s['speed']['threads']} threads)"),
        ("stage seconds", ", ".join(f"{k} {v:.0f}" for k, v in s["stage_seconds"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
