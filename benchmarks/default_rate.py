"""Does ``qalora train --method M`` with no ``--lr`` train? The default rate on a task of the suite.

Through the real commands, each in its own process: ``qalora train`` (no ``--lr``: the method's
own default) on the task suite's training part and GPTQ base, ``qalora merge`` (exact, verified),
then the merged model scored on the suite's held-out items (the same split, scorer and metric as
``qalora reproduce --suite tasks``). Writes ``benchmarks/results/default_rate-<task>-<method>-<grid>.json``
(the commands, the rate the adapter recorded, held-out accuracy ± SE, the base's SHA-256).

    qalora reproduce --suite tasks --budget small --out runs/tasks --tasks sst2 --grids int4-g64 --task-rows gptq
    python benchmarks/default_rate.py --work runs/tasks --task sst2 --grid int4-g64 --method qalora
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a task-suite work folder holding the split and the GPTQ base")
    p.add_argument("--task", default="sst2")
    p.add_argument("--grid", default="int4-g64")
    p.add_argument("--method", default="qalora")
    p.add_argument("--budget", default="small")
    args = p.parse_args()

    from qalora.checkpoint import read_meta, weights_sha256
    from qalora.checkpoint import load
    from qalora.eval.choice_scoring import score_items
    from qalora.eval.finetune_tasks import finetune_items, reported_metric
    from qalora.eval.stats import accuracy
    from qalora.models import load_tokenizer
    from qalora.reproduce.task_split import split_items
    from qalora.reproduce.tasks import TASK_BUDGETS

    tb = TASK_BUDGETS[args.budget]
    work = Path(args.work)
    base, data = work / "bases" / f"gptq-{args.grid}", work / "tasks" / args.task / "train.jsonl"
    if not (base / "qalora.json").is_file() or not data.is_file():
        sys.exit(f"{work} has no GPTQ base {args.grid} or no {args.task} split; run the suite's gptq row first")
    name = f"default_rate-{args.task}-{args.method}-{args.grid}"
    adir, mdir = work / "adapters" / name, work / "models" / name
    adir.parent.mkdir(exist_ok=True)
    mdir.parent.mkdir(exist_ok=True)
    train = ["qalora", "train", "--model", str(base), "--method", args.method, "--data", str(data),
             "--steps", str(tb.steps), "--batch-size", str(tb.batch_size), "--max-seq-len", str(tb.max_seq_len),
             "--eval-every", str(tb.steps), "--save-every", str(max(1, tb.steps // 4)), "--out", str(adir)]
    if (adir / "adapter_config.json").is_file():
        print(f"{adir} is trained; reusing it")
    else:
        run(train + (["--resume"] if (adir / "run.json").is_file() else []))
    merge = ["qalora", "merge", "--model", str(base), "--adapter", str(adir), "--out", str(mdir)]
    if not (mdir / "merge_report.json").is_file():
        run(merge)
    heldout = split_items(finetune_items(args.task), tb.heldout).heldout
    model, tok = load(mdir, kernel="dense"), load_tokenizer(mdir)
    t0 = time.time()
    scores = score_items(model, tok, list(heldout), batch_size=8, progress=True, desc=f"{name} held-out")
    metric = reported_metric(args.task)
    acc = accuracy([getattr(s, metric) for s in scores]).to_dict()
    cfg = json.loads((adir / "adapter_config.json").read_text())
    report = json.loads((mdir / "merge_report.json").read_text())
    out = {"task": args.task, "grid": args.grid, "method": args.method, "metric": metric, metric: acc,
           "lr": cfg["train_config"]["lr"], "lr_given": False, "steps": cfg["steps"],
           "val_loss_start": cfg.get("val_loss_start"), "val_loss_end": cfg.get("val_loss_end"),
           "train_seconds": round(cfg["seconds_per_step"] * cfg["steps"], 1), "eval_seconds": round(time.time() - t0, 1),
           "merge_lossy": bool(report.get("lossy")), "base_sha256": weights_sha256(read_meta(base)),
           "commands": [" ".join(train), " ".join(merge)],
           "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()}}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{args.method} at its default rate {out['lr']:g}: {metric} {100 * acc['value']:.1f} ± "
          f"{100 * acc['stderr']:.1f} on {acc['n']} held-out {args.task} items; wrote {path}")


if __name__ == "__main__":
    main()
