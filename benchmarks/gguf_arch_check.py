"""Run the GGUF export of every architecture it writes in llama.cpp, against qalora and an anchor.

Needs ``pip install llama-cpp-python`` (0.3.36 here; not a project dependency)::

    python benchmarks/gguf_arch_check.py                       # hidden 256, 4 layers, INT4 and INT3 g32

For each of Qwen2, Qwen3, Mistral and Llama: a random model built from its transformers config
(hidden 256, 4 layers, 8 heads / 4 KV heads, MLP 512; Qwen2 with q/k/v biases, Qwen3 with
``head_dim`` 64 != 256 / 8 and q/k norms, Qwen3 and Llama with tied embeddings) and a byte-level
BPE trained in memory (at most 1,000 tokens; ~510 are learnt from this text; Qwen's pre-tokenizer
for the Qwen models, GPT-2's for the others), quantized with RTN at INT4 and INT3 g32 (``lm_head``
left in fp32), exported with ``export_gguf`` (Q4_1; llama.cpp's ``llama`` architecture for
Mistral and Llama, ``qwen2``, ``qwen3``) and, unquantized, with ``export_float_gguf`` (F32). On
the two passages of ``gguf_llamacpp.py``:

- llama.cpp on the Q4_1 file vs qalora's fp32 logits of the same checkpoint (dense kernel):
  max |Δlogit|, relative error ``||Δ|| / ||qalora||`` over all positions and logits, top-1 agreement;
- the anchor: llama.cpp on the F32 file vs transformers fp32 on the unquantized model, the same
  figures: what llama.cpp's own arithmetic (F16 K/V cache, kernel order) costs without quantization;
- for scale, the quantization's own effect: qalora's quantized logits vs the unquantized model's.

llama.cpp multiplies Q4_1 weights with activations quantized to 8 bits and keeps d, m, the
embeddings and an untied output matrix in fp16, so the first figure sits well above the anchor and
well below the quantization's effect. Prints a table and writes ``benchmarks/results/gguf_arch.json``.
Every model is exported with the exporter's own pre-tokenizer choice (``qwen2`` for the Qwen
tokenizer, ``gpt-2`` for the GPT-2 style one).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gguf_llamacpp import TEXTS  # the two held-out passages of the Llama GGUF check

KINDS = ("qwen2", "qwen3", "mistral", "llama")
TRAIN_TEXT = [*TEXTS, "Numbers like 2024, 3.14 and 1,000 appear; WE'RE told it's (mostly) fine: call(twice).",
              "A quantized model keeps its weights in few bits; low rank adapters learn a small update."]


def tokenizer(qwen: bool, vocab_size: int = 1000):
    """A byte-level BPE trained in memory on ``TRAIN_TEXT``: Qwen2's pre-tokenizer (its split regex,
    then ByteLevel without a regex) or GPT-2's (ByteLevel with its regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qalora.export.gguf import QWEN2_SPLIT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]) if qwen else \
        pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = "<|endoftext|>" if qwen else "<eos>"
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special, pad_token=special)


def random_model(kind: str, hidden: int, layers: int, vocab: int, seed: int = 0):
    """Random weights N(0, 0.64 / sqrt(hidden)) (logits of std ~0.6), biases N(0, 0.3), norms N(1, 0.2)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024, "eos_token_id": 0,
              "pad_token_id": 0, "bos_token_id": 0, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    config, cls, extra = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"tie_word_embeddings": False}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 64, "tie_word_embeddings": True}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"head_dim": hidden // 8, "sliding_window": None,
                                                              "tie_word_embeddings": False}),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"head_dim": hidden // 8, "tie_word_embeddings": True}),
    }[kind]
    model = cls(config(**common, **extra)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.64 / hidden**0.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.3)
            else:
                p.normal_(1.0, 0.2)
    return model


def llama_cpp_run(path: Path, ids: list[list[int]], texts: list[str], threads: int) -> tuple[list[torch.Tensor], bool]:
    """llama.cpp's logits ``[len(s), vocab]`` for each sequence, and whether it tokenizes ``texts`` as ``ids``."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=threads, verbose=False)
    out, same = [], True
    for seq, text in zip(ids, texts):
        same &= llm.tokenize(text.encode(), add_bos=False, special=True) == seq
        llm.reset()
        llm.eval(seq)
        out.append(torch.tensor(np.array(llm.scores[: len(seq)]), dtype=torch.float32))
    del llm
    return out, same


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """``a`` against the reference ``b`` over all passages, positions and logits."""
    a, b = torch.cat(a).double(), torch.cat(b).double()
    d = (a - b).abs()
    return {"positions": a.shape[0], "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "rel_error": float((a - b).norm() / b.norm()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).double().mean())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads")
    p.add_argument("--work", default=None, help="folder for the models and files (default: a temporary one)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_arch.json"))
    args = p.parse_args()
    import gguf
    import llama_cpp
    import transformers

    from qalora.checkpoint import load, save_checkpoint
    from qalora.config import QuantConfig
    from qalora.export.gguf import export_float_gguf, export_gguf
    from qalora.quant.model import quantize_model

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="gguf_arch-"))
    work.mkdir(parents=True, exist_ok=True)
    toks = {True: tokenizer(qwen=True), False: tokenizer(qwen=False)}
    rows = []
    for kind in KINDS:
        qwen = kind.startswith("qwen")
        tok, pre = toks[qwen], None
        model = random_model(kind, args.hidden, args.layers, len(tok))
        fp = work / f"fp-{kind}"
        model.save_pretrained(fp)
        tok.save_pretrained(fp)
        ids = [tok(text)["input_ids"] for text in TEXTS]
        with torch.no_grad():
            hf = [model(torch.tensor([s])).logits[0] for s in ids]
        export_float_gguf(fp, work / f"fp-{kind}.gguf", pre_tokenizer=pre)
        anchor_logits, anchor_tokens = llama_cpp_run(work / f"fp-{kind}.gguf", ids, TEXTS, args.threads)
        anchor = compare(anchor_logits, hf)
        for bits in args.bits:
            t = time.perf_counter()
            ckpt = work / f"{kind}-int{bits}"
            quantized = copy.deepcopy(model)
            quantize_model(quantized, QuantConfig(bits=bits, group_size=32, method="rtn"), progress=False)
            save_checkpoint(quantized, tok, ckpt, {"source_model": f"random {kind}"})
            report = export_gguf(ckpt, ckpt.with_suffix(".gguf"), pre_tokenizer=pre, progress=False)
            with torch.no_grad():
                ref = load(ckpt, kernel="dense")
                ours = [ref(torch.tensor([s])).logits[0] for s in ids]
            logits, same_tokens = llama_cpp_run(ckpt.with_suffix(".gguf"), ids, TEXTS, args.threads)
            rows.append({"model_type": kind, "arch": report["metadata"]["architecture"], "bits": bits,
                         "pre_tokenizer": report["tokenizer"]["pre"], "same_tokens": same_tokens and anchor_tokens,
                         "gguf_bytes": report["file_bytes"], "tensor_types": report["tensor_types"],
                         "llama_cpp_vs_qalora": compare(logits, ours), "anchor_llama_cpp_vs_transformers": anchor,
                         "quantization_vs_fp": compare(ours, hf), "seconds": round(time.perf_counter() - t, 2)})

    print(f"random models, hidden {args.hidden}, {args.layers} layers, "
          f"vocabulary {len(toks[True])}/{len(toks[False])}, "
          f"RTN g32; {rows[0]['llama_cpp_vs_qalora']['positions']} positions; llama-cpp-python {llama_cpp.__version__}")
    print(f"{'model':<8} {'arch':<6} {'bits':>4} {'max|Δ|':>8} {'rel err':>9} {'top-1':>7} {'anchor rel':>11} "
          f"{'anchor max|Δ|':>13} {'quant rel':>10} {'tokens =':>8}")
    for r in rows:
        q, a = r["llama_cpp_vs_qalora"], r["anchor_llama_cpp_vs_transformers"]
        print(f"{r['model_type']:<8} {r['arch']:<6} {r['bits']:>4} {q['max_abs_diff']:>8.4f} {q['rel_error']:>9.2e} "
              f"{100 * q['top1']:>6.1f}% {a['rel_error']:>11.2e} {a['max_abs_diff']:>13.2e} "
              f"{r['quantization_vs_fp']['rel_error']:>10.3f} {r['same_tokens']!s:>8}")
    result = {"config": {"hidden": args.hidden, "layers": args.layers, "heads": 8, "kv_heads": 4, "group_size": 32,
                         "method": "rtn", "texts": "gguf_llamacpp.TEXTS", "threads": args.threads,
                         "vocab": {"qwen": len(toks[True]), "gpt2": len(toks[False])},
                         "pre_tokenizer_note": "GPT-2 style tokenizers exported with pre_tokenizer='gpt-2'"},
              "rows": rows, "versions": {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                                         "transformers": transformers.__version__,
                                         "gguf": getattr(gguf, "__version__", "0.19")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
