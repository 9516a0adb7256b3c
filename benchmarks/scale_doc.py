"""Write ``docs/SCALE.md`` from the measured scale runs (``benchmarks/results/scale-smollm2.json``,
``scale-tinyllama.json``) and the size formulas of ``scale_model.py``.

    python benchmarks/scale_doc.py            # rewrites docs/SCALE.md
    python benchmarks/scale_doc.py --check    # exit 1 if docs/SCALE.md is not what it would write

The extrapolation, per host stage (quantize, merge, export: they run on the CPU and hold their
model in host memory): the stage's memory above the interpreter (``peak - imports``) is fitted as
``a · X + c`` through the two measured sizes, ``X`` being what the stage holds by design (its
formula is printed beside it); the same for its seconds with the work it does. Training on GPUs
is not measured here at all (no GPU ran it): its memory is the sum of the ``scale_model`` terms,
each assumption stated in the text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scale_model as sm  # noqa: E402

ROOT = HERE.parent
DOC = ROOT / "docs" / "SCALE.md"
RESULTS = {"smollm2": HERE / "results" / "scale-smollm2.json", "tinyllama": HERE / "results" / "scale-tinyllama.json"}
# the 1.1B run's measurements before quantize streamed and merge read its base unmapped (scale.py's state file)
FIRST_RUN = HERE / "results" / "scale-tinyllama-first-run.json"
CHANGED = ("quantize-rtn", "quantize-gptq", "train-qalora", "merge")
CALIB_TOKENS = 8 * 256        # scale.py's GPTQ: --calib-samples 8, 256 tokens each
GPU_TOKENS = 4 * 2048         # per GPU and micro-batch in the GPU table
GPU_MEMORY = 80e9
A100_BF16 = 312e12            # dense bf16 peak of an A100; the GPU time column assumes 40 % of it
UTILISATION = 0.4


def _held_model(s: sm.Shape) -> float:
    return sm.packed_bytes(s) + sm.float_bytes(s)


def _gptq_work(s: sm.Shape) -> float:
    """GPTQ's arithmetic per model: per projection the Hessian (``2 n in²``), its Cholesky inverse
    (``in³ / 3``) and the column sweep (``2 in² out``), plus the calibration forward (``2 n W``)."""
    per_layer = sum(2 * CALIB_TOKENS * i * i + i ** 3 / 3 + 2 * i * i * o for i, o in s.linears())
    return s.layers * per_layer + 2 * CALIB_TOKENS * s.weights


# stage -> (what its memory scales with, its formula, what its time scales with, its formula)
HOST_STAGES = {
    "quantize-rtn": (lambda s: _held_model(s) + sm.layer_fp32_bytes(s), "packed + float + one fp32 layer",
                     lambda s: s.weights, "W"),
    "quantize-gptq": (lambda s: _held_model(s) + sm.layer_fp32_bytes(s) + sm.hessian_bytes(s)
                      + sm.calibration_bytes(s, CALIB_TOKENS),
                      "packed + float + one fp32 layer + Hessian + calibration activations",
                      _gptq_work, "GPTQ FLOPs (n = 2,048 calibration tokens)"),
    "merge": (_held_model, "packed + float", lambda s: s.weights, "W"),
    "export-gguf": (_held_model, "packed + float", lambda s: s.weights, "W"),
    "export-mlx": (_held_model, "packed + float", lambda s: s.weights, "W"),
}
TRAIN_STAGES = ("train-qalora", "train-qlora")


def load_runs() -> dict[str, dict]:
    """``{shape: {"data": result JSON, "rows": {stage: row}}}``, plus ``"first"``: the 1.1B
    run's first measurement of each stage."""
    runs = {"first": json.loads(FIRST_RUN.read_text())["stages"]}
    for key, path in RESULTS.items():
        data = json.loads(path.read_text())
        runs[key] = {"data": data, "rows": {r["stage"]: r for r in data["rows"]}}
    return runs


def _gb(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e9:.2f}"


def _grown(r: dict) -> float | None:
    if r.get("peak_rss_bytes") is None or r.get("baseline_rss_bytes") is None:
        return None
    return r["peak_rss_bytes"] - r["baseline_rss_bytes"]


def fit(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """``(a, c)`` of the line ``y = a x + c`` through two points."""
    a = (y1 - y0) / (x1 - x0)
    return a, y0 - a * x0


def measured_table(runs: dict) -> str:
    lines = ["| stage | model | seconds | peak RSS GB | after imports GB | peak − imports GB | output GB |",
             "|---|---|---|---|---|---|---|"]
    for stage in runs["tinyllama"]["rows"]:
        for key in ("smollm2", "tinyllama"):
            r = runs[key]["rows"].get(stage)
            if r is None or r.get("status") not in ("ok", "reused"):
                continue
            lines.append(f"| {stage} | {sm.MEASURED[key].name.split(' ')[0]} | {r['seconds']:.0f} | "
                         f"{_gb(r['peak_rss_bytes'])} | {_gb(r['baseline_rss_bytes'])} | {_gb(_grown(r))} | "
                         f"{_gb(r.get('output_bytes'))} |")
    return "\n".join(lines)


def _run_cell(r: dict) -> str:
    return f"{r['seconds']:.0f} s, {_gb(r['peak_rss_bytes'])}"


def changes_table(runs: dict) -> str:
    """The 1.1B stages measured again after a change: first run, the run just before the last
    (when recorded), and now."""
    lines = ["| stage | first run: seconds, peak RSS GB | run before the last | now |", "|---|---|---|---|"]
    for stage in CHANGED:
        first, now = runs["first"][stage], runs["tinyllama"]["rows"][stage]
        prev = now.get("previous") or {}
        lines.append(f"| {stage} | {_run_cell(first)} | {_run_cell(prev) if prev.get('peak_rss_bytes') else '—'} | "
                     f"{_run_cell(now)} |")
    return "\n".join(lines)


def host_table(runs: dict) -> str:
    small, big = sm.MEASURED["smollm2"], sm.MEASURED["tinyllama"]
    head = "| stage | memory ∝ | a | " + " | ".join(f"{t.name.split(' ')[0]} GB" for t in sm.TARGETS) + \
           " | time ∝ | " + " | ".join(f"{t.name.split(' ')[0]} h" for t in sm.TARGETS) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(sm.TARGETS))]
    for stage, (mem_x, mem_f, time_x, time_f) in HOST_STAGES.items():
        r0, r1 = runs["smollm2"]["rows"].get(stage), runs["tinyllama"]["rows"].get(stage)
        if not r0 or not r1 or _grown(r0) is None or _grown(r1) is None:
            continue
        a, c = fit(mem_x(small), _grown(r0), mem_x(big), _grown(r1))
        ta, tc = fit(time_x(small), r0["seconds"], time_x(big), r1["seconds"])
        base = r1["baseline_rss_bytes"]
        mem = [base + max(a * mem_x(t) + c, 0) for t in sm.TARGETS]
        hours = [max(ta * time_x(t) + tc, 0) / 3600 for t in sm.TARGETS]
        lines.append(f"| {stage} | {mem_f} | {a:.2f} | " + " | ".join(f"{m / 1e9:.1f}" for m in mem)
                     + f" | {time_f} | " + " | ".join(f"{h:.1f}" for h in hours) + " |")
    return "\n".join(lines)


def gpu_rows() -> list[dict]:
    rows = []
    for t in sm.TARGETS:
        for ckpt in (False, True):
            for gpus in (1, 8):
                base = sm.packed_bytes(t) + sm.float_bytes(t, width=2)   # bf16 embeddings/head on the GPU
                adapter = sm.adapter_train_bytes(t) / (gpus if gpus > 1 else 1)  # FSDP2 shards the adapter state
                act = sm.activation_bytes(t, GPU_TOKENS, ckpt)
                work = sm.dequant_layer_bytes(t)
                total = base + adapter + act + work
                flops = sm.train_step_flops(t, GPU_TOKENS, ckpt)
                tok_s = gpus * GPU_TOKENS / (flops / (A100_BF16 * UTILISATION))
                rows.append(dict(model=t.name, gpus=gpus, checkpointing=ckpt, base=base, adapter=adapter,
                                 activations=act, dequant=work, total=total, fits=total <= GPU_MEMORY,
                                 tokens_per_s=tok_s))
    return rows


def gpu_table() -> str:
    lines = ["| model | GPUs | checkpointing | base GB | adapter state GB | activations GB | dequantized layer GB | "
             "per GPU GB | fits 80 GB | tokens/s (A100, 40 %) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in gpu_rows():
        lines.append(f"| {r['model']} | {r['gpus']} | {'yes' if r['checkpointing'] else 'no'} | {_gb(r['base'])} | "
                     f"{_gb(r['adapter'])} | {_gb(r['activations'])} | {_gb(r['dequant'])} | {_gb(r['total'])} | "
                     f"{'yes' if r['fits'] else 'no'} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def gpu_summary() -> str:
    """One sentence per target: the fewest resources (checkpointing off before on) that fit."""
    parts, every = [], gpu_rows()
    for t in sm.TARGETS:
        rows = [r for r in every if r["model"] == t.name and r["gpus"] == 1]
        plain = next(r for r in rows if not r["checkpointing"])
        ckpt = next(r for r in rows if r["checkpointing"])
        name = t.name.split(" ")[0]
        if plain["fits"]:
            parts.append(f"{name} fits one 80 GB GPU as it is ({plain['total'] / 1e9:.0f} GB)")
        elif ckpt["fits"]:
            parts.append(f"{name} fits one 80 GB GPU only with `--grad-checkpointing` ({ckpt['total'] / 1e9:.0f} GB; "
                         f"{plain['total'] / 1e9:.0f} GB without)")
        else:
            parts.append(f"{name} does not fit one 80 GB GPU even with checkpointing ({ckpt['total'] / 1e9:.0f} GB)")
    return ("On these assumptions " + "; ".join(parts) + ". Eight GPUs divide the time and the adapter state, "
            "not the base.")


def shapes_table() -> str:
    lines = ["| model | layers | hidden | MLP | heads / KV | vocab | tied | parameters | W (quantized) | "
             "packed INT4 g32 GB | float GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in [*sm.MEASURED.values(), *sm.TARGETS]:
        lines.append(f"| {s.name} | {s.layers} | {s.hidden} | {s.mlp} | {s.heads} / {s.kv_heads} | {s.vocab:,} | "
                     f"{'yes' if s.tied else 'no'} | {s.parameters / 1e9:.3f} B | {s.weights / 1e9:.3f} B | "
                     f"{_gb(sm.packed_bytes(s))} | {_gb(sm.float_bytes(s))} |")
    return "\n".join(lines)


def render(runs: dict, prose: str) -> str:
    """``prose`` with its ``{measured}``, ``{changes}``, ``{host}``, ``{gpu}``, ``{gpu_summary}``,
    ``{shapes}`` and ``{commands}`` placeholders filled."""
    commands = "\n".join(f"    {runs[k]['data']['command']}" for k in ("smollm2", "tinyllama"))
    return prose.format(measured=measured_table(runs), changes=changes_table(runs), host=host_table(runs),
                        gpu=gpu_table(),
                        gpu_summary=gpu_summary(), shapes=shapes_table(), commands=commands)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only compare docs/SCALE.md with what would be written")
    args = p.parse_args()
    text = render(load_runs(), (HERE / "scale_doc.md").read_text())
    if args.check:
        same = DOC.is_file() and DOC.read_text() == text
        print("docs/SCALE.md is up to date" if same else "docs/SCALE.md differs from what scale_doc.py writes")
        sys.exit(0 if same else 1)
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
