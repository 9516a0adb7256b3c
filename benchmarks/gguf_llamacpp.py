"""Run an exported GGUF in llama.cpp (llama-cpp-python) and compare with qalora on the same tokens.

Needs ``pip install llama-cpp-python`` (builds llama.cpp from source, ~10-15 min on 2 cores);
not a project dependency. Prints a table and writes ``benchmarks/results/gguf_llamacpp.json``:
whether llama.cpp tokenizes like the HF tokenizer, top-1 agreement and |logit| differences of
llama.cpp vs qalora's fp32 reference path and int4 (bf16) kernel, and a greedy chat answer from
both. llama.cpp quantizes activations to 8 bits for Q4_1 matmuls and stores ``d`` and ``m`` in
fp16, so exact equality is not expected; the committed ``benchmarks/results/gguf_llamacpp.json``
holds what this script measured on a pipeline's merged INT3 QA-LoRA model (the README's table,
which ``tests/test_docs.py`` checks against it)::

    python benchmarks/gguf_llamacpp.py --model /tmp/runs/pipe3b/merged --gguf /tmp/runs/pipe3b/model.gguf
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

TEXTS = [
    "The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor "
    "in 27 BC, and in the West it ended in 476 AD. Question: Who was the first Roman emperor? Answer:",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. Plants store the sugar "
    "as starch, and animals that eat the plants use it for energy. The oxygen is released into the air.",
]


def compare(model, tok, llm, kernels=("reference", "int4")) -> tuple[list[dict], bool]:
    """``(rows, same_tokens)``: llama.cpp's logits vs qalora's on ``TEXTS``, per qalora kernel."""
    from qalora.patch import set_kernel

    rows, same_tokens = [], True
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        same_tokens &= llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        ll = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
        with torch.no_grad():
            for kernel in kernels:
                set_kernel(model, kernel)
                q = model(torch.tensor([ids])).logits[0]
                d = (ll - q).abs()
                rows.append({"kernel": kernel, "positions": len(ids), "top1": float((ll.argmax(-1) == q.argmax(-1)).float().mean()),
                             "mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max()),
                             "last_top1_equal": bool(ll[-1].argmax() == q[-1].argmax())})
    set_kernel(model, "auto")
    return rows, same_tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="qalora checkpoint the GGUF was exported from")
    p.add_argument("--gguf", required=True)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_llamacpp.json"))
    args = p.parse_args()
    from llama_cpp import Llama

    import qalora

    model, tok = qalora.load_model_and_tokenizer(args.model)
    llm = Llama(model_path=args.gguf, n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    rows, same_tokens = compare(model, tok, llm)
    t = time.time()
    msgs = [{"role": "user", "content": args.prompt}]
    answer = llm.create_chat_completion(messages=msgs, max_tokens=32, temperature=0.0)["choices"][0]["message"]["content"]
    llama_s = time.time() - t
    ours = qalora.generate(model, tok, args.prompt, max_new_tokens=32, chat=True)
    print(f"llama.cpp tokenizes like the HF tokenizer: {same_tokens}")
    print(f"{'qalora kernel':<14} {'positions':>9} {'top-1':>6} {'mean|d|':>8} {'max|d|':>7} {'last top-1 =':>12}")
    for r in rows:
        print(f"{r['kernel']:<14} {r['positions']:>9} {r['top1']:>6.3f} {r['mean_abs_diff']:>8.4f} {r['max_abs_diff']:>7.3f} "
              f"{str(r['last_top1_equal']):>12}")
    print(f"llama.cpp chat: {answer!r} ({llama_s:.1f} s)\nqalora chat:    {ours!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "gguf": args.gguf, "same_tokens": same_tokens,
                                          "rows": rows, "llama_cpp_answer": answer, "qalora_answer": ours}, indent=2))
    print(f"wrote {args.out}")
    del llm


if __name__ == "__main__":
    main()
