"""Training-step time, decode / prefill speed and GPTQ time of qalora against PEFT, bitsandbytes,
transformers and llama.cpp: one command, every system in its own process, the same settings.

    python benchmarks/speed.py [--quick] [--work DIR] [--pipeline DIR] [--only NAME ...] [--out FILE]

Each row runs as ``python benchmarks/speed.py _worker NAME SPEC`` (a child of ``sys.executable``):
the child loads its system, measures, reads its own peak RSS with
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and prints one JSON line, so the memory is that
system's alone. Every child runs with 2 threads (``torch.set_num_threads``, ``OMP_NUM_THREADS``,
llama.cpp ``n_threads``/``n_threads_batch``). Ratios are taken only between rows of the same run
(machines of this kind differ, and the CPU may be shared: the load average before and after each
row is recorded beside it).

**Training rows** (``train-*``): one optimizer step on one fixed batch of 4 x 256 random token ids
(``torch.randint`` with seed 0, every position a target), rank 64 on all seven projections, alpha
16, dropout 0, AdamW (lr 2e-4, no weight decay), gradient-norm clip 0.3, fp32 (the defaults of
``qalora.config.LoraConfig`` / ``TrainConfig``). Reported: the median of ``steps`` timed steps after
``warmup`` untimed ones, and the child's peak RSS. A step is, for every row alike: the loss of
``qalora.training.loop._token_loss_sum`` (the trainer's own function: logits only at the 255
scored positions, summed cross entropy) divided by the 1,020 target tokens, ``backward()``, clip,
AdamW step, gradients cleared. For the qalora rows the base, the adapters and the optimizer are the
trainer's own (``load_base``, ``add_adapters``, ``Optimizers.clip`` / ``.step``), so the timed work
is the body of ``qalora.training.loop.train``'s step loop without its data loading (the batch is
already built), per-micro-batch RNG forking and logging: the same forward + backward + optimizer
step on the same tokens as the PEFT rows, which use ``torch.optim.AdamW`` +
``clip_grad_norm_`` on PEFT's trainable parameters. (Timing ``qalora.train`` and reading
``metrics.jsonl`` would time instruction batches whose loss covers only the responses, a smaller
head matmul than the PEFT loop's: not the same work.)

- ``train-qalora``: qalora QA-LoRA on an INT4 g32 RTN checkpoint of the embedded SmolLM2 (fp32
  compute: one layer dequantized just in time + fp32 GEMM, as ``qalora train`` does).
- ``train-qalora-qlora``: qalora's QLoRA baseline (``--method qlora``: its own NF4, block 64).
- ``train-peft-lora``: PEFT LoRA on the fp32 model.
- ``train-peft-bnb``: PEFT + bitsandbytes NF4 QLoRA (block 64, fp32 compute; no double
  quantization; no ``prepare_model_for_kbit_training``, whose casts are no-ops in fp32 and which
  would switch gradient checkpointing on): **the reference of the training ratios**.
- ``train-peft-bnb-gc``: the same with gradient checkpointing (non-reentrant, as qalora's).

**Decode rows** (``decode-*``): prefill tokens/s (one forward over a 512-token prompt of random ids,
building the KV cache, last position's logits only; median of ``reps``), and greedy decode tokens/s
at batch 1 and batch 8 (``new_tokens`` generated per sequence / wall time of the whole generation,
the chat-templated ``qalora.stages.pipeline.SPEED_PROMPT`` as prompt, replicated 8 times at batch
8; a short warm-up generation first, as ``pipeline.decode_tokens_per_s``; median of ``reps``). The
HF rows call ``model.generate(do_sample=False, min_new_tokens=max_new_tokens=N)``; llama.cpp runs
the same token ids through its C API (``llama_decode`` on one batch holding every sequence, argmax
of the logits: the same greedy loop, no sampler). **Ratios are tokens/s against the llama.cpp row
of the same bits** (INT4 for the rows without qalora bits).

- ``decode-qalora-int4`` / ``-int3``: ``qalora.load(path, kernel="auto")`` on the merged INT4 /
  INT3 g32 model: the ``--pipeline`` folder's ``merged/`` for the bits it holds, otherwise an RTN
  checkpoint of the embedded model (a merged QA-LoRA model is a checkpoint of the same format and
  shapes, so it computes the same way at the same speed).
- ``decode-qalora-unmerged``: ``qalora.adapters.format.load_adapted`` (the pipeline's quantized
  base + adapter, or the INT4 RTN base + a QA-LoRA adapter trained for one step), kernel auto,
  the adapters computed beside the base in every layer.
- ``decode-peft-bnb``: PEFT + bitsandbytes NF4 (fp32 compute) with a rank-64 LoRA on all seven
  projections, unmerged (QLoRA's deployment without a merge).
- ``decode-hf-bf16``: transformers on the unquantized model in bf16.
- ``decode-llamacpp-int4`` / ``-int3``: llama.cpp (llama-cpp-python) on the GGUF that
  ``qalora.export.gguf.export_gguf`` writes from the same INT4 / INT3 model (the pipeline's
  ``model.gguf`` when it is of that model).

**GPTQ row** (``gptq-layer``): seconds per decoder layer of ``qalora.quant.model.quantize_gptq``
(INT4 g32, true-sequential, the ``QuantConfig`` defaults) on the embedded model cut to its first
``gptq_layers`` decoder layers: the whole call is timed, the capture of the calibration
activations entering layer 0 (timed separately, once) is subtracted, and the rest is divided by
the layers. Calibration: ``QuantConfig.calib_samples`` x ``calib_seq_len`` tokens (fewer samples
under ``--quick``; the row records how many).

A row whose library cannot be imported (bitsandbytes, PEFT, llama-cpp-python) is reported
``skipped: <library> not installed``, never dropped; a row that fails is reported with its error.
``--quick`` (a few minutes): 2 timed training steps, 32 new tokens, 1 repetition, no batch 8,
1 GPTQ layer on 16 calibration sequences. Models built for the rows (INT4 / INT3 RTN checkpoints,
the one-step adapter, GGUF files) are cached in ``--work`` and reused. Prints one table and writes
``benchmarks/results/speed.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "speed.json"
RESULT_TAG = "SPEED_RESULT "
THREADS = 2
INSTALL = {"bitsandbytes": "pip install --no-deps bitsandbytes==0.50.0", "peft": "pip install peft==0.21.0",
           "llama_cpp": "pip install llama-cpp-python==0.3.36 (builds llama.cpp, ~12 min on 2 cores)"}


# ----------------------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row runs with (the batch, rank, alpha and optimizer come from qalora's config
    defaults, read in the child: ``LoraConfig()`` and ``TrainConfig()``)."""

    threads: int = THREADS
    warmup: int = 1            # untimed training steps
    steps: int = 5             # timed training steps (median)
    new_tokens: int = 128      # greedy tokens per sequence
    decode_batches: tuple[int, ...] = (1, 8)
    prefill_tokens: int = 512
    reps: int = 3              # timed repetitions of each prefill / generation (median)
    gptq_layers: int = 3
    gptq_samples: int | None = None  # None: QuantConfig.calib_samples

    @classmethod
    def quick(cls) -> Settings:
        return cls(steps=2, new_tokens=32, decode_batches=(1,), reps=1, gptq_layers=1, gptq_samples=16)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    group: str          # train | decode | gptq
    label: str
    bits: int | None = None  # decode: the llama.cpp row of these bits is the reference


ROWS = [
    Row("train-qalora", "train", "qalora QA-LoRA, INT4 g32"),
    Row("train-qalora-qlora", "train", "qalora QLoRA (own NF4)"),
    Row("train-peft-lora", "train", "PEFT LoRA, fp32"),
    Row("train-peft-bnb", "train", "PEFT + bnb NF4 QLoRA"),
    Row("train-peft-bnb-gc", "train", "PEFT + bnb NF4 QLoRA + grad ckpt"),
    Row("decode-qalora-int4", "decode", "qalora merged INT4", 4),
    Row("decode-qalora-int3", "decode", "qalora merged INT3", 3),
    Row("decode-qalora-unmerged", "decode", "qalora unmerged (base + adapter)"),
    Row("decode-peft-bnb", "decode", "PEFT + bnb NF4, unmerged", 4),
    Row("decode-hf-bf16", "decode", "transformers bf16", 4),
    Row("decode-llamacpp-int4", "decode", "llama.cpp INT4 GGUF", 4),
    Row("decode-llamacpp-int3", "decode", "llama.cpp INT3 GGUF", 3),
    Row("gptq-layer", "gptq", "qalora GPTQ INT4 g32"),
]
BY_NAME = {r.name: r for r in ROWS}
TRAIN_REFERENCE = "train-peft-bnb"


# ------------------------------------------------------------------------------ child: measurements

class Skip(Exception):
    """The row's library cannot be imported: reported as skipped."""


def _require(module: str, what: str, install: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{what} not installed ({str(e).splitlines()[0]}; {install})") from None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _train_batch(vocab: int, batch_size: int, seq_len: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)  # [B, T]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _timed_steps(model, step_fn, batch: dict, s: Settings) -> dict:
    """``warmup`` + ``steps`` steps on ``batch``, each: the trainer's token-summed cross entropy over
    every target / the number of targets, ``backward()``, then ``step_fn()`` (clip + optimizer step
    + gradients cleared). Times the timed steps; keeps every step's loss."""
    from qalora.training.loop import _token_loss_sum

    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    times, losses = [], []
    for i in range(s.warmup + s.steps):
        t0 = time.perf_counter()
        loss = _token_loss_sum(model, batch, nullcontext) / n_targets
        loss.backward()
        step_fn()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i >= s.warmup:
            times.append(dt)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite training loss: {losses}")
    return {"s_per_step": statistics.median(times), "step_times": times, "losses": losses,
            "target_tokens": n_targets, "input_tokens": int(batch["attention_mask"].sum())}


def _train_qalora(method: str, model_path: str, s: Settings) -> dict:
    import torch

    from qalora.adapters.attach import add_adapters, trainable_parameters
    from qalora.adapters.base import load_base
    from qalora.config import LoraConfig, TrainConfig
    from qalora.training.optim import Optimizers

    lora, cfg = LoraConfig(), TrainConfig(method=method, steps=s.warmup + s.steps)
    t0 = time.perf_counter()
    base = load_base(method, model_path, cfg.compute_dtype)
    net = base.model
    torch.manual_seed(cfg.seed)
    add_adapters(net, method, lora)
    optim = Optimizers(net, cfg)
    load_s, rss_load = time.perf_counter() - t0, _peak_rss_mb()
    batch = _train_batch(net.config.vocab_size, cfg.batch_size, cfg.max_seq_len)

    def step():
        optim.clip(cfg.max_grad_norm)
        optim.step()

    out = _timed_steps(net, step, batch, s)
    return {**out, "trainable_parameters": trainable_parameters(net), "load_s": load_s,
            "peak_rss_after_load_mb": rss_load, "base": model_path, "rank": lora.rank, "alpha": lora.alpha}


def _bnb_model(dtype_name: str = "float32"):
    """The embedded model loaded by transformers with bitsandbytes NF4 (block 64, compute in
    ``dtype_name``), every decoder linear quantized (lm_head kept, as transformers does)."""
    _require("bitsandbytes", "bitsandbytes", INSTALL["bitsandbytes"])
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qalora.default_model import resolve_model

    dtype = getattr(torch, dtype_name)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                           bnb_4bit_use_double_quant=False)
    return AutoModelForCausalLM.from_pretrained(str(resolve_model("default")), quantization_config=q, dtype=dtype,
                                                device_map={"": "cpu"})


def _peft_wrap(model):
    """PEFT LoRA with qalora's adapter defaults (rank, alpha, dropout, targets), seeded."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from qalora.config import LoraConfig

    lora = LoraConfig()
    torch.manual_seed(0)
    cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _train_peft(bnb: bool, grad_ckpt: bool, s: Settings) -> dict:
    _require("peft", "PEFT", INSTALL["peft"])
    import torch

    from qalora.config import TrainConfig
    from qalora.models import load_fp_model

    cfg = TrainConfig(method="lora")
    t0 = time.perf_counter()
    model = _bnb_model() if bnb else load_fp_model("default")[0]
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = _peft_wrap(model)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    load_s, rss_load = time.perf_counter() - t0, _peak_rss_mb()
    batch = _train_batch(model.config.vocab_size, cfg.batch_size, cfg.max_seq_len)

    def step():
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = _timed_steps(pm, step, batch, s)
    return {**out, "trainable_parameters": sum(p.numel() for p in params), "load_s": load_s,
            "peak_rss_after_load_mb": rss_load, "gradient_checkpointing": grad_ckpt}


def _prompt_ids(tok):
    """``([1, T]`` chat-templated speed prompt (the pipeline's), vocabulary size``)."""
    from qalora.stages.pipeline import SPEED_PROMPT

    ids = tok.apply_chat_template([{"role": "user", "content": SPEED_PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    return ids, len(tok)


def _prefill_ids(vocab: int, n: int):
    import torch

    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))  # [1, P]


def _hf_speed(model, tok, s: Settings) -> dict:
    """Prefill and greedy decode speed of a transformers-style model (see the module docstring)."""
    import torch

    ids, vocab = _prompt_ids(tok)
    pre = _prefill_ids(vocab, s.prefill_tokens)
    out = {"prompt_tokens": int(ids.shape[1])}
    with torch.inference_mode():
        model(input_ids=pre, use_cache=True, logits_to_keep=1)  # warm-up (kernel preparation)
        times = []
        for _ in range(s.reps):
            t0 = time.perf_counter()
            model(input_ids=pre, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
        out["prefill_tok_s"] = s.prefill_tokens / statistics.median(times)
        for b in s.decode_batches:
            x = ids.repeat(b, 1)                                                # [b, T]
            opts = {"attention_mask": torch.ones_like(x), "do_sample": False, "pad_token_id": tok.eos_token_id}
            model.generate(x, max_new_tokens=4, min_new_tokens=4, **opts)       # warm-up
            times = []
            for _ in range(s.reps):
                t0 = time.perf_counter()
                gen = model.generate(x, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, **opts)
                times.append(time.perf_counter() - t0)
            out[f"decode_b{b}_tok_s"] = b * s.new_tokens / statistics.median(times)
            if b == 1:
                out["tokens"] = gen[0, ids.shape[1]:].tolist()
    return out


def _decode_hf(row: str, spec: dict, s: Settings) -> dict:
    import torch

    from qalora.models import load_tokenizer
    from qalora.patch import set_kernel

    t0 = time.perf_counter()
    if row in ("decode-qalora-int4", "decode-qalora-int3"):
        import qalora

        model, tok = qalora.load(spec["model"], kernel="auto"), load_tokenizer(spec["model"])
    elif row == "decode-qalora-unmerged":
        from qalora.adapters.format import load_adapted

        model, tok, _ = load_adapted(spec["model"], spec["adapter"])
        set_kernel(model, "auto")
    elif row == "decode-peft-bnb":
        _require("peft", "PEFT", INSTALL["peft"])
        from qalora.default_model import resolve_model

        model, tok = _peft_wrap(_bnb_model()), load_tokenizer(resolve_model("default"))
    elif row == "decode-hf-bf16":
        from qalora.models import load_fp_model

        model, tok, _ = load_fp_model("default", dtype=torch.bfloat16)
    else:
        raise ValueError(row)
    model.eval()
    load_s, rss_load = time.perf_counter() - t0, _peak_rss_mb()
    return {**_hf_speed(model, tok, s), "load_s": load_s, "peak_rss_after_load_mb": rss_load,
            **{k: spec[k] for k in ("model", "adapter", "source") if k in spec}}


class _LlamaCpp:
    """One GGUF model through llama.cpp's C API (llama-cpp-python's ctypes bindings): contexts
    holding ``n_seq`` sequences, batched ``llama_decode`` and greedy argmax on the logits."""

    def __init__(self, path: str, threads: int):
        _require("llama_cpp", "llama-cpp-python", INSTALL["llama_cpp"])
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


def _decode_llamacpp(spec: dict, s: Settings) -> dict:
    from qalora.models import load_tokenizer

    t0 = time.perf_counter()
    llm = _LlamaCpp(spec["gguf"], s.threads)
    tok = load_tokenizer(spec["tokenizer"])
    ids, vocab = _prompt_ids(tok)
    prompt, pre = ids[0].tolist(), _prefill_ids(vocab, s.prefill_tokens)[0].tolist()
    load_s, rss_load = time.perf_counter() - t0, _peak_rss_mb()
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


def _gptq_layer(s: Settings) -> dict:
    import torch

    from qalora.config import QuantConfig
    from qalora.data.text import calibration_batch
    from qalora.models import load_fp_model
    from qalora.patch import decoder_layers
    from qalora.quant.model import capture_layer_inputs, quantize_gptq

    fp, tok, _ = load_fp_model("default")
    cfg = QuantConfig(bits=4, method="gptq", **({"calib_samples": s.gptq_samples} if s.gptq_samples else {}))
    calib = calibration_batch(tok, n_samples=cfg.calib_samples, seq_len=cfg.calib_seq_len, seed=cfg.seed)
    layers = decoder_layers(fp)
    del layers[s.gptq_layers:]                    # the model keeps its first k decoder layers
    fp.config.num_hidden_layers = s.gptq_layers
    with torch.no_grad():
        t0 = time.perf_counter()
        capture_layer_inputs(fp, layers[0], calib, cfg.calib_batch_size, progress=False)
        capture = time.perf_counter() - t0
        t0 = time.perf_counter()
        errors = quantize_gptq(fp, cfg, calib, progress=False)
        total = time.perf_counter() - t0
    return {"s_per_layer": (total - capture) / s.gptq_layers, "total_s": total, "capture_s": capture,
            "layers": s.gptq_layers, "linears": len(errors), "calib_samples": cfg.calib_samples,
            "calib_seq_len": cfg.calib_seq_len, "bits": cfg.bits, "group_size": cfg.group_size,
            "true_sequential": cfg.true_sequential}


# ------------------------------------------------------------------------------ child: builds

def _build(kind: str, spec: dict) -> dict:
    """Write one cached input into ``spec["tmp"]`` (the parent renames it into place)."""
    t0 = time.perf_counter()
    if kind == "quantize":
        import qalora
        from qalora.config import QuantConfig

        qalora.quantize("default", spec["tmp"], QuantConfig(bits=spec["bits"], method="rtn"), progress=False)
    elif kind == "adapter":
        import qalora
        from qalora.config import TrainConfig

        qalora.train(spec["model"], spec["tmp"], TrainConfig(steps=1, eval_every=1, eval_batches=1, save_every=1),
                     progress=False)
    elif kind == "gguf":
        from qalora.export.gguf import export_gguf

        export_gguf(spec["model"], spec["tmp"], progress=False)
    else:
        raise ValueError(kind)
    return {"seconds": time.perf_counter() - t0}


def worker(name: str, spec: dict) -> None:
    """The child: run row (or build) ``name`` and print its result as one JSON line."""
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.pop("settings").items()})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(s.threads)
    sys.path.insert(0, str(ROOT.parent / "src"))
    try:
        if name.startswith("build-"):
            out = _build(name[len("build-"):], spec)
        elif name in ("train-qalora", "train-qalora-qlora"):
            out = _train_qalora("qalora" if name == "train-qalora" else "qlora", spec.get("model", "default"), s)
        elif name.startswith("train-peft"):
            out = _train_peft(bnb="bnb" in name, grad_ckpt=name.endswith("-gc"), s=s)
        elif name.startswith("decode-llamacpp"):
            out = _decode_llamacpp(spec, s)
        elif name.startswith("decode-"):
            out = _decode_hf(name, spec, s)
        elif name == "gptq-layer":
            out = _gptq_layer(s)
        else:
            raise ValueError(f"unknown row {name!r}")
        out = {"status": "ok", **out}
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    out.update(peak_rss_mb=_peak_rss_mb(), threads=torch.get_num_threads())
    print(RESULT_TAG + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------ parent

def run_child(name: str, spec: dict, settings: Settings, timeout: float) -> dict:
    """Run ``name`` in a fresh ``sys.executable``; its JSON line, or the error it died with."""
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    payload = json.dumps({**spec, "settings": dataclasses.asdict(settings)})
    load0, t0 = os.getloadavg()[0], time.time()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_worker", name, payload], env=env,
                           capture_output=True, text=True, timeout=timeout, check=False)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if p.returncode == 0 and lines:
            out = json.loads(lines[-1][len(RESULT_TAG):])
        else:
            tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-3:]
            out = {"status": "failed", "reason": f"exit {p.returncode}: " + " | ".join(tail)}
    except subprocess.TimeoutExpired:
        out = {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    out.update(wall_s=round(time.time() - t0, 1), load_avg_before=load0, load_avg_after=os.getloadavg()[0])
    return out


class Inputs:
    """The models the rows run on, built once into ``work`` (each in its own child) and reused."""

    def __init__(self, work: Path, pipeline: Path | None, settings: Settings, timeout: float):
        self.work, self.pipeline, self.settings, self.timeout = work, pipeline, settings, timeout
        self.builds: dict[str, dict] = {}
        self.pipeline_bits = None
        if pipeline is not None:
            from qalora.checkpoint import read_meta

            for sub in ("quantized", "adapter", "merged"):
                if not (pipeline / sub).is_dir():
                    raise SystemExit(f"--pipeline {str(pipeline)!r} has no {sub}/ folder; pass a qalora pipeline folder")
            self.pipeline_bits = next(iter(read_meta(pipeline / "merged")["layers"].values()))["bits"]

    def _make(self, name: str, path: Path, spec: dict, done) -> Path:
        """``path`` built by the child ``build-<name>`` unless ``done(path)`` already holds."""
        if done(path):
            return path
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        print(f"[speed] building {path} ...", flush=True)
        out = run_child(f"build-{name}", {**spec, "tmp": str(tmp)}, self.settings, self.timeout)
        if out["status"] != "ok":
            raise RuntimeError(f"building {path} failed: {out['reason']}")
        if path.is_dir():
            shutil.rmtree(path)  # an incomplete earlier build
        os.replace(tmp, path)
        self.builds[str(path)] = out
        return path

    def rtn(self, bits: int) -> Path:
        return self._make("quantize", self.work / f"int{bits}-g32-rtn", {"bits": bits},
                          lambda p: (p / "qalora.json").is_file())

    def merged(self, bits: int) -> tuple[Path, str]:
        if self.pipeline_bits == bits:
            return self.pipeline / "merged", f"merged QA-LoRA model of {self.pipeline}"
        return self.rtn(bits), "RTN checkpoint of the embedded model (computes as a merged one)"

    def unmerged(self) -> tuple[Path, Path, str]:
        if self.pipeline is not None:
            return self.pipeline / "quantized", self.pipeline / "adapter", f"quantized base + adapter of {self.pipeline}"
        base = self.rtn(4)
        adapter = self._make("adapter", self.work / "int4-g32-rtn-adapter", {"model": str(base)},
                             lambda p: (p / "adapter_config.json").is_file())
        return base, adapter, "INT4 g32 RTN base + a one-step QA-LoRA adapter"

    def gguf(self, bits: int) -> tuple[Path, str]:
        from qalora.checkpoint import read_meta, weights_sha256

        model, source = self.merged(bits)
        shipped = self.pipeline / "model.gguf" if self.pipeline_bits == bits else None
        if shipped is not None and shipped.is_file():
            return shipped, f"the pipeline's GGUF of {source}"
        sha = weights_sha256(read_meta(model))[:12]
        path = self._make("gguf", self.work / f"int{bits}-{sha}.gguf", {"model": str(model)}, Path.is_file)
        return path, f"export_gguf of {source}"

    def spec(self, row: Row) -> dict:
        if row.name == "train-qalora":
            return {"model": str(self.rtn(4))}
        if row.name in ("decode-qalora-int4", "decode-qalora-int3"):
            model, source = self.merged(row.bits)
            return {"model": str(model), "source": source}
        if row.name == "decode-qalora-unmerged":
            base, adapter, source = self.unmerged()
            return {"model": str(base), "adapter": str(adapter), "source": source}
        if row.name.startswith("decode-llamacpp"):
            path, source = self.gguf(row.bits)
            return {"gguf": str(path), "tokenizer": str(self.merged(row.bits)[0]), "source": source}
        return {}


def _row_bits(row: Row, inputs: Inputs) -> int | None:
    if row.name == "decode-qalora-unmerged":
        return inputs.pipeline_bits or 4
    return row.bits


def add_ratios(results: dict[str, dict], inputs: Inputs) -> None:
    """Training: time and peak RSS / the PEFT + bnb QLoRA row's. Decode: tokens/s / the llama.cpp
    row's of the same bits. Only rows of this run."""
    ref = results.get(TRAIN_REFERENCE, {})
    for name, r in results.items():
        row = BY_NAME[name]
        if r.get("status") != "ok":
            continue
        if row.group == "train" and ref.get("status") == "ok":
            r["reference"] = TRAIN_REFERENCE
            r["time_vs_reference"] = r["s_per_step"] / ref["s_per_step"]
            r["rss_vs_reference"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        elif row.group == "decode":
            rname = f"decode-llamacpp-int{_row_bits(row, inputs)}"
            d = results.get(rname, {})
            if d.get("status") != "ok":
                continue
            r["reference"] = rname
            for k in [k for k in r if k.endswith("_tok_s")]:
                if d.get(k):
                    r[k.replace("_tok_s", "_vs_reference")] = r[k] / d[k]
            if r.get("tokens") and d.get("tokens"):
                same = next((i for i, (a, b) in enumerate(zip(r["tokens"], d["tokens"])) if a != b), len(r["tokens"]))
                r["greedy_tokens_equal_to_reference"] = same


def format_table(results: dict[str, dict], settings: Settings) -> str:
    """One table: a line per measurement (x ref: time ratio for training — lower is faster —,
    tokens/s ratio for decode — higher is faster)."""
    head = f"{'system':<34} {'measure':<22} {'value':>13} {'x ref':>6}  {'peak RSS':>8}  note"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        row = BY_NAME[name]
        rss = f"{r['peak_rss_mb'] / 1024:.2f} GB" if r.get("peak_rss_mb") and r.get("status") == "ok" else ""
        if r.get("status") != "ok":
            lines.append(f"{row.label:<34} {name:<22} {'-':>13} {'-':>6}  {'':>8}  {r['status']}: {r.get('reason')}")
            continue

        def ratio(key, r=r):
            return f"{r[key]:.2f}" if r.get(key) is not None else "-"

        if row.group == "train":
            note = f"loss {r['losses'][0]:.3f}; {r['trainable_parameters'] / 1e6:.2f} M trainable"
            if r.get("rss_vs_reference") is not None:
                note += f"; RSS x{r['rss_vs_reference']:.2f}"
            lines.append(f"{row.label:<34} {'train step':<22} {r['s_per_step']:>11.2f} s {ratio('time_vs_reference'):>6}  "
                         f"{rss:>8}  {note}")
        elif row.group == "decode":
            measures = [("prefill_tok_s", f"prefill {settings.prefill_tokens}")] + [
                (f"decode_b{b}_tok_s", f"decode batch {b}") for b in settings.decode_batches]
            for i, (key, label) in enumerate(measures):
                if key not in r:
                    continue
                note = ""
                if key == "decode_b1_tok_s" and "greedy_tokens_equal_to_reference" in r:
                    note = f"first {r['greedy_tokens_equal_to_reference']}/{len(r['tokens'])} greedy tokens = ref"
                lines.append(f"{row.label if i == 0 else '':<34} {label:<22} {r[key]:>7.1f} tok/s "
                             f"{ratio(key.replace('_tok_s', '_vs_reference')):>6}  {rss if i == 0 else '':>8}  {note}")
        else:
            lines.append(f"{row.label:<34} {'per decoder layer':<22} {r['s_per_layer']:>11.2f} s {'-':>6}  {rss:>8}  "
                         f"{r['layers']} layer(s), {r['calib_samples']} x {r['calib_seq_len']} calibration tokens")
    lines.append(f"x ref: training vs {BY_NAME[TRAIN_REFERENCE].label} (time ratio, lower is faster); "
                 "decode vs the llama.cpp row of the same bits (tokens/s ratio, higher is faster)")
    return "\n".join(lines)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp_python", "qalora"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return f"{name} ({', '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags)})"


def select(only: list[str] | None) -> list[Row]:
    if not only:
        return list(ROWS)
    groups = {r.group for r in ROWS}
    unknown = [n for n in only if n not in BY_NAME and n not in groups]
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: unknown; use row names ({', '.join(BY_NAME)}) "
                         f"or groups ({', '.join(sorted(groups))})")
    return [r for r in ROWS if r.name in only or r.group in only]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer steps and tokens, no batch 8")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "qalora-speed"),
                   help="cache of the checkpoints, adapter and GGUF files the rows run on")
    p.add_argument("--pipeline", default=None, help="a qalora pipeline folder: its merged model, base and adapter")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="rows (or groups: train, decode, gptq)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each child")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT.parent / "src"))
    settings = Settings.quick() if args.quick else Settings()
    rows = select(args.only)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(work, Path(args.pipeline).expanduser() if args.pipeline else None, settings, args.timeout)
    meta = {"command": " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]]), "quick": args.quick,
            "settings": dataclasses.asdict(settings), "cpu": _cpu(), "cores": os.cpu_count(), "versions": _versions(),
            "work": str(work), "pipeline": args.pipeline}
    print(f"{meta['cpu']}, {settings.threads} threads; {len(rows)} rows, each in its own process", flush=True)
    results: dict[str, dict] = {}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        try:
            spec = inputs.spec(row)
        except Exception as e:  # noqa: BLE001 -- reported in the row, never dropped
            results[row.name] = {"status": "failed", "reason": f"its input could not be built: {e}"}
            print(f"[speed] {row.name}: failed: {results[row.name]['reason']}", flush=True)
            continue
        print(f"[speed] {row.name} ...", flush=True)
        results[row.name] = {**run_child(row.name, spec, settings, args.timeout), **spec}
        r = results[row.name]
        print(f"[speed] {row.name}: {r['status']}{'' if r['status'] == 'ok' else ': ' + r['reason']} "
              f"({r['wall_s']:.0f} s)", flush=True)
        out_path.write_text(json.dumps({**meta, "rows": results, "builds": inputs.builds}, indent=2) + "\n")
    add_ratios(results, inputs)
    table = format_table(results, settings)
    print("\n" + table)
    out_path.write_text(json.dumps({**meta, "rows": results, "builds": inputs.builds, "table": table}, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
