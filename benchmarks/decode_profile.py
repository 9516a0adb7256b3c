"""Where a decode step's time goes: ``torch.profiler`` over one-token steps of ``qalora.decode``
(batch 1) on speed.py's INT4 g32 RTN checkpoint of the embedded model, 2 threads.

    python benchmarks/decode_profile.py [--compile] [--head-bits 4] [--steps 10] [--work DIR] [--out FILE]

Prints the step time and the operators by self CPU time, and writes them to
``benchmarks/results/decode_profile[-compiled][-head4].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from speed_common import ROOT, Settings, rtn_checkpoint

sys.path.insert(0, str(ROOT.parent / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--compile", action="store_true", help="the compiled step (torch.compile, static cache)")
    p.add_argument("--head-bits", type=int, default=0, help="quantize the head in memory first (0 = keep)")
    p.add_argument("--steps", type=int, default=10, help="timed and profiled one-token steps")
    p.add_argument("--work", default="/tmp/qalora-speed", help="speed.py's --work (its INT4 g32 RTN checkpoint)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    import qalora
    from qalora.config import DecodeConfig
    from qalora.decode import decode, quantize_head
    from qalora.decode.step import bound_kernels, cache_for, compiled_step, eager_step

    torch.set_num_threads(Settings().threads)
    ckpt = rtn_checkpoint(Path(args.work), 4)
    model = qalora.load(ckpt, kernel="auto").eval()
    if args.head_bits:
        quantize_head(model, args.head_bits)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    decode(model, prompt, DecodeConfig(max_new_tokens=4, compile=args.compile))  # warm-up / compilation
    warmup_s = time.perf_counter() - t0
    step = compiled_step(model) if args.compile else eager_step(model)
    n = prompt.shape[1]
    with torch.inference_mode():
        cache = cache_for(model, 1, n + 3 * args.steps + 8, static=args.compile)
        model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        tok = prompt[:, -1:]
        with bound_kernels(model, 1):
            for i in range(3):
                step(tok, torch.tensor([[n + i]]), cache)
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(tok, torch.tensor([[n + 3 + i]]), cache)
            step_ms = (time.perf_counter() - t0) / args.steps * 1e3
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(args.steps):
                    step(tok, torch.tensor([[n + 3 + args.steps + i]]), cache)
    ka = prof.key_averages()
    table = ka.table(sort_by="self_cpu_time_total", row_limit=15)
    total = sum(e.self_cpu_time_total for e in ka)
    rows = sorted(({"op": e.key, "calls_per_step": e.count / args.steps,
                    "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
                    "share": e.self_cpu_time_total / total} for e in ka), key=lambda r: -r["self_cpu_ms_per_step"])
    print(table)
    name = "decode_profile" + ("-compiled" if args.compile else "") + (f"-head{args.head_bits}" if args.head_bits else "")
    out = Path(args.out or ROOT / "results" / f"{name}.json")
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/decode_profile.py", *sys.argv[1:]]),
                               "compile": args.compile, "head_bits": args.head_bits, "warmup_s": warmup_s,
                               "step_ms": step_ms, "ops": rows[:25], "table": table}, indent=2) + "\n")
    print(f"one-token step {step_ms:.1f} ms (unprofiled mean of {args.steps}); wrote {out}")


if __name__ == "__main__":
    main()
