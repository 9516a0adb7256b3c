"""QA-LoRA vs QLoRA vs LoRA on the embedded model: same data, rank, steps, learning rate.

Each method trains in its own process (so peak memory is its own) through the real CLI, then
the table reads each run's ``adapter_config.json`` and ``metrics.jsonl``: trainable parameters,
median seconds per optimizer step, peak RSS, validation loss at step 0 and at the end.
Writes ``benchmarks/results/train_methods.json`` after every run.

    python benchmarks/train_methods.py --qalora-base q3 --steps 200 --workdir runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path


def summarize(adir: Path) -> dict:
    cfg = json.loads((adir / "adapter_config.json").read_text())
    recs = [json.loads(x) for x in (adir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["seconds"] for r in recs if "seconds" in r]
    vals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    return {"method": cfg["method"], "trainable_parameters": cfg["trainable_parameters"],
            "median_s_per_step": statistics.median(steps), "tokens_per_step": statistics.mean(r["tokens"] for r in recs if "tokens" in r),
            "input_tokens_per_s": (statistics.mean(r["input_tokens"] for r in recs if "input_tokens" in r)
                                   / statistics.median(steps)) if any("input_tokens" in r for r in recs) else None,
            "peak_rss_gb": cfg["peak_rss_mb"] / 1024, "val_loss_start": vals[0][1], "val_loss_end": vals[-1][1],
            "val_curve": vals, "steps": cfg["steps"], "base": cfg["base_path"], "base_bits": cfg["base_bits"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--qalora-base", required=True, help="qalora checkpoint (e.g. INT3 g32 GPTQ) for the qalora run")
    p.add_argument("--fp-model", default="default", help="full-precision model for qlora and lora")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--methods", nargs="+", default=["qalora", "qlora", "lora"])
    p.add_argument("--workdir", default="train-runs")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more qalora train options")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_methods.json"))
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    rows = []
    for method in args.methods:
        adir = work / method
        if not (adir / "adapter_config.json").is_file():
            model = args.qalora_base if method == "qalora" else args.fp_model
            cmd = [sys.executable, "-m", "qalora", "train", "--model", str(model), "--method", method,
                   "--data", "default", "--steps", str(args.steps), "--out", str(adir), *args.extra]
            if adir.exists():
                cmd.append("--resume")
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        rows.append(summarize(adir))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                                              "steps": args.steps, "rows": rows}, indent=2))
    print(f"\n{'method':<8} {'base':<10} {'trainable':>12} {'s/step':>8} {'peak GB':>8} {'val@0':>8} {'val@end':>8}")
    for r in rows:
        base = f"INT{r['base_bits']}" if r["method"] == "qalora" else ("NF4" if r["method"] == "qlora" else "fp32")
        print(f"{r['method']:<8} {base:<10} {r['trainable_parameters']:>12,} {r['median_s_per_step']:>8.2f} "
              f"{r['peak_rss_gb']:>8.2f} {r['val_loss_start']:>8.4f} {r['val_loss_end']:>8.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
