"""Every exactly merged model of ``qalora reproduce --suite methods`` exported to GGUF and run in
llama.cpp (llama-cpp-python, not a project dependency): top-1 agreement and |logit| differences
with qalora's fp32 path on held-out passages, and a greedy chat answer from both. The stored form
is canonical, so the exporter takes every kind's merge unchanged.

Prints a table and writes ``benchmarks/results/methods_gguf.json``::

    python benchmarks/methods_gguf.py --work /work/runs/methods --grid int3-g32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gguf_llamacpp import compare  # noqa: E402

EXACT = ("qalora", "qalora+scales", "peqa", "lota", "lota+qalora")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True, help="the --out folder of qalora reproduce --suite methods")
    p.add_argument("--grid", default="int3-g32")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods_gguf.json"))
    args = p.parse_args()
    from llama_cpp import Llama

    import qalora
    from qalora.export.gguf import export_gguf

    work = Path(args.work)
    (work / "gguf").mkdir(exist_ok=True)
    results = []
    for name in EXACT:
        model_dir = work / "models" / f"{name}-{args.grid}"
        if not (model_dir / "merge_report.json").is_file():
            print(f"{name}: no merged model in {model_dir} (skipped)")
            continue
        path = work / "gguf" / f"{name}-{args.grid}.gguf"
        if not path.is_file():
            export_gguf(model_dir, path, progress=False)
        model, tok = qalora.load_model_and_tokenizer(model_dir)
        llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
        rows, same = compare(model, tok, llm, kernels=("reference",))
        msgs = [{"role": "user", "content": args.prompt}]
        answer = llm.create_chat_completion(messages=msgs, max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
        ours = qalora.generate(model, tok, args.prompt, max_new_tokens=24, chat=True)
        n = sum(r["positions"] for r in rows)
        results.append({"method": name, "model": str(model_dir), "gguf": str(path), "bytes": path.stat().st_size,
                        "same_tokens": same, "positions": n,
                        "top1": sum(r["top1"] * r["positions"] for r in rows) / n,
                        "mean_abs_diff": sum(r["mean_abs_diff"] * r["positions"] for r in rows) / n,
                        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
                        "llama_cpp_answer": answer, "qalora_answer": ours})
        del llm, model
    print(f"{'method':<14} {'GGUF MB':>8} {'positions':>9} {'top-1':>6} {'mean|d|':>8} {'max|d|':>7}  llama.cpp answer")
    for r in results:
        print(f"{r['method']:<14} {r['bytes'] / 1e6:>8.1f} {r['positions']:>9} {r['top1']:>6.3f} {r['mean_abs_diff']:>8.4f} "
              f"{r['max_abs_diff']:>7.3f}  {r['llama_cpp_answer']!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"work": str(work), "grid": args.grid, "rows": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
