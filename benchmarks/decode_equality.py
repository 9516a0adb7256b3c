"""Greedy tokens of ``qalora.decode`` (the path of ``qalora generate``) against transformers'
``model.generate(do_sample=False)`` on a real merged checkpoint, per kernel.

    python benchmarks/decode_equality.py --model /work/runs/pipeline/merged --compile

For each kernel (``reference``: fp32 unpack + GEMM; ``auto``: what a plain load picks, the int4
kernel where it runs) and each chat prompt, both paths generate ``--new-tokens`` tokens with the
tokenizer's eos suppressed (``min_new_tokens``: generate reads eos from the generation config),
on the same loaded model; ``--compile`` adds ``decode(compile=True)`` against the
eager decode. Identical tokens are expected (each step's logits are the same computation).
Prints a table and writes ``benchmarks/results/decode_equality.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import qalora
from qalora.config import DecodeConfig
from qalora.decode import decode, prompt_ids

OUT = Path(__file__).parent / "results" / "decode_equality.json"
PROMPTS = ("What is the capital of France?", "Explain photosynthesis in one sentence.",
           "Write a Python function that reverses a string.", "Give three tips for staying focused.")


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first differing token of two ``[n]`` sequences (``None``: identical)."""
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    if diff.numel():
        return int(diff[0, 0])
    return None if a.numel() == b.numel() else n


def hf_greedy(model, ids: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[0, ids.shape[1]:]


def compare_kernel(model_dir: str, kernel: str, prompts, n: int, compile: bool) -> list[dict]:
    model, tok = qalora.load_model_and_tokenizer(model_dir, kernel=kernel)
    model.eval()
    rows = []
    for prompt in prompts:
        ids = prompt_ids(tok, prompt, chat=True)
        t0 = time.perf_counter()
        ours = decode(model, ids, DecodeConfig(max_new_tokens=n), eos_token_id=tok.eos_token_id, min_new_tokens=n)[0]
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = hf_greedy(model, ids, n, tok.eos_token_id)
        t_hf = time.perf_counter() - t0
        row = {"kernel": kernel, "prompt": prompt, "tokens": n, "identical": bool(torch.equal(ours, theirs)),
               "first_difference": first_difference(ours, theirs), "decode_s": round(t_ours, 2),
               "generate_s": round(t_hf, 2), "text": tok.decode(ours, skip_special_tokens=True)}
        if compile:
            comp = decode(model, ids, DecodeConfig(max_new_tokens=n, compile=True), eos_token_id=tok.eos_token_id,
                          min_new_tokens=n)[0]
            row["compiled_identical"] = bool(torch.equal(comp, ours))
            row["compiled_first_difference"] = first_difference(comp, ours)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a qalora checkpoint folder (e.g. a merged model)")
    p.add_argument("--kernels", nargs="+", default=["reference", "auto"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="also compare decode(compile=True) with the eager decode")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    rows = [r for k in args.kernels for r in compare_kernel(args.model, k, PROMPTS, args.new_tokens, args.compile)]
    print(f"{'kernel':10} {'prompt':48} {'same as generate':>17} {'compiled same':>14}")
    for r in rows:
        same = "yes" if r["identical"] else f"no (at {r['first_difference']})"
        comp = "-" if "compiled_identical" not in r else ("yes" if r["compiled_identical"] else
                                                          f"no (at {r['compiled_first_difference']})")
        print(f"{r['kernel']:10} {r['prompt'][:48]:48} {same:>17} {comp:>14}")
    result = {"model": args.model, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
              "identical": sum(r["identical"] for r in rows), "rows_total": len(rows), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"{result['identical']}/{len(rows)} identical; wrote {args.out}")


if __name__ == "__main__":
    main()
