"""An adapter exported on its own (unmerged serving): a PEFT LoRA folder over a transformers-native
base, and a llama.cpp LoRA GGUF over the base's GGUF, each computing what the merged model
computes; kinds with no LoRA form, bad folders, another base and taken outputs refused in one
line with nothing written; the CLI's ``export --format peft | gguf-lora`` options."""

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file

from qalora.adapters.format import read_adapter, write_adapter
from qalora.adapters.kinds.qalora import pool
from qalora.checkpoint import load, save_checkpoint
from qalora.cli import main
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.export.gguf import export_gguf
from qalora.export.gguf_blocks import rotary_row_order
from qalora.export.gguf_lora import export_gguf_lora
from qalora.export.peft import (
    INFO_FILE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    export_dense_base,
    export_peft,
    lora_pair,
    qalora_pair,
)
from qalora.merging.command import merge
from qalora.quant.model import quantize_model
from qalora.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = LoraConfig(rank=4, alpha=8)
QA = [("What is two plus two?", "Four."), ("Name a colour.", "Blue."), ("Say hello.", "Hello there!")]
PROMPTS = TINY_TEXT + ["hello world, the model", "scales and offsets of the quick fox"]
B_STD = 0.05  # std of the adapters' random B: moves logits by ~0.3, far above every tolerance below
# PEFT over the dense base vs the merged model, both fp32 on the same weights: they differ only in
# fp32 rounding (the merged offsets rounded once to fp32; B'A'x summed in another order than the
# merge's offset). Observed max |Δlogit| 2.2e-6 on logits of magnitude ~3; 1e-4 is the merge
# tests' own fp32 bound (tests/test_merging.py).
PEFT_ATOL = 1e-4
# llama.cpp, base GGUF + LoRA GGUF vs the merged model's GGUF: llama.cpp quantizes activations to
# 8 bits (Q8_1) for Q4_1 matmuls and stores d, m in fp16, and the merged file's m = fp16(offset')
# while the base's is fp16(offset) with the LoRA added in fp32. Observed max 0.048, mean 0.008,
# about what llama.cpp differs from qalora's own fp32 logits (0.058): bounds 0.15 / 0.02.
GGUF_MAX, GGUF_MEAN = 0.15, 0.02


def run_dir(root, method, lora, steps=1, model="q4"):
    data = root / "data.jsonl"
    cfg = TrainConfig(method=method, steps=steps, data=str(data), batch_size=4, lr=1e-2, max_seq_len=64,
                      eval_every=steps, save_every=steps, eval_batches=1)
    out = root / f"{method}{'+scales' if lora.train_scales else ''}"
    train(root / model, out, cfg, lora, progress=False)
    return out


def with_random_b(src, dst, seed=0, qk_std=B_STD):
    """A copy of adapter ``src`` whose ``lora_B`` are N(0, B_STD), those of q_proj / k_proj
    N(0, ``qk_std``) (written by ``write_adapter``, so its SHA-256 is recorded as for any adapter)."""
    cfg, state = read_adapter(src)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(t.shape, generator=g) * (qk_std if k.endswith(("q_proj.lora_B.weight",
                                                                            "k_proj.lora_B.weight")) else B_STD)
             if k.endswith("lora_B.weight") else t for k, t in state.items()}
    dst.mkdir()
    write_adapter(dst, state, cfg)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """INT4 g32 RTN checkpoints of two tiny Llamas (``q4``, ``other``), the fp folder, a QA-LoRA
    adapter trained 3 steps (then B random: ``qa``), its merge, a LoRA adapter on the fp folder
    (B random: ``lo``), a one-step QLoRA adapter, and one-step adapters of the kinds with no LoRA
    form."""
    root = tmp_path_factory.mktemp("adapters")
    tok = tiny_tokenizer()
    for name, seed in (("q4", 0), ("other", 1)):
        m = tiny_llama(seed)
        quantize_model(m, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
        save_checkpoint(m, tok, root / name, {"bits": 4, "group_size": 32, "method": "rtn", "source_model": "tiny"})
    tiny_llama(0).save_pretrained(root / "fp")
    tok.save_pretrained(root / "fp")
    (root / "data.jsonl").write_text("".join(json.dumps({"instruction": f"{q} (#{i})", "input": "", "output": a}) + "\n"
                                             for i, (q, a) in enumerate(QA * 4)))
    with_random_b(run_dir(root, "qalora", LORA, steps=3), root / "qa")
    with_random_b(run_dir(root, "lora", LORA, model="fp"), root / "lo", seed=1)
    run_dir(root, "qlora", LORA, model="fp")
    run_dir(root, "peqa", LORA)
    run_dir(root, "qalora", LoraConfig(rank=4, alpha=8, train_scales=True))
    run_dir(root, "lota", LoraConfig(rank=4, alpha=8))
    merge(root / "q4", root / "qa", root / "merged", progress=False)
    return root


def logits(model, text):
    ids = tiny_tokenizer()(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0]


def peft_model(base, adapter):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qalora.quiet import quiet_imports

    with quiet_imports():
        from peft import PeftModel
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------- the LoRA form

@pytest.mark.parametrize("L", [32, 64, 128])
def test_qalora_pair_is_pooling(L):
    g = torch.Generator().manual_seed(L)
    r, groups, out_f = 4, 3, 8
    A, B = torch.randn(r, groups, generator=g), torch.randn(out_f, r, generator=g)
    wide, b = qalora_pair(A, B, L)
    assert wide.shape == (r, groups * L) and wide.dtype == torch.float32 and torch.equal(b, B)
    # /L with L a power of two only moves the exponent: exact
    assert torch.equal(wide, A.repeat_interleave(L, dim=1) / L)
    assert torch.equal(wide * L, A.repeat_interleave(L, dim=1))
    x = torch.randn(5, groups * L, generator=g, dtype=torch.float64)
    # A' x = A pool(x): the same linear map; fp64, so only summation order differs (~1e-15)
    torch.testing.assert_close(x @ wide.double().t(), pool(x, L) @ A.double().t(), rtol=0, atol=1e-12)
    a2, b2 = lora_pair(A, B, None)
    assert torch.equal(a2, A) and torch.equal(b2, B)
    with pytest.raises(ValueError, match="do not form a QA-LoRA pair"):
        qalora_pair(A, B.t(), L)


# ----------------------------------------------------------------------------------- PEFT

def test_peft_folder_holds_the_lora_form(files, tmp_path):
    report = export_peft(files / "qa", tmp_path / "p", base_out=tmp_path / "base", progress=False)
    assert listing(tmp_path / "p") == sorted([INFO_FILE, PEFT_CONFIG, PEFT_WEIGHTS])
    assert listing(tmp_path) == ["base", "p"]  # no staging folder left
    cfg = json.loads((tmp_path / "p" / PEFT_CONFIG).read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "base_model_name_or_path")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
         "base_model_name_or_path": str((tmp_path / "base").resolve())}
    assert cfg["target_modules"] == sorted(LORA.targets)
    src_cfg, src = read_adapter(files / "qa")
    state = load_file(str(tmp_path / "p" / PEFT_WEIGHTS))
    assert len(state) == 28 and report["modules"] == 14 and report["adapter_sha256"] == src_cfg["sha256"]["adapter.safetensors"]
    for module in src_cfg["modules"]:
        A, B = src[f"{module}.lora_A.weight"], src[f"{module}.lora_B.weight"]
        a, b = state[f"base_model.model.{module}.lora_A.weight"], state[f"base_model.model.{module}.lora_B.weight"]
        assert a.dtype == b.dtype == torch.float32 and a.shape == (4, A.shape[1] * 32)
        assert torch.equal(a, A.repeat_interleave(32, dim=1) / 32) and torch.equal(b, B)
    info = json.loads((tmp_path / "base" / INFO_FILE).read_text())
    assert info["source_sha256"] == src_cfg["base_sha256"] and info["dequantized_layers"] == 14


def test_dense_base_is_qalora_weights_bit_for_bit(files, tmp_path):
    from transformers import AutoModelForCausalLM

    report = export_dense_base(files / "q4", tmp_path / "base", progress=False)
    assert report["tensors"] == 20 and "tokenizer.json" in listing(tmp_path / "base")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert dense.config.tie_word_embeddings and dense.lm_head.weight is dense.model.embed_tokens.weight
    q = load(files / "q4", kernel="reference")
    for name in q.qalora_meta["layers"]:
        assert torch.equal(dense.get_submodule(name).weight, q.get_submodule(name).dequantized_weight()), name
    assert torch.equal(dense.model.norm.weight, q.model.norm.weight)
    # the same weights and the same fp32 GEMMs: the dense base computes qalora's base exactly
    assert torch.equal(logits(dense, PROMPTS[0]), logits(q, PROMPTS[0]))


def test_peft_over_dense_base_gives_merged_logits(files, tmp_path):
    export_peft(files / "qa", tmp_path / "p", base_out=tmp_path / "base", progress=False)
    served = peft_model(tmp_path / "base", tmp_path / "p")
    merged = load(files / "merged", kernel="dense")
    base = load(files / "q4", kernel="dense")
    worst = effect = 0.0
    for text in PROMPTS:
        got, want = logits(served, text), logits(merged, text)
        torch.testing.assert_close(got, want, rtol=0, atol=PEFT_ATOL)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        worst = max(worst, float((got - want).abs().max()))
        effect = max(effect, float((logits(base, text) - want).abs().max()))
    assert effect > 0.2 and effect > 1e4 * worst  # observed: effect 0.29, worst 2.2e-6


def test_one_base_serves_many_adapters(files, tmp_path):
    """A second export names the base written by the first (checked by its recorded source);
    a torchao export of the same checkpoint (packed codes) is a base PEFT serves just as well."""
    export_peft(files / "qa", tmp_path / "p1", base_out=tmp_path / "base", progress=False)
    r = export_peft(files / "qa", tmp_path / "p2", base_name=tmp_path / "base", progress=False)
    assert r["base_model_name_or_path"] == str((tmp_path / "base").resolve()) and "base" not in r
    assert (tmp_path / "p1" / PEFT_WEIGHTS).read_bytes() == (tmp_path / "p2" / PEFT_WEIGHTS).read_bytes()
    pytest.importorskip("torchao")
    from qalora.export.torchao import export_torchao

    export_torchao(files / "q4", tmp_path / "ao", progress=False)
    export_peft(files / "qa", tmp_path / "p3", base_name=tmp_path / "ao", progress=False)
    served, merged = peft_model(tmp_path / "ao", tmp_path / "p3"), load(files / "merged", kernel="dense")
    for text in PROMPTS[:2]:  # torchao's weights are within 5e-7 of qalora's (fp32 zero points)
        torch.testing.assert_close(logits(served, text), logits(merged, text), rtol=0, atol=PEFT_ATOL)


def test_lora_adapter_exports_as_it_is(files, tmp_path):
    """A plain LoRA (trained on the fp folder) keeps A and B; its base is that folder."""
    from qalora.adapters.format import load_adapted

    r = export_peft(files / "lo", tmp_path / "p", progress=False)
    assert r["base_model_name_or_path"] == str((files / "fp").resolve())
    cfg, src = read_adapter(files / "lo")
    state = load_file(str(tmp_path / "p" / PEFT_WEIGHTS))
    for m in cfg["modules"]:
        assert torch.equal(state[f"base_model.model.{m}.lora_A.weight"], src[f"{m}.lora_A.weight"])
        assert torch.equal(state[f"base_model.model.{m}.lora_B.weight"], src[f"{m}.lora_B.weight"])
    served = peft_model(files / "fp", tmp_path / "p")
    ours, _, _ = load_adapted(files / "fp", files / "lo")
    # a qlora adapter (trained on the NF4 form of the fp folder) is served over that fp folder
    r = export_peft(files / "qlora", tmp_path / "q", model=files / "fp", progress=False)
    assert r["base_model_name_or_path"] == str((files / "fp").resolve()) and r["kinds"] == ["lora"]
    for text in PROMPTS[:3]:  # the same operations on the same fp32 tensors: observed 0.0
        torch.testing.assert_close(logits(served, text), logits(ours, text), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- GGUF LoRA

def test_gguf_lora_layout(files, tmp_path):
    out = tmp_path / "a.gguf"
    report = export_gguf_lora(files / "qa", out, progress=False)
    assert listing(tmp_path) == ["a.gguf"] and report["tensors"] == 28
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    cfg, src = read_adapter(files / "qa")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert fields["qalora.base_sha256"] == cfg["base_sha256"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 28 and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    heads = {"attn_q": 4, "attn_k": 2}
    for m in cfg["modules"]:
        layer, proj = int(m.split(".")[2]), short[m.rsplit(".", 1)[1]]
        a, b = tensors[f"blk.{layer}.{proj}.weight.lora_a"], tensors[f"blk.{layer}.{proj}.weight.lora_b"]
        A, B = src[f"{m}.lora_A.weight"], src[f"{m}.lora_B.weight"]
        # ggml lists ne0 first: lora_a ne = [in, r], lora_b ne = [r, out] (what llama.cpp checks)
        assert list(a.shape) == [A.shape[1] * 32, 4] and list(b.shape) == [4, B.shape[0]]
        np.testing.assert_array_equal(a.data, (A.repeat_interleave(32, dim=1) / 32).numpy())
        want = B[torch.from_numpy(rotary_row_order(B.shape[0], heads[proj]))] if proj in heads else B
        np.testing.assert_array_equal(b.data, want.numpy())


def _llama(path, lora=None):
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=128, logits_all=True,
                 verbose=False, n_threads=1)


def _scores(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _greedy(llm, ids, n=12):
    """``(n greedy tokens, top-1 minus top-2 logit at each step)`` (whole-prompt eval first)."""
    llm.reset()
    llm.eval(ids)
    tokens, margins = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1])
        top = np.sort(row)[-2:]
        tokens.append(int(row.argmax()))
        margins.append(float(top[1] - top[0]))
        llm.eval([tokens[-1]])
    return tokens, margins


def test_gguf_lora_in_llama_cpp_gives_the_merged_model(files, tmp_path):
    """llama.cpp: base GGUF + LoRA GGUF against the merged model's GGUF (and both against qalora's
    fp32 merged model, llama.cpp's own noise floor). Greedy continuations (12 tokens) may part only
    where the merged model's top-2 margin is within 2x the logit tolerance: a near-tie that the
    rounding described at ``GGUF_MAX`` can flip (the tiny random model has many)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    export_gguf(files / "q4", tmp_path / "base.gguf", progress=False)
    export_gguf(files / "merged", tmp_path / "merged.gguf", progress=False)
    export_gguf_lora(files / "qa", tmp_path / "lora.gguf", progress=False)
    served, merged, base = (_llama(tmp_path / "base.gguf", tmp_path / "lora.gguf"), _llama(tmp_path / "merged.gguf"),
                            _llama(tmp_path / "base.gguf"))
    ours = load(files / "merged", kernel="dense")
    tok = tiny_tokenizer()
    diffs, floor, effect = [], 0.0, 0.0
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        s, m = _scores(served, ids), _scores(merged, ids)
        diffs.append(np.abs(s - m).ravel())
        floor = max(floor, float(np.abs(m - logits(ours, text).numpy()).max()))
        effect = max(effect, float(np.abs(_scores(base, ids) - m).max()))
    d = np.concatenate(diffs)
    assert d.max() <= GGUF_MAX and d.mean() <= GGUF_MEAN
    assert d.max() <= 2 * floor  # no farther from the merged GGUF than llama.cpp is from qalora fp32
    assert effect > 3 * d.max()  # the LoRA is applied: without it logits move by far more
    agree = 0
    for text in PROMPTS:
        ids = tok(text)["input_ids"][:5]
        (got, _), (want, margins) = _greedy(served, ids), _greedy(merged, ids)
        if got == want:
            agree += 1
            continue
        first = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
        assert margins[first] < 2 * GGUF_MAX, (text, first, margins[first])
    assert agree >= len(PROMPTS) // 2  # observed 4 of 6; the other two part at margins 0.008 and 0.003


# std of q_proj / k_proj's random B in the architectures test: their LoRA then moves logits as much
# as the rest, so llama.cpp's row order for them shows. With Q/K rows in the wrong order (Qwen
# permuted, Mistral not) base+LoRA is 0.34 / 1.10 / 0.74 from the merged GGUF (qwen2 / qwen3 /
# mistral), 2-7x GGUF_MAX; at B_STD for every module a wrong order moved it only to 0.067 (qwen2).
QK_STD = 0.3


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_gguf_lora_in_llama_cpp_other_architectures(tmp_path, kind):
    """The same check for the other GGUF architectures (``qalora.export.gguf_arch``), on
    ``test_gguf_arch``'s tiny models (RTN INT4 g32, lm_head kept in float): a QA-LoRA adapter (one
    step, then B random, Q/K's larger: ``QK_STD``), its merge, base GGUF + LoRA GGUF against the
    merged GGUF within the Llama bounds. The LoRA carries the base's ``general.architecture``
    (``qwen2``, ``qwen3``; Mistral is llama.cpp's ``llama``), and only Mistral's ``lora_b`` Q/K rows
    are in rotary order: Qwen's graphs use NEOX RoPE, as HF. Observed max / mean |Δlogit| 0.034 /
    0.0056 (qwen2), 0.042 / 0.0067 (qwen3), 0.067 / 0.0077 (mistral); llama.cpp's own floor (merged
    GGUF vs qalora fp32) 0.035 / 0.051 / 0.060; the LoRA's effect 0.30 / 0.85 / 0.59."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from test_gguf_arch import QUANT, qwen_tokenizer
    from test_gguf_arch import tiny_model as tiny_arch_model

    tok = qwen_tokenizer() if kind.startswith("qwen") else tiny_tokenizer()
    model = tiny_arch_model(kind)
    quantize_model(model, QUANT, progress=False)
    save_checkpoint(model, tok, tmp_path / "q4", {"bits": 4, "group_size": 32, "method": "rtn", "source_model": "tiny"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"instruction": f"{q} (#{i})", "input": "", "output": a})
                                                 + "\n" for i, (q, a) in enumerate(QA * 4)))
    with_random_b(run_dir(tmp_path, "qalora", LORA), tmp_path / "qa", qk_std=QK_STD)
    merge(tmp_path / "q4", tmp_path / "qa", tmp_path / "merged", progress=False)
    export_gguf(tmp_path / "q4", tmp_path / "base.gguf", progress=False)
    export_gguf(tmp_path / "merged", tmp_path / "merged.gguf", progress=False)
    report = export_gguf_lora(tmp_path / "qa", tmp_path / "lora.gguf", progress=False)
    assert report["modules"] == 14 and report["tensors"] == 28

    arch = {p: gguf.GGUFReader(str(tmp_path / p)).fields["general.architecture"].contents()
            for p in ("base.gguf", "lora.gguf")}
    assert arch["lora.gguf"] == arch["base.gguf"] == {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}[kind]
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "lora.gguf")).tensors}
    B = read_adapter(tmp_path / "qa")[1]["model.layers.1.self_attn.k_proj.lora_B.weight"]
    want = B[torch.from_numpy(rotary_row_order(B.shape[0], 2))] if kind == "mistral" else B
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_b"].data, want.numpy())

    served, merged, base = (_llama(tmp_path / "base.gguf", tmp_path / "lora.gguf"), _llama(tmp_path / "merged.gguf"),
                            _llama(tmp_path / "base.gguf"))
    ours = load(tmp_path / "merged", kernel="dense")
    diffs, floor, effect = [], 0.0, 0.0
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            fp32 = ours(torch.tensor([ids])).logits[0].numpy()
        s, m = _scores(served, ids), _scores(merged, ids)
        diffs.append(np.abs(s - m).ravel())
        floor = max(floor, float(np.abs(m - fp32).max()))
        effect = max(effect, float(np.abs(_scores(base, ids) - m).max()))
    d = np.concatenate(diffs)
    print(f"{kind}: base+LoRA vs merged GGUF max {d.max():.4f} mean {d.mean():.4f}; merged GGUF vs qalora fp32 "
          f"{floor:.4f}; LoRA effect {effect:.3f}")
    assert d.max() <= GGUF_MAX and d.mean() <= GGUF_MEAN
    assert d.max() <= 2 * floor  # no farther from the merged GGUF than llama.cpp is from qalora fp32
    assert effect > 3 * d.max()  # the LoRA is applied: without it logits move by far more


# ----------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("name, what", [("peqa", "scale"), ("qalora+scales", "scale"), ("lota", "codes")])
def test_kinds_without_a_lora_form_are_refused(files, tmp_path, name, what):
    for export, out in ((lambda a, o: export_peft(a, o, base_out=tmp_path / "b", progress=False), tmp_path / "p"),
                        (lambda a, o: export_gguf_lora(a, o, progress=False), tmp_path / "a.gguf")):
        with pytest.raises(QaloraError, match=f"changes the base's {what}: no LoRA file carries that, only the "
                                              r"merged model \(qalora merge\)"):
            export(files / name, out)
    assert listing(tmp_path) == []


def test_bad_adapters_bases_and_outputs_are_refused(files, tmp_path):
    import shutil

    bad = tmp_path / "corrupt"
    shutil.copytree(files / "qa", bad)
    raw = bytearray((bad / "adapter.safetensors").read_bytes())
    raw[-1] ^= 1
    (bad / "adapter.safetensors").write_bytes(bytes(raw))
    (tmp_path / "taken").mkdir()
    export_dense_base(files / "other", tmp_path / "other-base", progress=False)
    before = listing(tmp_path)
    cases = [
        ({"adapter_dir": tmp_path / "nowhere", "base_out": tmp_path / "b"}, "is not a folder"),
        ({"adapter_dir": bad, "base_out": tmp_path / "b"}, r"are corrupt \(sha256 differs from adapter_config.json\)"),
        ({"adapter_dir": files / "qa", "base_out": tmp_path / "b", "out": tmp_path / "taken"}, "already exists"),
        ({"adapter_dir": files / "qa", "base_out": tmp_path / "taken"}, "already exists"),
        ({"adapter_dir": files / "qa", "model": files / "other", "base_out": tmp_path / "b"}, "trained on another base"),
        ({"adapter_dir": files / "qa", "base_name": tmp_path / "other-base"}, "trained on another base"),
        ({"adapter_dir": files / "qa", "base_name": files / "q4"}, "has no export_info.json recording its source"),
        ({"adapter_dir": files / "qa"}, "transformers cannot load: pass base_out"),
        ({"adapter_dir": files / "lo", "base_out": tmp_path / "b"}, "is already a transformers folder"),
        ({"adapter_dir": files / "lo", "model": files / "q4"}, "trained on another base"),
    ]
    for kwargs, match in cases:
        kwargs = {"out": tmp_path / "p", **kwargs}
        with pytest.raises(QaloraError, match=match):
            export_peft(kwargs.pop("adapter_dir"), kwargs.pop("out"), progress=False, **kwargs)
        assert listing(tmp_path) == before, match
    for adapter, out, model, match in ((bad, tmp_path / "a.gguf", None, "corrupt"),
                                       (files / "qa", tmp_path / "taken", None, "already exists"),
                                       (files / "qa", tmp_path / "a.gguf", files / "other", "trained on another base")):
        with pytest.raises(QaloraError, match=match):
            export_gguf_lora(adapter, out, model=model, progress=False)
    assert listing(tmp_path) == before


# ----------------------------------------------------------------------------------- CLI

def test_cli_exports_peft_and_gguf_lora(files, tmp_path, capsys):
    assert main(["export", "--format", "peft", "--adapter", str(files / "qa"), "--out", str(tmp_path / "p"),
                 "--base-out", str(tmp_path / "base"), "--quiet"]) == 0
    assert main(["export", "--format", "peft", "--adapter", str(files / "qa"), "--model", str(files / "q4"),
                 "--out", str(tmp_path / "p2"), "--base-name", str(tmp_path / "base")]) == 0
    assert f"wrote {tmp_path / 'p2'}: PEFT LoRA, 14 modules, r 4, alpha 8 (qalora)" in capsys.readouterr().out
    assert main(["export", "--format", "gguf-lora", "--adapter", str(files / "qa"), "--out", str(tmp_path / "a.gguf"),
                 "--model", str(files / "q4")]) == 0
    assert "llama.cpp LoRA adapter, 14 modules, r 4, alpha 8 (qalora)" in capsys.readouterr().out
    assert main(["export", "--format", "peft", "--adapter", str(files / "lo"), "--out", str(tmp_path / "p3"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "p3" / PEFT_CONFIG).read_text())["base_model_name_or_path"] == str(
        (files / "fp").resolve())
    assert listing(tmp_path) == ["a.gguf", "base", "p", "p2", "p3"]


OUT_NAMES = {"p", "a.gguf", "m.gguf", "m", "b", "b2", "taken"}  # output names, placed under tmp_path


def test_cli_refusals_one_line_exit_2(files, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    qa, peqa = str(files / "qa"), str(files / "peqa")
    cases = [
        (["--format", "peft", "--out", "p"], "--format peft exports an adapter on its own: pass --adapter"),
        (["--format", "gguf-lora", "--out", "a.gguf"], "--format gguf-lora exports an adapter on its own"),
        (["--format", "gguf", "--adapter", qa, "--out", "m.gguf"], "--adapter applies to --format peft and gguf-lora"),
        (["--format", "torchao", "--out", "m"], "--format torchao exports a qalora checkpoint: pass --model CKPT"),
        (["--format", "gguf-lora", "--adapter", qa, "--base-out", "b", "--out", "a.gguf"],
         "--base-out and --base-name apply to --format peft only"),
        (["--format", "peft", "--adapter", qa, "--fallback", "f16", "--out", "p"],
         "--fallback applies to --format gguf only; an adapter export writes fp32 LoRA tensors"),
        (["--format", "peft", "--adapter", qa, "--dtype", "float16", "--out", "p"], "--dtype applies to --format mlx"),
        (["--format", "peft", "--adapter", qa, "--out", "p"], "transformers cannot load: pass base_out (--base-out DIR)"),
        (["--format", "peft", "--adapter", qa, "--base-out", "b", "--base-name", "b2", "--out", "p"], "not both"),
        (["--format", "peft", "--adapter", peqa, "--base-out", "b", "--out", "p"], "only the merged model (qalora merge)"),
        (["--format", "gguf-lora", "--adapter", peqa, "--out", "a.gguf"], "only the merged model (qalora merge)"),
        (["--format", "gguf-lora", "--adapter", qa, "--model", str(files / "other"), "--out", "a.gguf"],
         "trained on another base"),
        (["--format", "gguf-lora", "--adapter", qa, "--out", "taken"], "already exists"),
        (["--format", "peft", "--adapter", str(tmp_path / "none"), "--base-out", "b", "--out", "p"], "is not a folder"),
    ]
    for argv, message in cases:
        argv = [str(tmp_path / a) if a in OUT_NAMES else a for a in argv]
        assert main(["export", *argv]) == 2, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
        # one short line: what it says beyond the paths the user gave stays under 200 characters
        assert len(err.replace(str(tmp_path), "").replace(str(files), "")) < 200, err
        assert listing(tmp_path) == ["taken"], message
