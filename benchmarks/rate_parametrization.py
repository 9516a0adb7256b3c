"""QA-LoRA's step size: a higher rate, or the variance-matching parametrization sqrt(L) * mean?

QA-LoRA's adapter reads ``pool(x) = mean over each group of L inputs``. Scaling that input by
``c`` (``sqrt(L) * mean`` matches the input's variance) is, under AdamW, the same run as scaling
``alpha`` by ``c``: the gradients of A and B scale by ``c``, AdamW's update does not (up to its
epsilon; clipping scales all gradients alike), and the output's change scales by ``c``. So the
parametrization is measured as ``--alpha 16 * sqrt(L)`` beside a higher rate, on the same base and
data, without a second code path. This reads each run's ``adapter_config.json`` (rate, alpha,
validation loss at step 0 and at the end) and writes ``benchmarks/results/rate_parametrization.json``
and the table ``docs/LEARNING_RATES.md`` quotes.

    python benchmarks/rate_parametrization.py --group-size 32 \\
        "mean, lr 2e-4=runs/pipeline-lr2e-4/adapter" "sqrt(L) mean, lr 2e-4=runs/mainjob-sqrtL-lr2e-4" ...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_row(label: str, adir: Path, group_size: int) -> dict:
    cfg = json.loads((adir / "adapter_config.json").read_text())
    if cfg["method"] != "qalora":
        raise SystemExit(f"{adir}: a {cfg['method']} adapter; this compares QA-LoRA runs")
    alpha, rank = cfg["alpha"], cfg["rank"]
    return {"label": label, "adapter": str(adir), "lr": cfg["train_config"]["lr"], "alpha": alpha, "rank": rank,
            "pool_factor": round(alpha / 16.0, 4), "sqrt_group": round(math.sqrt(group_size), 4),
            "steps": cfg["steps"], "val_loss_start": cfg["val_loss_start"], "val_loss_end": cfg["val_loss_end"],
            "seconds_per_step": cfg["seconds_per_step"], "base_sha256": cfg["base_sha256"]}


def table(rows: list[dict]) -> str:
    lines = ["| run | lr | alpha (= 16 × pooled-input factor) | validation loss, step 0 → end |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['alpha']:.2f} | {r['val_loss_start']:.3f} → "
                     f"{r['val_loss_end']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=ADAPTER_FOLDER, QA-LoRA runs on one base")
    p.add_argument("--group-size", type=int, required=True, help="the base's group size L")
    p.add_argument("--out", default=str(RESULTS / "rate_parametrization.json"))
    args = p.parse_args()
    rows = []
    for spec in args.runs:
        label, sep, path = spec.rpartition("=")
        if not sep:
            raise SystemExit(f"run {spec!r} is not LABEL=FOLDER")
        rows.append(run_row(label, Path(path), args.group_size))
    if len({r["base_sha256"] for r in rows}) != 1:
        raise SystemExit("the runs sit on different bases; compare runs on one base")
    out = {"group_size": args.group_size, "rows": rows, "table": table(rows)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(out["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
