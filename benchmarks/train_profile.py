"""Where a QA-LoRA training step spends its time and memory: ``torch.profiler`` over the steps
``speed.py`` times (``train-qalora`` / ``train-qalora-gc``: INT4 g32 RTN base of the embedded
model, batch 4 x 256 random ids, rank 64 on all seven projections, fp32, AdamW, 2 threads).

    python benchmarks/train_profile.py [--grad-ckpt] [--steps 2] [--work DIR] [--out FILE]

Prints the operators by self CPU time and by the memory they allocate (``profile_memory``),
and writes both tables with the step times and peak RSS to
``benchmarks/results/train_profile[-gc].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from speed_common import ROOT, Settings, peak_rss_mb, rtn_checkpoint

sys.path.insert(0, str(ROOT.parent / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the decoder layers")
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    p.add_argument("--work", default="/tmp/qalora-speed", help="speed.py's --work (its INT4 g32 RTN checkpoint)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from speed_hf import train_batch

    from qalora.adapters.attach import add_adapters
    from qalora.adapters.base import load_base
    from qalora.config import LoraConfig, TrainConfig
    from qalora.training.loop import _token_loss_sum
    from qalora.training.optim import Optimizers

    torch.set_num_threads(Settings().threads)
    ckpt = rtn_checkpoint(Path(args.work), 4)
    cfg, lora = TrainConfig(), LoraConfig()
    net = load_base("qalora", str(ckpt), cfg.compute_dtype).model
    torch.manual_seed(cfg.seed)
    add_adapters(net, "qalora", lora)
    if args.grad_ckpt:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = Optimizers(net, cfg)
    batch = train_batch(net.config.vocab_size, cfg.batch_size, cfg.max_seq_len)
    n = int((batch["labels"][:, 1:] != -100).sum())
    net.train()

    def step():
        loss = _token_loss_sum(net, batch, __import__("contextlib").nullcontext) / n
        loss.backward()
        optim.clip(cfg.max_grad_norm)
        optim.step()

    step()
    rss_warm = peak_rss_mb()
    times = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    ka = prof.key_averages()
    by_time = ka.table(sort_by="self_cpu_time_total", row_limit=15)
    by_mem = ka.table(sort_by="self_cpu_memory_usage", row_limit=10)
    print(by_time)
    print(by_mem)
    rows = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3 / args.steps,
             "self_cpu_memory_mb": e.self_cpu_memory_usage / 2**20 / args.steps} for e in ka]
    rows.sort(key=lambda r: -r["self_cpu_ms"])
    out = Path(args.out or ROOT / "results" / f"train_profile{'-gc' if args.grad_ckpt else ''}.json")
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/train_profile.py", *sys.argv[1:]]),
                               "grad_ckpt": args.grad_ckpt, "profiled_step_s": times, "peak_rss_mb": peak_rss_mb(),
                               "peak_rss_after_warmup_mb": rss_warm, "ops": rows[:40],
                               "table_by_time": by_time, "table_by_memory": by_mem}, indent=2) + "\n")
    print(f"steps {', '.join(f'{t:.2f}' for t in times)} s (profiled); peak RSS {peak_rss_mb():.0f} MB; wrote {out}")


if __name__ == "__main__":
    main()
