"""Every exactly merged model of ``qalora reproduce --suite methods`` exported to GGUF and run in
llama.cpp (llama-cpp-python, not a project dependency): top-1 agreement and |logit| differences
with qalora's fp32 path on held-out passages, and a greedy chat answer from both. The stored form
is canonical, so the exporter takes every kind's merge unchanged.

Prints a table and writes ``benchmarks/results/methods_gguf.json``::

    python benchmarks/methods_gguf.py --work /work/runs/methods --grid int3-g32 int4-g64 int2-g32

Rows of grids not asked for this time are kept from the existing JSON, so grids can be added as
the suite finishes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gguf_llamacpp import compare  # noqa: E402



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True, help="the --out folder of qalora reproduce --suite methods")
    p.add_argument("--grid", nargs="+", default=["int3-g32"])
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods_gguf.json"))
    args = p.parse_args()
    from llama_cpp import Llama

    import qalora
    from qalora.export.gguf import export_gguf
    from qalora.reproduce.methods import METHOD_ROWS

    exact = [r.name for r in METHOD_ROWS if r.method in ("qalora", "peqa", "lota")]  # every exactly merged row

    work = Path(args.work)
    (work / "gguf").mkdir(exist_ok=True)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    results = [r for r in old.get("rows", []) if r.get("grid", old.get("grid")) not in args.grid]
    for grid, name in ((g, n) for g in args.grid for n in exact):
        model_dir = work / "models" / f"{name}-{grid}"
        if not (model_dir / "merge_report.json").is_file():
            print(f"{name}: no merged model in {model_dir} (skipped)")
            continue
        path = work / "gguf" / f"{name}-{grid}.gguf"
        if not path.is_file():
            export_gguf(model_dir, path, progress=False)
        model, tok = qalora.load_model_and_tokenizer(model_dir)
        llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
        rows, same = compare(model, tok, llm, kernels=("reference",))
        msgs = [{"role": "user", "content": args.prompt}]
        answer = llm.create_chat_completion(messages=msgs, max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
        ours = qalora.generate(model, tok, args.prompt, max_new_tokens=24, chat=True)
        n = sum(r["positions"] for r in rows)
        results.append({"method": name, "grid": grid, "model": str(model_dir), "gguf": str(path), "bytes": path.stat().st_size,
                        "same_tokens": same, "positions": n,
                        "top1": sum(r["top1"] * r["positions"] for r in rows) / n,
                        "mean_abs_diff": sum(r["mean_abs_diff"] * r["positions"] for r in rows) / n,
                        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
                        "llama_cpp_answer": answer, "qalora_answer": ours})
        del llm, model
    results.sort(key=lambda r: (r["grid"], exact.index(r["method"]) if r["method"] in exact else 99))
    print(f"{'grid':<9} {'method':<14} {'GGUF MB':>8} {'positions':>9} {'top-1':>6} {'mean|d|':>8} {'max|d|':>7}  llama.cpp answer")
    for r in results:
        print(f"{r['grid']:<9} {r['method']:<14} {r['bytes'] / 1e6:>8.1f} {r['positions']:>9} {r['top1']:>6.3f} {r['mean_abs_diff']:>8.4f} "
              f"{r['max_abs_diff']:>7.3f}  {r['llama_cpp_answer']!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"work": str(work), "grids": sorted({r["grid"] for r in results}), "rows": results},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
