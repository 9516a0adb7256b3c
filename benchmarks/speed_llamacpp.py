"""llama.cpp rows of ``speed.py``: one GGUF model through llama.cpp's C API (llama-cpp-python's
ctypes bindings), prefill and batched greedy decode with the same token ids as the other rows."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

from speed_common import INSTALL, Settings, peak_rss_mb, require
from speed_hf import prefill_ids, prompt_ids


class _LlamaCpp:
    """One GGUF model through llama.cpp's C API (llama-cpp-python's ctypes bindings): contexts
    holding ``n_seq`` sequences, batched ``llama_decode`` and greedy argmax on the logits."""

    def __init__(self, path: str, threads: int):
        require("llama_cpp", "llama-cpp-python", INSTALL["llama_cpp"])
        import llama_cpp as L

        self.L, self.threads = L, threads
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    @contextmanager
    def context(self, n_seq: int, tokens_per_seq: int, n_batch: int):
        L = self.L
        cp = L.llama_context_default_params()
        per_seq = 256 * -(-tokens_per_seq // 256)  # each sequence gets n_ctx / n_seq cells
        cp.n_ctx, cp.n_seq_max = n_seq * per_seq, n_seq
        cp.n_batch, cp.n_ubatch = n_batch, min(n_batch, 512)
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.no_perf = True
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        batch = L.llama_batch_init(n_batch, 0, 1)
        try:
            yield ctx, batch
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)

    def clear(self, ctx) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(ctx), True)

    def decode(self, ctx, batch, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, wants logits)`` entries."""
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = out
        batch.n_tokens = len(entries)
        rc = self.L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(entries)} tokens")

    def argmax(self, ctx, i: int) -> int:
        import numpy as np

        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())

    def greedy(self, ctx, batch, prompt: list[int], n_seq: int, new: int) -> list[int]:
        """``new`` greedy tokens for each of ``n_seq`` copies of ``prompt`` (as ``generate``: one
        prompt pass, then ``new - 1`` one-token passes); returns sequence 0's tokens."""
        self.clear(ctx)
        t = len(prompt)
        self.decode(ctx, batch, [(tok, p, s, p == t - 1) for s in range(n_seq) for p, tok in enumerate(prompt)])
        rows, pos, first = [(s + 1) * t - 1 for s in range(n_seq)], t, []
        for k in range(new):
            toks = [self.argmax(ctx, i) for i in rows]
            first.append(toks[0])
            if k == new - 1:
                break
            self.decode(ctx, batch, [(toks[s], pos, s, True) for s in range(n_seq)])
            rows, pos = list(range(n_seq)), pos + 1
        return first


def decode_llamacpp(spec: dict, s: Settings) -> dict:
    from qalora.models import load_tokenizer

    t0 = time.perf_counter()
    llm = _LlamaCpp(spec["gguf"], s.threads)
    tok = load_tokenizer(spec["tokenizer"])
    ids, vocab = prompt_ids(tok)
    prompt, pre = ids[0].tolist(), prefill_ids(vocab, s.prefill_tokens)[0].tolist()
    load_s, rss_load = time.perf_counter() - t0, peak_rss_mb()
    out = {"prompt_tokens": len(prompt), "gguf": spec["gguf"], "source": spec.get("source"), "load_s": load_s,
           "peak_rss_after_load_mb": rss_load}
    n = len(pre)
    with llm.context(1, n + 1, n) as (ctx, batch):
        times = []
        for i in range(s.reps + 1):  # the first is the warm-up
            llm.clear(ctx)
            t = time.perf_counter()
            llm.decode(ctx, batch, [(tok_, p, 0, p == n - 1) for p, tok_ in enumerate(pre)])
            llm.argmax(ctx, n - 1)
            if i:
                times.append(time.perf_counter() - t)
        out["prefill_tok_s"] = n / statistics.median(times)
    for b in s.decode_batches:
        with llm.context(b, len(prompt) + s.new_tokens + 1, max(b * len(prompt), b)) as (ctx, batch):
            llm.greedy(ctx, batch, prompt, b, 4)  # warm-up
            times = []
            for _ in range(s.reps):
                t = time.perf_counter()
                gen = llm.greedy(ctx, batch, prompt, b, s.new_tokens)
                times.append(time.perf_counter() - t)
            out[f"decode_b{b}_tok_s"] = b * s.new_tokens / statistics.median(times)
            if b == 1:
                out["tokens"] = gen
    llm.L.llama_model_free(llm.model)
    return out


