"""The adapter exported on its own, served unmerged, against the merged model it must equal.

From a pipeline run folder (``qalora pipeline --out DIR``: ``quantized/``, ``adapter/``,
``merged/``), this writes into ``--work``: the PEFT LoRA folder plus its dense fp32 base
(``export_peft(..., base_out=...)``), the llama.cpp LoRA GGUF (``export_gguf_lora``), and the
GGUFs of the quantized base and of the merged model (``export_gguf``). Then, on a few prompts:

- PEFT (``PeftModel.from_pretrained`` over the dense base) vs the merged model
  (``qalora.checkpoint.load(merged, kernel="dense")``), both fp32: max and mean |Δlogit|, top-1
  agreement over every position, and greedy continuations (``generate``) compared token by token;
- llama.cpp (llama-cpp-python): the base GGUF + the LoRA GGUF vs the merged GGUF, the same
  figures, plus llama.cpp's own floor (the merged GGUF vs qalora's fp32 merged logits: 8-bit
  activations and fp16 d, m) and the merged GGUF against a copy whose every offset ``m`` is one
  fp16 ulp away (``nudge_offsets``: the same model to fp16 storage precision), to read the first
  against.

Prints a table and writes ``benchmarks/results/adapter_export.json``::

    python benchmarks/adapter_export_check.py --pipeline /work/runs/pipeline --work /tmp/adapter-export

``--tiny`` builds a tiny random Llama pipeline (``tests/conftest.py``'s ``tiny_llama`` and
``tiny_tokenizer``; INT4 g32 RTN, QA-LoRA 8 steps at lr 1e-2, merged) in ``--work`` first and
writes its JSON there (``adapter_export_tiny.json``) unless ``--out`` is given: a smoke run of
the script in seconds, whose figures say nothing about a real model. llama-cpp-python is
optional (that half is skipped, and the JSON says so, without it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "adapter_export.json"
PROMPTS = [
    "The capital of France is",
    "Photosynthesis turns light, water and carbon dioxide into",
    "def fibonacci(n):\n    if n < 2:",
    "A quantized model keeps its weights in few bits, so",
]
TINY_DATA = [("What is two plus two?", "Four."), ("Name a colour.", "Blue."), ("Say hello.", "Hello there!"),
             ("What do bees make?", "Honey.")]


def build_tiny(work: Path) -> Path:
    """A tiny pipeline folder (``quantized/``, ``adapter/``, ``merged/``) under ``work``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_llama, tiny_tokenizer

    from qalora.checkpoint import save_checkpoint
    from qalora.config import LoraConfig, QuantConfig, TrainConfig
    from qalora.merging.command import merge
    from qalora.quant.model import quantize_model
    from qalora.training.loop import train

    run = work / "tiny"
    run.mkdir()
    model = tiny_llama(0)
    quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(model, tiny_tokenizer(), run / "quantized", {"bits": 4, "group_size": 32, "method": "rtn",
                                                                 "source_model": "tiny"})
    data = run / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{q} (#{i})", "input": "", "output": a}) + "\n"
                            for i, (q, a) in enumerate(TINY_DATA * 4)))
    cfg = TrainConfig(steps=8, data=str(data), batch_size=4, lr=1e-2, max_seq_len=64, eval_every=8, save_every=8,
                      eval_batches=1)
    train(run / "quantized", run / "adapter", cfg, LoraConfig(rank=4, alpha=8), progress=False)
    merge(run / "quantized", run / "adapter", run / "merged", progress=False)
    return run


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    """|Δlogit| and top-1 agreement of two ``[positions, vocab]`` logit arrays."""
    d = np.abs(got - want)
    return {"positions": int(got.shape[0]), "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "top1": float((got.argmax(-1) == want.argmax(-1)).mean())}


def pooled(rows: list[dict]) -> dict:
    """The per-prompt ``compare`` rows pooled over all positions."""
    n = sum(r["positions"] for r in rows)
    return {"positions": n, "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "mean_abs_diff": sum(r["mean_abs_diff"] * r["positions"] for r in rows) / n,
            "top1": sum(r["top1"] * r["positions"] for r in rows) / n}


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int, pad: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad)
    return out[0, len(ids):].tolist()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int, margins: list | None = None) -> list[int]:
    """``n`` greedy tokens; ``margins`` (if given) receives each step's top-1 minus top-2 logit."""
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(n):
        scores = np.asarray(llm.scores[llm.n_tokens - 1])
        top2 = np.sort(scores)[-2:]
        if margins is not None:
            margins.append(float(top2[1] - top2[0]))
        new.append(int(np.argmax(scores)))
        llm.eval([new[-1]])
    return new


def first_divergence_margins(a: list[list[int]], b: list[list[int]], margins: list[list[float]]) -> list[float]:
    """For each prompt whose continuations part, ``b``'s top-1 minus top-2 logit where they part."""
    out = []
    for x, y, m in zip(a, b, margins):
        i = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if i is not None:
            out.append(round(m[i], 4))
    return out


def greedy_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Prompts whose continuations are identical, and the mean share of tokens before they part."""
    same = [x == y for x, y in zip(a, b)]
    prefix = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) / len(x) for x, y in zip(a, b)]
    return {"prompts_identical": sum(same), "prompts": len(same), "mean_shared_prefix": sum(prefix) / len(prefix)}


def export_all(run: Path, work: Path, pre_tokenizer: str | None) -> dict:
    from qalora.export.gguf import export_gguf
    from qalora.export.gguf_lora import export_gguf_lora
    from qalora.export.peft import export_peft

    t = time.time()
    peft = export_peft(run / "adapter", work / "peft", base_out=work / "base", progress=False)
    lora = export_gguf_lora(run / "adapter", work / "adapter.gguf", progress=False)
    for name, src in (("base.gguf", "quantized"), ("merged.gguf", "merged")):
        export_gguf(run / src, work / name, pre_tokenizer=pre_tokenizer, progress=False)
    return {"peft_bytes": peft["folder_bytes"], "dense_base_bytes": peft["base"]["folder_bytes"],
            "gguf_lora_bytes": lora["file_bytes"], "seconds": round(time.time() - t, 1)}


def check_peft(run: Path, work: Path, tok, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from qalora.checkpoint import load
    from qalora.quiet import quiet_imports

    with quiet_imports():
        from peft import PeftModel
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), work / "peft").eval()
    merged = load(run / "merged", kernel="dense")
    rows, a, b = [], [], []
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        rows.append(compare(hf_logits(served, ids), hf_logits(merged, ids)))
        a.append(hf_greedy(served, ids, new_tokens, pad))
        b.append(hf_greedy(merged, ids, new_tokens, pad))
    return {**pooled(rows), "greedy": greedy_agreement(a, b)}


def nudge_offsets(src: Path, dst: Path, seed: int = 0) -> int:
    """Copy the GGUF ``src`` to ``dst`` with every Q4_1 block's ``m`` (bytes 2-3, fp16) moved by
    one fp16 ulp, away from or towards zero at random (seeded); ``d`` and the codes unchanged.
    The copy equals the original to fp16 storage precision: two such files are as different as
    ``fp16(m + Δ)`` and ``fp16(m) + Δ`` can be. Returns the number of offsets moved (zeros kept)."""
    import shutil

    from gguf import GGUFReader, GGMLQuantizationType

    shutil.copyfile(src, dst)
    reader = GGUFReader(dst, "r+")
    rng = np.random.default_rng(seed)
    moved = 0
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        blocks = t.data.reshape(-1, 20)                     # a writable view of the file
        bits = blocks[:, 2:4].copy().view(np.uint16)[:, 0]
        step = rng.choice(np.array([-1, 1], dtype=np.int32), size=bits.shape[0])
        keep = (bits & 0x7FFF) == 0                         # ±0: a one-ulp step would change its sign
        new = np.where(keep, bits, (bits.astype(np.int32) + step).astype(np.uint16))
        blocks[:, 2:4] = new.view(np.uint8).reshape(-1, 2)
        moved += int((~keep).sum())
    reader.data.flush()
    return moved


def check_llama_cpp(run: Path, work: Path, tok, new_tokens: int, threads: int) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed"}
    from qalora.checkpoint import load

    def llm(path, lora=None):
        return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True,
                     verbose=False, n_threads=threads)

    moved = nudge_offsets(work / "merged.gguf", work / "merged-nudged.gguf")
    served, merged = llm(work / "base.gguf", work / "adapter.gguf"), llm(work / "merged.gguf")
    nudged = llm(work / "merged-nudged.gguf")
    ours = load(run / "merged", kernel="dense")
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    rows, floor, ulp, a, b, c, d, margins = [], [], [], [], [], [], [], []
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        m = llama_logits(merged, ids)
        rows.append(compare(llama_logits(served, ids), m))
        floor.append(compare(m, hf_logits(ours, ids)))
        ulp.append(compare(llama_logits(nudged, ids), m))
        a.append(llama_greedy(served, ids, new_tokens))
        margins.append([])
        b.append(llama_greedy(merged, ids, new_tokens, margins[-1]))
        c.append(hf_greedy(ours, ids, new_tokens, pad))
        d.append(llama_greedy(nudged, ids, new_tokens))
    greedy = {**greedy_agreement(a, b), "first_divergence_margins": first_divergence_margins(a, b, margins)}
    # the anchors: how well llama.cpp's merged GGUF reproduces qalora's own fp32 greedy output, and
    # how well it reproduces itself with its offsets one fp16 ulp away (the same model to fp16 storage)
    return {**pooled(rows), "greedy": greedy,
            "floor_merged_gguf_vs_qalora_fp32": {**pooled(floor), "greedy": greedy_agreement(b, c)},
            "floor_merged_gguf_vs_one_ulp_offsets": {**pooled(ulp), "greedy": greedy_agreement(d, b),
                                                     "offsets_moved": moved}}


def table(result: dict) -> str:
    header = (f"{'served unmerged vs merged':<40} {'positions':>9} {'top-1':>6} {'mean|d|':>9} {'max|d|':>9} "
              f"{'greedy same':>11}")
    lines = [header]
    for label, key in (("PEFT over dense base (fp32)", "peft"), ("llama.cpp base GGUF + LoRA GGUF", "llama_cpp")):
        r = result[key]
        if "skipped" in r:
            lines.append(f"{label:<40} skipped: {r['skipped']}")
            continue
        g = r["greedy"]
        lines.append(f"{label:<40} {r['positions']:>9} {r['top1']:>6.3f} {r['mean_abs_diff']:>9.2e} "
                     f"{r['max_abs_diff']:>9.2e} {g['prompts_identical']:>5}/{g['prompts']:<5}")
    for label, key in (("  floor: merged GGUF vs qalora fp32", "floor_merged_gguf_vs_qalora_fp32"),
                       ("  floor: merged GGUF, m one fp16 ulp off", "floor_merged_gguf_vs_one_ulp_offsets")):
        f = result["llama_cpp"].get(key)
        if f:
            g = f.get("greedy") or {}
            lines.append(f"{label:<40} {f['positions']:>9} {f['top1']:>6.3f} {f['mean_abs_diff']:>9.2e} "
                         f"{f['max_abs_diff']:>9.2e} {g.get('prompts_identical', '-'):>5}/{g.get('prompts', '-'):<5}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="a qalora pipeline --out folder (quantized/, adapter/, merged/)")
    src.add_argument("--tiny", action="store_true", help="build a tiny random-weight pipeline in --work and check it")
    p.add_argument("--work", default=None, help="new or empty folder for the exports (default: a temporary one)")
    p.add_argument("--out", default=None, help=f"JSON results (default: {RESULTS.relative_to(ROOT)}; with --tiny, "
                                               "WORK/adapter_export_tiny.json)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pre-tokenizer", default=None, help="llama.cpp pre-tokenizer for the GGUFs (default: the "
                                                        "exporter's choice)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="adapter-export-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        sys.exit(f"--work {str(work)!r} is not empty")
    run = build_tiny(work) if args.tiny else Path(args.pipeline)
    out = Path(args.out) if args.out else (work / "adapter_export_tiny.json" if args.tiny else RESULTS)
    pre = args.pre_tokenizer

    from qalora.models import load_tokenizer

    tok = load_tokenizer(run / "merged")
    exports = export_all(run, work, pre)
    result = {"pipeline": str(run), "work": str(work), "tiny": args.tiny, "prompts": PROMPTS,
              "new_tokens": args.new_tokens, "exports": exports,
              "peft": check_peft(run, work, tok, args.new_tokens),
              "llama_cpp": check_llama_cpp(run, work, tok, args.new_tokens, args.threads)}
    print(table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
