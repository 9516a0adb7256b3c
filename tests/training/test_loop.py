"""The trainer end to end on a tiny random Llama: every method, exact resume, bad input."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qalora.adapters.attach import adapter_layers
from qalora.checkpoint import load, save_checkpoint
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.quant.model import quantize_model
from qalora.training.loop import train

QA = [("What is two plus two?", "Four."), ("Name a colour.", "Blue."), ("Say hello.", "Hello there!"),
      ("What do bees make?", "Honey."), ("Opposite of hot?", "Cold."), ("A fruit?", "An apple."),
      ("Capital of France?", "Paris."), ("Count to three.", "One, two, three.")]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA * 6]
    rows = [dict(r, instruction=f"{r['instruction']} (#{i})") for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def fp_dir(tmp_path, tiny_model, tiny_tok):
    d = tmp_path / "fp"
    tiny_model.save_pretrained(d)
    tiny_tok.save_pretrained(d)
    return d


@pytest.fixture
def q_dir(tmp_path, tiny_model, tiny_tok):
    quantize_model(tiny_model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(tiny_model, tiny_tok, tmp_path / "q4", {"bits": 4, "group_size": 32, "method": "rtn"})
    return tmp_path / "q4"


def cfg(data, **kw):
    base = dict(data=data, steps=6, batch_size=4, lr=1e-2, max_seq_len=64, eval_every=3, save_every=2, eval_batches=2)
    base.update(kw)
    return TrainConfig(**base)


LORA = LoraConfig(rank=4, alpha=8)


def test_qalora_trains_and_records_its_base(tmp_path, q_dir, data_file):
    out = train(q_dir, tmp_path / "a", cfg(data_file, steps=12, eval_every=12), LORA, progress=False)
    assert out["method"] == "qalora" and out["group_size"] == 32 and out["rank"] == 4 and out["alpha"] == 8
    assert out["base_sha256"] == json.loads((q_dir / "qalora.json").read_text())["sha256"]["model.safetensors"]
    assert out["val_loss_end"] < out["val_loss_start"]
    # QA-LoRA's A is [r, in/L]: 14 adapters, A 4x2 or 4x4, B out x 4
    tensors = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 2)
    assert tensors["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 4)
    assert out["trainable_parameters"] == sum(t.numel() for t in tensors.values())
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(13)) and "val_loss" in lines[0]


def test_packed_base_is_untouched_by_training(tmp_path, q_dir, data_file):
    """Only A and B move: the quantized buffers after training equal the checkpoint's."""
    import qalora.training.loop as loop

    captured = {}
    orig = loop.add_adapters

    def spy(model, method, config):
        captured["model"] = model
        return orig(model, method, config)

    loop.add_adapters = spy
    try:
        train(q_dir, tmp_path / "a", cfg(data_file, steps=3), LORA, progress=False)
    finally:
        loop.add_adapters = orig
    ref = load(q_dir)
    trained = captured["model"]
    for name, layer in adapter_layers(trained).items():
        base = ref.get_submodule(name)
        for buf in ("qweight", "scale", "offset"):
            assert torch.equal(getattr(layer.base, buf), getattr(base, buf)), (name, buf)
        assert layer.lora_B.weight.abs().sum() > 0


@pytest.mark.parametrize("method, rank_in", [("lora", 64), ("qlora", 64)])
def test_baselines_train(tmp_path, fp_dir, data_file, method, rank_in):
    out = train(fp_dir, tmp_path / method, cfg(data_file, method=method, steps=12, eval_every=12), LORA, progress=False)
    tensors = load_file(str(tmp_path / method / "adapter.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, rank_in)
    assert out["val_loss_end"] < out["val_loss_start"]
    assert out["base_bits"] == (4 if method == "qlora" else None)


def test_qalora_adapter_is_group_size_times_smaller(tmp_path, q_dir, fp_dir, data_file):
    qa = train(q_dir, tmp_path / "qa", cfg(data_file, steps=1), LORA, progress=False)
    lo = train(fp_dir, tmp_path / "lo", cfg(data_file, steps=1, method="lora"), LORA, progress=False)
    a_qa = sum(64 // 32 if "down" not in m else 128 // 32 for m in qa["modules"]) * 4
    a_lo = sum(64 if "down" not in m else 128 for m in lo["modules"]) * 4
    assert lo["trainable_parameters"] - qa["trainable_parameters"] == a_lo - a_qa


def test_resume_is_exact(tmp_path, q_dir, data_file):
    full = tmp_path / "full"
    train(q_dir, full, cfg(data_file, steps=6), LORA, progress=False)
    part = tmp_path / "part"
    train(q_dir, part, cfg(data_file, steps=4), LORA, progress=False)
    train(q_dir, part, cfg(data_file, steps=6), LORA, resume=True, progress=False)
    a, b = load_file(str(full / "adapter.safetensors")), load_file(str(part / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "metrics.jsonl").read_text().count("\n") == (part / "metrics.jsonl").read_text().count("\n")


@pytest.mark.parametrize("method", [["qalora"], ["qalora", "--train-scales"], ["peqa"], ["lota", "--lota-omega", "1"],
                                    ["lota", "--with-qalora", "--lota-omega", "1"], ["qlora"]],
                         ids=["qalora", "qalora+scales", "peqa", "lota", "lota+qalora", "qlora"])
def test_resume_after_sigkill_is_exact(tmp_path, fp_dir, q_dir, data_file, method):  # fp_dir first: q_dir quantizes the shared tiny model in place
    """Kill a training process after its first checkpoint, resume it, compare with a full run:
    every kind's parameters and optimizer state (AdamW, t-SignSGD's schedule) come back exactly."""
    model = fp_dir if method[0] == "qlora" else q_dir
    args = [sys.executable, "-m", "qalora", "train", "--model", str(model), "--data", data_file, "--steps", "8",
            "--batch-size", "4", "--lr", "1e-2", "--max-seq-len", "64", "--eval-every", "4", "--save-every", "2",
            "--eval-batches", "2", "--rank", "4", "--alpha", "8", "--quiet", "--method", *method]
    full = tmp_path / "full"
    subprocess.run(args + ["--out", str(full)], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter.safetensors").exists(), "the run finished before it could be killed"
    subprocess.run(args + ["--out", str(killed), "--resume"], check=True, capture_output=True)
    a, b = load_file(str(full / "adapter.safetensors")), load_file(str(killed / "adapter.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k or "log_scale" in k or "lota_B" in k)


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path, q_dir, data_file, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []  # the decoder layers' norms (inside the checkpointed layer forward; the final norm is not)
    norm = modeling_llama.LlamaRMSNorm.forward
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", lambda self, x: calls.append(1) or norm(self, x))
    train(q_dir, tmp_path / "plain", cfg(data_file, steps=2), LORA, progress=False)
    plain = len(calls)
    train(q_dir, tmp_path / "ckpt", cfg(data_file, steps=2, grad_checkpointing=True), LORA, progress=False)
    # checkpointing ran: backward recomputed the layers, whose norms ran again
    assert len(calls) - plain > plain > 0, (plain, len(calls) - plain)
    a = load_file(str(tmp_path / "plain" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "adapter.safetensors"))
    for k in a:  # recomputation reorders nothing in fp32 on CPU, but allow GEMM-level rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bad_runs_are_refused(tmp_path, q_dir, fp_dir, data_file):
    with pytest.raises(QaloraError, match="trains on a quantized qalora checkpoint"):
        train(fp_dir, tmp_path / "x", cfg(data_file), LORA, progress=False)
    with pytest.raises(QaloraError, match="is a quantized qalora checkpoint"):
        train(q_dir, tmp_path / "x", cfg(data_file, method="lora"), LORA, progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(QaloraError, match="already exists"):
        train(q_dir, tmp_path / "exists", cfg(data_file), LORA, progress=False)
    with pytest.raises(QaloraError, match="no run to resume"):
        train(q_dir, tmp_path / "exists", cfg(data_file), LORA, resume=True, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(QaloraError, match="empty.jsonl"):
        train(q_dir, tmp_path / "y", cfg(str(empty)), LORA, progress=False)
    assert not (tmp_path / "y").exists()


def test_resume_from_another_run_is_refused(tmp_path, q_dir, fp_dir, data_file):
    train(q_dir, tmp_path / "a", cfg(data_file, steps=2), LORA, progress=False)
    before = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    with pytest.raises(QaloraError, match="different lr"):
        train(q_dir, tmp_path / "a", cfg(data_file, steps=4, lr=1e-3), LORA, resume=True, progress=False)
    with pytest.raises(QaloraError, match="different method"):
        train(fp_dir, tmp_path / "a", cfg(data_file, steps=4, method="lora"), LORA, resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == before


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, q_dir, data_file, monkeypatch):
    import qalora.training.loop as loop

    calls = {"n": 0}
    real = loop._token_loss_sum

    def poisoned(model, batch, ctx, device="cpu"):  # the 4th training micro-batch (step 4) goes non-finite
        loss = real(model, batch, ctx, device)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop, "_token_loss_sum", poisoned)
    with pytest.raises(QaloraError, match=r"the loss became nan at step 4.*last good checkpoint is step 2"):
        train(q_dir, tmp_path / "a", cfg(data_file, steps=8), LORA, progress=False)
    assert (tmp_path / "a" / "checkpoints" / "step-000002" / "adapter.safetensors").is_file()
    assert not (tmp_path / "a" / "adapter.safetensors").exists()


def test_bf16_compute_runs_and_keeps_fp32_adapters(tmp_path, q_dir, data_file):
    out = train(q_dir, tmp_path / "bf", cfg(data_file, steps=2, compute_dtype="bf16"), LORA, progress=False)
    tensors = load_file(str(tmp_path / "bf" / "adapter.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert math.isfinite(out["val_loss_end"]) and math.isfinite(out["val_loss_start"])


def test_python_api_is_exported():
    import qalora

    assert qalora.train is train and qalora.TrainConfig is TrainConfig and qalora.LoraConfig is LoraConfig


@pytest.mark.parametrize("method", ["qalora", "peqa", "lota"])
def test_fp32_compute_never_calls_a_bf16_kernel(tmp_path, q_dir, data_file, monkeypatch, method):
    """With --compute-dtype fp32 every method trains on the fp32 reference path: the int4 (bf16)
    kernel, made to raise, is never prepared or called; with bf16 the same run reaches it."""
    import dataclasses

    from qalora.kernels import registry

    calls = []

    def boom(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else None)
        raise AssertionError("the bf16 int4 kernel was used")

    i = next(k for k, kern in enumerate(registry.KERNELS) if kern.name == "int4")
    patched = list(registry.KERNELS)
    patched[i] = dataclasses.replace(patched[i], prepare=boom, matmul=boom)
    monkeypatch.setattr(registry, "KERNELS", patched)
    out = train(q_dir, tmp_path / "fp32", cfg(data_file, steps=2, method=method, compute_dtype="fp32"), LORA,
                progress=False)
    assert calls == [] and out["compute"] == {"dtype": "fp32", "base_kernel": "reference"}
    if method == "qalora":  # the check can fail: bf16 compute goes through the int4 kernel
        with pytest.raises(AssertionError, match="bf16 int4 kernel was used"):
            train(q_dir, tmp_path / "bf16", cfg(data_file, steps=1, compute_dtype="bf16"), LORA, progress=False)
        assert calls


def test_scored_positions_loss_equals_the_full_head(tmp_path, q_dir, data_file):
    """The loss on the scored positions only (``logits_to_keep``) equals the loss computed from
    the full ``[B, T, vocab]`` logits, and so do the adapters' gradients (fp32; the head's GEMM
    runs on fewer rows, so allow rounding: rtol 1e-5)."""
    from contextlib import nullcontext

    from qalora.adapters.attach import add_adapters, adapter_parameters
    from qalora.models import load_tokenizer
    from qalora.training.data import load_train_data
    from qalora.training.loop import _token_loss_sum, scored_positions

    model = load(q_dir, kernel="reference")
    add_adapters(model, "qalora", LORA)
    for k, p in adapter_parameters(model).items():
        if "lora_B" in k:
            torch.nn.init.normal_(p, std=0.05)
    data = load_train_data(data_file, load_tokenizer(q_dir), cfg(data_file))
    batch = data.train_batch(0)
    keep = scored_positions(batch["labels"])
    assert 0 < keep.numel() < batch["labels"].shape[1] - 1  # prompts are not scored

    def full_head() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")

    params = [p for p in adapter_parameters(model).values() if p.requires_grad]
    ref = full_head()
    ref_grads = torch.autograd.grad(ref, params)
    ours = _token_loss_sum(model, batch, nullcontext)
    grads = torch.autograd.grad(ours, params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_grads):  # two fp32 summation orders: 1e-5 of the tensor's own scale
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("method", ["qalora", "lora"])
def test_chunked_head_loss_trains_as_the_whole_logits_path(tmp_path, request, data_file, monkeypatch, method):
    """A few steps with the chunked head + cross entropy (the default for a plain model) end
    with the losses and adapters of the whole-logits path, to fp32 rounding (rtol 1e-4 after 4
    steps of lr 1e-2)."""
    from qalora.training import head_loss

    base = request.getfixturevalue("q_dir" if method == "qalora" else "fp_dir")  # one: q_dir quantizes in place
    c = cfg(data_file, steps=4, eval_every=4, save_every=4, method=method)
    fused = train(base, tmp_path / "fused", c, LORA, progress=False)
    monkeypatch.setattr(head_loss, "applies", lambda model: False)
    whole = train(base, tmp_path / "whole", c, LORA, progress=False)
    a, b = load_file(tmp_path / "fused" / "adapter.safetensors"), load_file(tmp_path / "whole" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert math.isclose(fused["val_loss_end"], whole["val_loss_end"], rel_tol=1e-5)
