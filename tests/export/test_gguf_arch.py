"""GGUF export of Qwen2, Qwen3 and Mistral beside Llama (the table is ``qalora.export.gguf_arch``).

On tiny random models (hidden 64, 2 layers, vocabulary 300) quantized with RTN INT4 g32:
- read back with gguf-py: the architecture key and its metadata, the exact tensor set and types;
  Q4_1 blocks byte-equal to ``q4_1_blocks`` of the checkpoint's codes, scales and offsets (Q/K
  rows in HF order for Qwen, in llama.cpp's rotary order for Mistral); biases, Qwen3's q/k norms
  and the other norms byte-equal to the checkpoint's tensors;
- run in llama.cpp (llama-cpp-python; those checks skip without it): its logits against qalora's
  fp32 logits of the same checkpoint, next to the anchor, llama.cpp on the *unquantized* model
  exported as F32 against transformers (the relative errors are in ``LLAMA_CPP_REL_TOL`` and
  ``ANCHOR_REL_TOL``); writing Qwen3 with llama's row permutation breaks it (the convention is
  not cosmetic); a Llama's Q/K biases follow their permuted rows; Qwen's tokenizer gets
  llama.cpp's ``qwen2`` pre-tokenizer, and it matters;
- quantize -> train -> merge -> export -> llama.cpp through the Python API for Qwen2 and Qwen3;
- refusals (model types gemma/phi3, sliding window, gelu, a Qwen3 bias): one line, nothing written.
"""

import copy
import dataclasses
import importlib.util
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, tiny_tokenizer
from safetensors.torch import load_file

import qalora
from qalora.checkpoint import load, save_checkpoint
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.export import gguf_arch
from qalora.export.gguf import (
    QWEN2_SPLIT,
    choose_pre_tokenizer,
    export_float_gguf,
    export_gguf,
)
from qalora.export.gguf_arch import ARCHS, BLOCK_TENSORS, arch_for
from qalora.export.gguf_blocks import q4_1_blocks, rotary_row_order
from qalora.quant.model import quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")

QUANT = QuantConfig(bits=4, group_size=32, method="rtn", skip=("lm_head",))
TEXT = "the quick brown fox jumps over the lazy dog; call(twice) in 2024, WE'RE told: it's 12:30"
# "call(twice)" repeated: the BPE learns "(twice", a token only Qwen's split (one non-letter may
# lead a word) produces, so llama.cpp's GPT-2 pre-tokenizer tokenizes TEXT differently.
QWEN_TEXTS = [TEXT, *TINY_TEXT, "low rank adapters: 3 or 4 bits, not 16\n\nthat's all", "call(twice) " * 8]
PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
F32 = gguf.GGMLQuantizationType.F32

# ||llama.cpp - qalora|| / ||qalora|| over all positions and logits, measured 0.013 / 0.014 / 0.018
# for qwen2 / qwen3 / mistral (0.014 for the merged qwen2 and qwen3). llama.cpp multiplies Q4_1
# weights with activations quantized to 8 bits (Q8_1, a relative step of ~2^-8 per block of 32),
# holds d and m in fp16 (2^-11), the embeddings and an untied output matrix in F16 (the output
# matmul rounds its input to fp16 too) and K/V in an F16 cache. RTN INT4 itself moves these
# logits by ~0.22 relative (asserted >= 3x the tolerance), so wrong weights could not pass.
LLAMA_CPP_REL_TOL = 0.04
# The anchor: llama.cpp on the unquantized weights (F32 GGUF) vs transformers fp32, measured
# 2.3e-4 / 4.4e-4 / 3.6e-4: llama.cpp's own arithmetic (F16 K/V cache, its kernels' order).
ANCHOR_REL_TOL = 2e-3


def qwen_tokenizer():
    """A byte-level BPE trained in memory with Qwen2's pre-tokenizer: its split regex, then
    ByteLevel without a regex (digits split one by one, case-insensitive contractions)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(QWEN_TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model(kind: str, seed: int = 0, **over):
    """Random tiny decoder: qwen2 (q/k/v biases, untied), qwen3 (head_dim 32 != 64/4, tied),
    mistral (untied, no sliding window). Weights N(0, 0.08), biases N(0, 0.3), norms N(1, 0.2)."""
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "eos_token_id": 0,
              "pad_token_id": 0, "bos_token_id": 0, "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"}}
    config, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                   "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    extra = {"qwen2": {"tie_word_embeddings": False}, "qwen3": {"head_dim": 32, "tie_word_embeddings": True},
             "mistral": {"head_dim": 16, "sliding_window": None, "tie_word_embeddings": False}}[kind]
    model = cls(config(**{**common, **extra, **over})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif n.endswith("bias"):
                p.normal_(0, 0.3)
            else:
                p.normal_(1.0, 0.2)
    return model


# Every case uses the exporter's own pre-tokenizer choice (Qwen's tokenizer -> "qwen2", the
# Mistral case's GPT-2 style tokenizer -> "gpt-2", the name llama.cpp reads).
PRE = {"qwen2": None, "qwen3": None, "mistral": None}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per case: the fp folder, its F32 GGUF (anchor), the INT4 checkpoint and its GGUF."""
    root = tmp_path_factory.mktemp("gguf-arch")
    toks = {"qwen": qwen_tokenizer(), "gpt2": tiny_tokenizer()}
    out = {}
    for kind, pre in PRE.items():
        tok = toks["qwen" if kind.startswith("qwen") else "gpt2"]
        model = tiny_model(kind)
        fp = root / f"fp-{kind}"
        model.save_pretrained(fp)
        tok.save_pretrained(fp)
        quantized = copy.deepcopy(model)
        quantize_model(quantized, QUANT, progress=False)
        save_checkpoint(quantized, tok, root / kind, {"source_model": "tiny"})
        report = export_gguf(root / kind, root / f"{kind}.gguf", pre_tokenizer=pre, progress=False)
        export_float_gguf(fp, root / f"fp-{kind}.gguf", pre_tokenizer=pre)
        out[kind] = {"root": root, "fp": fp, "model": model, "tok": tok, "ckpt": root / kind, "report": report,
                     "gguf": root / f"{kind}.gguf", "anchor": root / f"fp-{kind}.gguf"}
    return out


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


# ----------------------------------------------------------------------------------- table, refusals

def test_arch_table():
    assert {t: (a.name, a.permute_qk) for t, a in ARCHS.items()} == {
        "llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
    assert ARCHS["qwen2"].required == ("attn_q.bias", "attn_k.bias", "attn_v.bias")
    assert ARCHS["qwen3"].required == ("attn_q_norm.weight", "attn_k_norm.weight")
    assert ARCHS["qwen3"].optional == () and "attn_output.bias" in ARCHS["llama"].optional


def _configs():
    from transformers import (
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return [(GemmaConfig(), "model_type 'gemma' cannot be exported to GGUF; the exporter writes llama, mistral, qwen2"),
            (Phi3Config(), "model_type 'phi3'"),
            (Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=1, num_hidden_layers=2),
             "sliding_window 16"),
            (MistralConfig(), "sliding_window 4096"),   # transformers' Mistral default: 4096 < 131072 positions
            (LlamaConfig(hidden_act="gelu"), "hidden_act 'gelu'"),
            (Qwen3Config(hidden_act="gelu_pytorch_tanh"), "hidden_act 'gelu_pytorch_tanh'.*qwen3")]


@pytest.mark.parametrize("i", range(6))
def test_refused_configs(i):
    config, match = _configs()[i]
    with pytest.raises(QaloraError, match=match) as e:
        arch_for(config)
    assert "\n" not in str(e.value)


def test_accepted_window_configs():
    from transformers import MistralConfig, Qwen2Config

    # a window no shorter than the context never slides; Qwen2's window on no layer is not used
    assert arch_for(MistralConfig(sliding_window=4096, max_position_embeddings=4096)).name == "llama"
    assert arch_for(Qwen2Config(use_sliding_window=True, sliding_window=16, num_hidden_layers=2)).name == "qwen2"


@pytest.mark.parametrize("edit, match", [
    ({"model_type": "gemma"}, "model_type 'gemma'"),
    ({"model_type": "phi3"}, "model_type 'phi3'"),
    ({"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]},
     "sliding-window attention"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'")])
def test_export_refusals_write_nothing(exports, tmp_path, edit, match):
    ckpt = shutil.copytree(exports["qwen2"]["ckpt"], tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(QaloraError, match=match) as e:
        export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_qwen3_bias_refused(tmp_path):
    """llama.cpp's qwen3 graph reads no attention biases: a checkpoint with them is refused."""
    model = tiny_model("qwen3", attention_bias=True)
    quantize_model(model, QUANT, progress=False)
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    with pytest.raises(QaloraError, match=r"model.layers.0.self_attn.k_proj.bias' \(blk.0.attn_k.bias\) is not read "
                                          r"by llama.cpp's qwen3 architecture") as e:
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", progress=False)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ----------------------------------------------------------------------------------- what is written

EXPECT = {  # key (after the architecture prefix) -> value; None: must be absent
    "qwen2": {"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": None,
              "rope.dimension_count": None, "vocab_size": None},
    "qwen3": {"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 32,
              "attention.value_length": 32, "rope.dimension_count": None, "vocab_size": None},
    "mistral": {"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": None,
                "rope.dimension_count": 16, "vocab_size": 300},
}


@pytest.mark.parametrize("kind", list(PRE))
def test_metadata_and_tensors(exports, kind):
    e = exports[kind]
    fields, tensors = read_gguf(e["gguf"])
    arch = ARCHS[kind]
    assert fields["general.architecture"] == arch.name == e["report"]["metadata"]["architecture"]
    common = {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
              "rope.freq_base": 50000.0}
    for key, value in {**common, **EXPECT[kind]}.items():
        assert fields.get(f"{arch.name}.{key}") == value, key
    assert fields[f"{arch.name}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    assert fields["tokenizer.ggml.pre"] == ("qwen2" if kind.startswith("qwen") else "gpt-2")

    extra = {"qwen2": {"attn_q.bias": "q_proj.bias", "attn_k.bias": "k_proj.bias", "attn_v.bias": "v_proj.bias"},
             "qwen3": {"attn_q_norm.weight": "q_norm.weight", "attn_k_norm.weight": "k_norm.weight"},
             "mistral": {}}[kind]  # GGUF name in a block -> HF name in self_attn
    tied = kind == "qwen3"
    want = {"token_embd.weight", "output_norm.weight", *([] if tied else ["output.weight"])}
    want |= {f"blk.{i}.{n}" for i in range(2) for n in (*BLOCK_TENSORS, *extra)}
    assert set(tensors) == want

    model = load(e["ckpt"])
    state = load_file(str(e["ckpt"] / "model.safetensors"))
    heads = {"attn_q": 4, "attn_k": 2} if arch.permute_qk else {}
    for i in range(2):
        for hf, short in PROJ.items():
            t = tensors[f"blk.{i}.{short}.weight"]
            qw = model.get_submodule(f"model.layers.{i}.{hf}").quantized_weight()
            codes, scale, offset = qw.codes(), qw.scale, qw.offset
            if short in heads:  # llama.cpp's rotary row order: rows move with their scales and offsets
                order = torch.from_numpy(rotary_row_order(codes.shape[0], heads[short]))
                codes, scale, offset = codes[order], scale[order], offset[order]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
            np.testing.assert_array_equal(t.data, q4_1_blocks(codes, scale, offset, 32))
        floats = {f"blk.{i}.attn_norm.weight": f"model.layers.{i}.input_layernorm.weight",
                  f"blk.{i}.ffn_norm.weight": f"model.layers.{i}.post_attention_layernorm.weight"}
        floats.update({f"blk.{i}.{n}": f"model.layers.{i}.self_attn.{hf}" for n, hf in extra.items()})
        for name, source in floats.items():  # HF order: Qwen is not permuted, Mistral has no biases
            assert tensors[name].tensor_type == F32, name
            np.testing.assert_array_equal(tensors[name].data, state[source].numpy())
    np.testing.assert_array_equal(tensors["output_norm.weight"].data, state["model.norm.weight"].numpy())
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(tensors["token_embd.weight"].data, state["model.embed_tokens.weight"].half().numpy())
    if not tied:
        assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F16
        np.testing.assert_array_equal(tensors["output.weight"].data, state["lm_head.weight"].half().numpy())


def test_anchor_export_is_the_fp_model(exports):
    """``export_float_gguf``: every tensor F32 and equal to the HF folder's (Qwen rows as stored)."""
    fields, tensors = read_gguf(exports["qwen3"]["anchor"])
    state = load_file(str(exports["qwen3"]["fp"] / "model.safetensors"))
    assert fields["general.file_type"] == int(gguf.LlamaFileType.ALL_F32) and len(tensors) == len(state) == 24
    assert all(t.tensor_type == F32 for t in tensors.values())
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"].data,
                                  state["model.layers.1.self_attn.k_proj.weight"].numpy())


# ----------------------------------------------------------------------------------- llama.cpp

def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits ``[len(ids), vocab]`` for ``ids`` (one sequence, all positions)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)


def llama_cpp_tokens(path, text: str) -> list[int]:
    from llama_cpp import Llama

    return Llama(model_path=str(path), vocab_only=True, verbose=False).tokenize(text.encode(), add_bos=False,
                                                                                special=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` over every position and logit."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def qalora_logits(ckpt, ids):
    with torch.no_grad():
        return load(ckpt, kernel="dense")(torch.tensor([ids])).logits[0]


@needs_llama_cpp
@pytest.mark.parametrize("kind", list(PRE))
def test_llama_cpp_matches_qalora_and_anchor(exports, kind):
    e = exports[kind]
    ids = e["tok"](TEXT)["input_ids"]
    assert llama_cpp_tokens(e["gguf"], TEXT) == ids
    ours = qalora_logits(e["ckpt"], ids)
    with torch.no_grad():
        hf = e["model"](torch.tensor([ids])).logits[0]
    err, anchor = rel(llama_cpp_logits(e["gguf"], ids), ours), rel(llama_cpp_logits(e["anchor"], ids), hf)
    print(f"{kind}: llama.cpp vs qalora INT4 g32 rel {err:.2e}; anchor (F32 GGUF vs transformers) rel {anchor:.2e}; "
          f"quantization itself {rel(ours, hf):.2e}")
    assert err <= LLAMA_CPP_REL_TOL and anchor <= ANCHOR_REL_TOL and rel(ours, hf) >= 3 * LLAMA_CPP_REL_TOL


@needs_llama_cpp
def test_qwen3_written_with_llama_permutation_breaks(exports, tmp_path, monkeypatch):
    """The NEOX/NORM convention is what makes the figures above: Q/K rows permuted as for llama,
    llama.cpp's qwen3 output is far from qalora's."""
    e = exports["qwen3"]
    monkeypatch.setitem(gguf_arch.ARCHS, "qwen3", dataclasses.replace(ARCHS["qwen3"], permute_qk=True))
    export_gguf(e["ckpt"], tmp_path / "wrong.gguf", progress=False)
    ids = e["tok"](TEXT)["input_ids"]
    assert rel(llama_cpp_logits(tmp_path / "wrong.gguf", ids), qalora_logits(e["ckpt"], ids)) > 3 * LLAMA_CPP_REL_TOL


@needs_llama_cpp
def test_llama_biases_permuted_with_their_rows(tmp_path):
    """A Llama with q/k/v/o and MLP biases: llama.cpp reads them all, the Q/K biases in the rotary
    row order of their rows (measured rel 0.007)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                         eos_token_id=0)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 or n.endswith("bias"):
                p.normal_(0, 0.3 if n.endswith("bias") else 0.08)
    tok = tiny_tokenizer()
    quantize_model(model, QUANT, progress=False)
    save_checkpoint(model, tok, tmp_path / "ckpt", {"source_model": "tiny"})
    report = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", progress=False)
    assert report["tensor_types"]["F32"] == 5 + 2 * 7  # norms + seven biases per block
    ids = tok(TEXT)["input_ids"]
    assert rel(llama_cpp_logits(tmp_path / "m.gguf", ids), qalora_logits(tmp_path / "ckpt", ids)) <= LLAMA_CPP_REL_TOL


@needs_llama_cpp
def test_qwen2_pre_tokenizer_is_the_one_llama_cpp_needs(exports, tmp_path):
    """Qwen's tokenizer.json is matched to llama.cpp's ``qwen2`` pre-tokenizer, which tokenizes
    like transformers (HF's case-insensitive contractions, digits one by one); GPT-2's does not."""
    e = exports["qwen2"]
    tokenizer = json.loads((e["ckpt"] / "tokenizer.json").read_text())
    assert choose_pre_tokenizer(tokenizer) == "qwen2"
    assert choose_pre_tokenizer(json.loads((exports["mistral"]["ckpt"] / "tokenizer.json").read_text())) == "gpt-2"
    ids = e["tok"](TEXT)["input_ids"]
    assert llama_cpp_tokens(e["gguf"], TEXT) == ids
    export_gguf(e["ckpt"], tmp_path / "gpt2-pre.gguf", pre_tokenizer="gpt-2", progress=False)
    assert llama_cpp_tokens(tmp_path / "gpt2-pre.gguf", TEXT) != ids


# ----------------------------------------------------------------------------------- end to end

@needs_llama_cpp
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_quantize_train_merge_export_run(exports, tmp_path, kind):
    """``qalora.quantize`` -> ``train`` (QA-LoRA, 3 steps at lr 2e-2) -> ``merge`` -> ``export_gguf``
    -> llama.cpp: the GGUF holds the merged offsets (Q4_1 bytes of the merged checkpoint), and
    llama.cpp follows the merged model, not the unmerged one."""
    e = exports[kind]
    data = tmp_path / "data.jsonl"
    pairs = [("Say hello.", "Hello there!"), ("Count to 3.", "1, 2, 3.")] * 6
    data.write_text("".join(json.dumps({"instruction": f"{q} (#{i})", "input": "", "output": a}) + "\n"
                            for i, (q, a) in enumerate(pairs)))
    qalora.quantize(e["fp"], tmp_path / "q", QUANT, progress=False)
    qalora.train(tmp_path / "q", tmp_path / "adapter", TrainConfig(steps=3, data=str(data), batch_size=4, lr=2e-2,
                                                                    max_seq_len=64, eval_every=3, save_every=3,
                                                                    eval_batches=1),
                 LoraConfig(rank=4, alpha=8), progress=False)
    qalora.merge(tmp_path / "q", tmp_path / "adapter", tmp_path / "merged", progress=False)
    export_gguf(tmp_path / "merged", tmp_path / "m.gguf", progress=False)

    _, tensors = read_gguf(tmp_path / "m.gguf")
    qw = load(tmp_path / "merged").model.layers[1].self_attn.q_proj.quantized_weight()
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"].data, q4_1_blocks(qw.codes(), qw.scale, qw.offset, 32))
    ids = e["tok"](TEXT)["input_ids"]
    merged, unmerged = qalora_logits(tmp_path / "merged", ids), qalora_logits(tmp_path / "q", ids)
    err = rel(llama_cpp_logits(tmp_path / "m.gguf", ids), merged)
    print(f"{kind} merged: llama.cpp vs qalora rel {err:.2e}; merged vs unmerged {rel(merged, unmerged):.2e}")
    assert err <= LLAMA_CPP_REL_TOL and rel(merged, unmerged) > 3 * err
