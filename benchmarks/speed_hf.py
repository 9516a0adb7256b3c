"""The child side of ``speed.py`` for transformers-style models: training steps (qalora, PEFT,
PEFT + bitsandbytes), prefill and decode (qalora's ``decode`` loop, ``model.generate``), GPTQ
time per layer, and the cached inputs the rows run on."""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext

from speed_common import INSTALL, Settings, peak_rss_mb, require


def train_batch(vocab: int, batch_size: int, seq_len: int) -> dict:
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


def train_qalora(method: str, model_path: str, s: Settings, grad_ckpt: bool = False) -> dict:
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
    if grad_ckpt:  # as qalora train --grad-checkpointing
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = Optimizers(net, cfg)
    load_s, rss_load = time.perf_counter() - t0, peak_rss_mb()
    batch = train_batch(net.config.vocab_size, cfg.batch_size, cfg.max_seq_len)

    def step():
        optim.clip(cfg.max_grad_norm)
        optim.step()

    out = _timed_steps(net, step, batch, s)
    return {**out, "trainable_parameters": trainable_parameters(net), "load_s": load_s,
            "peak_rss_after_load_mb": rss_load, "base": model_path, "rank": lora.rank, "alpha": lora.alpha,
            "gradient_checkpointing": grad_ckpt}


def _bnb_model(dtype_name: str = "float32"):
    """The embedded model loaded by transformers with bitsandbytes NF4 (block 64, compute in
    ``dtype_name``), every decoder linear quantized (lm_head kept, as transformers does)."""
    require("bitsandbytes", "bitsandbytes", INSTALL["bitsandbytes"])
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


def train_peft(bnb: bool, grad_ckpt: bool, s: Settings) -> dict:
    require("peft", "PEFT", INSTALL["peft"])
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
    load_s, rss_load = time.perf_counter() - t0, peak_rss_mb()
    batch = train_batch(model.config.vocab_size, cfg.batch_size, cfg.max_seq_len)

    def step():
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = _timed_steps(pm, step, batch, s)
    return {**out, "trainable_parameters": sum(p.numel() for p in params), "load_s": load_s,
            "peak_rss_after_load_mb": rss_load, "gradient_checkpointing": grad_ckpt}


def prompt_ids(tok):
    """``([1, T]`` chat-templated speed prompt (the pipeline's), vocabulary size``)."""
    from qalora.stages.pipeline import SPEED_PROMPT

    ids = tok.apply_chat_template([{"role": "user", "content": SPEED_PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    return ids, len(tok)


def prefill_ids(vocab: int, n: int):
    import torch

    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))  # [1, P]


def _generate_fn(model, tok, loop: dict | None):
    """``(ids [b, T], n) -> tokens [b, n]`` (exactly n, eos not allowed earlier): ``model.generate``
    when ``loop`` is None, else qalora's ``decode`` with ``DecodeConfig(**loop)``."""
    import torch

    if loop is None:
        def gen(x, n):
            with torch.inference_mode():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=tok.eos_token_id)
            return out[:, x.shape[1]:]
        return gen
    from qalora.config import DecodeConfig
    from qalora.decode import decode

    def gen(x, n):
        return decode(model, x, DecodeConfig(max_new_tokens=n, **loop), eos_token_id=tok.eos_token_id, min_new_tokens=n)
    return gen


def _hf_speed(model, tok, s: Settings, loop: dict | None = None) -> dict:
    """Prefill and greedy decode speed of a transformers-style model (see ``speed.py``'s docstring);
    ``loop``: decode with qalora's loop and these ``DecodeConfig`` options instead of ``generate``."""
    import torch

    ids, vocab = prompt_ids(tok)
    pre = prefill_ids(vocab, s.prefill_tokens)
    out = {"prompt_tokens": int(ids.shape[1]), "decode_loop": "transformers generate" if loop is None else
           f"qalora.decode {loop}"}
    with torch.inference_mode():
        model(input_ids=pre, use_cache=True, logits_to_keep=1)  # warm-up (kernel preparation)
        times = []
        for _ in range(s.reps):
            t0 = time.perf_counter()
            model(input_ids=pre, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
        out["prefill_tok_s"] = s.prefill_tokens / statistics.median(times)
    gen = _generate_fn(model, tok, loop)
    for b in s.decode_batches:
        x = ids.repeat(b, 1)                                                    # [b, T]
        t0 = time.perf_counter()
        gen(x, 4)                                                               # warm-up (and compilation)
        out[f"warmup_b{b}_s"] = time.perf_counter() - t0
        times = []
        for _ in range(s.reps):
            t0 = time.perf_counter()
            tokens = gen(x, s.new_tokens)
            times.append(time.perf_counter() - t0)
        out[f"decode_b{b}_tok_s"] = b * s.new_tokens / statistics.median(times)
        if b == 1:
            out["tokens"] = tokens[0].tolist()
    return out


# row -> (qalora.decode options, None for model.generate; head bits, 0 = the head as loaded).
# Rows not named here: qalora rows decode eagerly with qalora.decode, the others with generate.
LOOPS = {"decode-qalora-int4-hf": (None, 0), "decode-qalora-int4-compiled": ({"compile": True}, 0),
         "decode-qalora-int4-compiled-head4": ({"compile": True}, 4),
         "decode-qalora-int3-compiled-head4": ({"compile": True}, 4),
         "decode-peft-bnb": (None, 0), "decode-hf-bf16": (None, 0)}


def decode_hf(row: str, spec: dict, s: Settings) -> dict:
    import torch

    from qalora.models import load_tokenizer
    from qalora.patch import set_kernel

    t0 = time.perf_counter()
    loop, head_bits = LOOPS.get(row, ({}, 0))
    if row.startswith(("decode-qalora-int4", "decode-qalora-int3")):
        import qalora

        model, tok = qalora.load(spec["model"], kernel="auto"), load_tokenizer(spec["model"])
        if head_bits:
            from qalora.decode import quantize_head

            quantize_head(model, head_bits)
    elif row == "decode-qalora-unmerged":
        from qalora.adapters.format import load_adapted

        model, tok, _ = load_adapted(spec["model"], spec["adapter"])
        set_kernel(model, "auto")
    elif row == "decode-peft-bnb":
        require("peft", "PEFT", INSTALL["peft"])
        from qalora.default_model import resolve_model

        model, tok = _peft_wrap(_bnb_model()), load_tokenizer(resolve_model("default"))
    elif row == "decode-hf-bf16":
        from qalora.models import load_fp_model

        model, tok, _ = load_fp_model("default", dtype=torch.bfloat16)
    else:
        raise ValueError(row)
    model.eval()
    load_s, rss_load = time.perf_counter() - t0, peak_rss_mb()
    return {**_hf_speed(model, tok, s, loop), "head": f"int{head_bits} g32 RTN (in memory)" if head_bits else "as loaded",
            "load_s": load_s, "peak_rss_after_load_mb": rss_load,
            **{k: spec[k] for k in ("model", "adapter", "source") if k in spec}}


def gptq_layer(s: Settings) -> dict:
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

def build(kind: str, spec: dict) -> dict:
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


