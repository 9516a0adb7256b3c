"""Speed of the quantized matmul paths vs dense fp32/bf16 on this CPU (or CUDA when present).

For each shape and row count M, times ``QuantLinear`` on the int4 kernel and on the reference
path (unpack + dequantize + fp32 GEMM), a dense fp32 and bf16 ``F.linear``, and prints the
error of each quantized path vs the fp32 matmul of the dequantized weight (max abs and SQNR).
Writes ``benchmarks/results/kernels.json`` (the README's kernel table, checked against it by
``tests/test_docs.py``). ``auto`` takes the int4 kernel at every row count it supports
(``qalora.kernels.registry``); this table is what that choice rests on, and what would show a
machine where dense GEMM wins for large M (``Kernel.max_rows``).

    python benchmarks/kernels.py [--shapes 4096x4096 1536x576] [--rows 1 16 64 256 1024]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qalora.nn.quant_linear import QuantLinear
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight


def bench(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean().clamp_min(1e-30)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "1536x576", "576x1536"], help="OUTxIN")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 256, 1024])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows_out = []
    print(f"device {dev}, threads {torch.get_num_threads()}, INT{args.bits} g{args.group_size}")
    print(f"{'shape':>10} {'M':>5} {'int4 ms':>9} {'ref ms':>9} {'fp32 ms':>9} {'bf16 ms':>9} {'int4 SQNR':>10} {'int4 maxabs':>12}")
    for shape in args.shapes:
        out_f, in_f = map(int, shape.split("x"))
        w = torch.randn(out_f, in_f) * 0.02
        codes, s, o = rtn_quantize(w, args.bits, args.group_size)
        layer = QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, s, o, args.bits, args.group_size)).to(dev)
        wq = layer.quantized_weight().dequantize().to(dev)
        wb = wq.bfloat16()
        for m in args.rows:
            x = torch.randn(m, in_f, device=dev)
            reps = max(1, int(2e8 / (m * in_f * out_f)))
            ref = x @ wq.t()
            layer.kernel = "int4"
            y4 = layer(x)
            t4 = bench(lambda: layer(x), reps)
            layer.kernel = "reference"
            tr = bench(lambda: layer(x), reps)
            tf = bench(lambda: x @ wq.t(), reps)
            xb = x.bfloat16()
            tb = bench(lambda: xb @ wb.t(), reps)
            row = {"shape": shape, "rows": m, "int4_ms": t4, "reference_ms": tr, "fp32_ms": tf, "bf16_ms": tb,
                   "int4_sqnr_db": sqnr(ref, y4), "int4_max_abs": float((y4 - ref).abs().max())}
            rows_out.append(row)
            print(f"{shape:>10} {m:>5} {t4:>9.3f} {tr:>9.3f} {tf:>9.3f} {tb:>9.3f} {row['int4_sqnr_db']:>10.1f} "
                  f"{row['int4_max_abs']:>12.3g}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "bits": args.bits, "group_size": args.group_size, "rows": rows_out}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
