"""``qalora.formats.gguf_names``: GGUF -> Hugging Face names, row order and config, checked by a
round trip through qalora's own GGUF exporter.

Tiny random models (hidden 64, 1-2 layers, vocabulary 300; the builders of ``conftest`` and
``tests/export``) quantized RTN INT4 g32, saved, exported with ``export_gguf``, read back with
``read_gguf``; every tensor mapped with ``tensor_map``, reordered by ``row_order`` and compared to
the checkpoint it was exported from:
- Q4_1 projections: codes equal exactly; scale/offset equal the checkpoint's rounded to fp16 and
  back (Q4_1 stores d and m in fp16); ``dequantize`` equals ``fp16(scale) * q + fp16(offset)``
  in fp32 exactly;
- norms, biases (F32) exactly; embeddings and the untied lm_head (F16) equal fp16 of the
  checkpoint's fp32 tensors exactly;
- ``hf_config_dict`` reproduces the model's config; a transformers model built from it with the
  mapped weights gives qalora's logits up to that fp16 rounding, and without the row order a
  Llama's logits are far off.
Cases: Llama (tied), Llama with q/k/v/o biases, untied lm_head and linear RoPE, Mistral (read as
llama), Qwen2 (q/k/v biases, untied), Qwen3 (q/k norms, head_dim 32 != 64/4, tied).
"""

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from export.test_gguf import untied_llama
from export.test_gguf_arch import qwen_tokenizer
from export.test_gguf_arch import tiny_model as arch_model
from safetensors.torch import load_file

from qalora.checkpoint import load, save_checkpoint
from qalora.config import QuantConfig
from qalora.export.gguf import export_gguf
from qalora.export.gguf_arch import ARCHS
from qalora.export.gguf_blocks import rotary_row_order
from qalora.formats.gguf_file import read_gguf
from qalora.formats.gguf_names import HFTensor, hf_config_dict, inverse_rotary_order, tensor_map
from qalora.formats.gguf_types import dequantize
from qalora.quant.model import quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUANT = QuantConfig(bits=4, group_size=32, method="rtn")
KINDS = ("llama", "llama_bias", "mistral", "qwen2", "qwen3")
IDS = [0, 5, 17, 42, 99, 150, 201, 250, 299, 7, 64, 128]


def build(kind):
    if kind == "llama":
        return tiny_llama(), tiny_tokenizer()
    if kind == "llama_bias":  # q/k/v/o biases N(0, 1), untied, linear RoPE x2, 2 heads / 1 kv head
        model = untied_llama()
        with torch.no_grad():  # weights N(0, 0.08) as tiny_llama's: attention far from uniform
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
        return model, tiny_tokenizer()
    return arch_model(kind), (tiny_tokenizer() if kind == "mistral" else qwen_tokenizer())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-names")
    out = {}
    for kind in KINDS:
        model, tok = build(kind)
        config = model.config
        quantize_model(model, QUANT, progress=False)
        save_checkpoint(model, tok, root / kind, {"source_model": "tiny"})
        export_gguf(root / kind, root / f"{kind}.gguf", progress=False)
        out[kind] = {"config": config, "ckpt": root / kind, "gguf": read_gguf(root / f"{kind}.gguf")}
    return out


def fp16(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("kind", KINDS)
def test_tensors_round_trip(exported, kind):
    e = exported[kind]
    g = e["gguf"]
    names = tensor_map(g.metadata(), g.tensors)
    assert list(names) == g.names()
    model = load(e["ckpt"])
    state = load_file(str(e["ckpt"] / "model.safetensors"))
    layers = json.loads((e["ckpt"] / "qalora.json").read_text())["layers"]
    # the mapped names are exactly the checkpoint's weights (quantized layers as "<module>.weight")
    assert {t.hf_name for t in names.values()} == {f"{m}.weight" for m in layers} | {
        k for k in state if not k.endswith((".qweight", ".scale", ".offset"))}
    permuted, types = set(), {}
    for name, t in names.items():
        info = g.tensor_info(name)
        types[info.type_name] = types.get(info.type_name, 0) + 1
        module = t.hf_name.rsplit(".", 1)[0]
        if info.type_name == "Q4_1":
            qw = model.get_submodule(module).quantized_weight()
            codes, scale, offset = qw.codes().numpy(), qw.scale.numpy(), qw.offset.numpy()
            dec = g.decoded(name)
            np.testing.assert_array_equal(t.apply(dec.codes), codes)
            np.testing.assert_array_equal(t.apply(dec.scale), fp16(scale))
            np.testing.assert_array_equal(t.apply(dec.offset), fp16(offset))
            want = (np.repeat(fp16(scale), 32, axis=1) * codes.astype(np.float32)) + np.repeat(fp16(offset), 32, axis=1)
            w = dequantize(dec)
            np.testing.assert_array_equal(t.apply(w), want)          # reorder after dequantizing
            np.testing.assert_array_equal(dequantize(reordered(dec, t)), want)   # ... or before: same
        else:
            ref = state[t.hf_name].float().numpy()
            if info.type_name == "F16":
                ref = fp16(ref)
            else:
                assert info.type_name == "F32", name
            np.testing.assert_array_equal(t.apply(g.float_array(name)), ref)
            w = g.float_array(name)
        if t.row_order is not None:
            permuted.add(name.split(".", 2)[2])
            assert not np.array_equal(w, t.apply(w))  # the reorder is not the identity
    assert types["Q4_1"] == 7 * e["config"].num_hidden_layers and set(types) <= {"Q4_1", "F32", "F16"}
    has_bias = kind == "llama_bias"
    expect = {"attn_q.weight", "attn_k.weight", *(["attn_q.bias", "attn_k.bias"] if has_bias else [])}
    assert permuted == (expect if kind.startswith(("llama", "mistral")) else set())


def reordered(dec, t: HFTensor):
    """``dec`` with codes, scales and offsets reordered by ``t`` (block structure untouched)."""
    return dataclasses.replace(dec, codes=t.apply(dec.codes), scale=t.apply(dec.scale), offset=t.apply(dec.offset))


CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps", "rope_parameters", "vocab_size", "tie_word_embeddings",
                 "max_position_embeddings", "eos_token_id", "bos_token_id", "hidden_act")


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip_and_logits(exported, kind, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    e = exported[kind]
    g, original = e["gguf"], e["config"]
    d = hf_config_dict(g.metadata(), g.names())
    (tmp_path / "config.json").write_text(json.dumps(d))  # JSON-serialisable, read by transformers
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == ("llama" if kind == "mistral" else original.model_type)
    assert type(config).__name__ == {"mistral": "LlamaConfig"}.get(kind, type(original).__name__)
    for field in CONFIG_FIELDS:
        assert getattr(config, field) == getattr(original, field), field
    assert config.head_dim == (getattr(original, "head_dim", None) or original.hidden_size // original.num_attention_heads)
    if kind.startswith("llama"):
        assert (config.attention_bias, config.mlp_bias) == (original.attention_bias, original.mlp_bias)

    # a transformers model of that config, with the mapped GGUF weights, runs like qalora's
    names = tensor_map(g.metadata(), g.tensors)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        ids = torch.tensor([IDS])
        ref = load(e["ckpt"], kernel="dense")(ids).logits[0]
        errs = {}
        for use_order in (True, False):
            state = {t.hf_name: torch.from_numpy(np.ascontiguousarray(
                (t.apply if use_order else (lambda x: x))(dense(g, n)))) for n, t in names.items()}
            missing, unexpected = hf.load_state_dict(state, strict=False)
            assert unexpected == [] and set(missing) <= {"lm_head.weight"} and config.tie_word_embeddings == bool(missing)
            if config.tie_word_embeddings:
                assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
            errs[use_order] = float((hf(ids).logits[0] - ref).norm() / ref.norm())
    # fp16 rounding of d, m (and F16 embeddings) moves the logits by ~1e-3 relative
    assert errs[True] < 5e-3, errs   # measured 4e-4 .. 2e-3
    if kind.startswith(("llama", "mistral")):
        assert errs[False] > 10 * errs[True], errs   # measured 0.05 .. 0.28
    else:
        assert errs[False] == errs[True]


def dense(g, name) -> np.ndarray:
    info = g.tensor_info(name)
    return dequantize(g.decoded(name)) if info.type_name == "Q4_1" else g.float_array(name)


# ----------------------------------------------------------------------------------- rotary rule

@pytest.mark.parametrize("rows, heads", [(64, 4), (32, 2), (16, 1), (576, 9), (192, 3)])
def test_row_order_inverts_exporter_and_matches_transformers_loader(rows, heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    order = inverse_rotary_order(rows, heads)
    forward = rotary_row_order(rows, heads)                       # the exporter: gguf = hf[forward]
    hf = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
    np.testing.assert_array_equal(hf[forward][order], hf)        # hf = gguf[order]
    np.testing.assert_array_equal(forward[order], np.arange(rows))
    # transformers' own GGUF loader (llama.cpp's permute undone) agrees on the dense matrix
    back = LlamaTensorProcessor()._reverse_permute_weights(hf[forward], heads)
    np.testing.assert_array_equal(back, hf)
    with pytest.raises(ValueError):
        order[0] = 1  # read-only: shared by every tensor of that shape


def meta(arch="llama", layers=2, heads=4, kv=2, hidden=64, **extra):
    m = {"general.architecture": arch, f"{arch}.block_count": layers, f"{arch}.embedding_length": hidden,
         f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv,
         f"{arch}.feed_forward_length": 128, f"{arch}.context_length": 256,
         f"{arch}.attention.layer_norm_rms_epsilon": float(np.float32(1e-5)), f"{arch}.vocab_size": 300}
    return {**m, **extra}


def full_names(arch, layers=2, tied=True, extra=()):
    spec = next(a for a in ARCHS.values() if a.name == arch)
    block = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
             "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", *spec.required, *extra]
    return ["token_embd.weight", "output_norm.weight", *([] if tied else ["output.weight"]),
            *(f"blk.{i}.{p}" for i in range(layers) for p in block)]


@pytest.mark.parametrize("arch, extra", [("llama", ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias",
                                                     "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")),
                                          ("qwen2", ()), ("qwen3", ())])
def test_names_agree_with_exporter_name_table(arch, extra):
    """Every mapping is the one the exporter's gguf-py TensorNameMap gives for the HF name, and
    the rotary rows are exactly the exporter's ``rotary_heads`` (llama Q/K only)."""
    spec = next(a for a in ARCHS.values() if a.name == arch)
    names = full_names(arch, tied=False, extra=extra)
    mapped = tensor_map(meta(arch), names)
    table = gguf.get_tensor_name_map(spec.arch, 2)
    for name, t in mapped.items():
        assert table.get_name(t.hf_name, try_suffixes=(".weight", ".bias")) == name, t.hf_name
        part = name.split(".", 2)[-1]
        rotary = arch == "llama" and part.split(".")[0] in ("attn_q", "attn_k")
        assert (t.row_order is not None) == rotary, name
        if rotary:
            heads = 4 if part.startswith("attn_q") else 2
            assert t.row_order is inverse_rotary_order(heads * 16, heads)
    if arch == "qwen3":
        assert mapped["blk.1.attn_k_norm.weight"].hf_name == "model.layers.1.self_attn.k_norm.weight"
    if arch == "qwen2":
        assert mapped["blk.0.attn_v.bias"].hf_name == "model.layers.0.self_attn.v_proj.bias"
    config = hf_config_dict(meta(arch), names)
    assert config["model_type"] == arch and config["tie_word_embeddings"] is False
    assert config["rms_norm_eps"] == 1e-5 and config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_head_dim_from_key_length_and_shapes_checked():
    m = meta("llama", heads=4, kv=2, **{"llama.attention.key_length": 32, "llama.attention.value_length": 32})
    names = dict.fromkeys(full_names("llama"), (64, 64))
    names["blk.0.attn_q.weight"], names["blk.0.attn_k.weight"] = (128, 64), (64, 64)
    names["blk.1.attn_q.weight"], names["blk.1.attn_k.weight"] = (128, 64), (64, 64)
    mapped = tensor_map(m, names)
    assert len(mapped["blk.0.attn_q.weight"].row_order) == 128 and len(mapped["blk.0.attn_k.weight"].row_order) == 64
    assert hf_config_dict(m)["head_dim"] == 32 and "tie_word_embeddings" not in hf_config_dict(m)
    names["blk.1.attn_k.weight"] = (32, 64)
    one_line_error("'blk.1.attn_k.weight' has shape (32, 64); 2 heads of 32 need 64 rows", tensor_map, m, names)


# ----------------------------------------------------------------------------------- refusals

def one_line_error(match, fn, *args):
    with pytest.raises(ValueError) as e:
        fn(*args)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("fn", [hf_config_dict, tensor_map])
def test_unknown_architecture(fn):
    args = (meta("gemma"),) if fn is hf_config_dict else (meta("gemma"), full_names("llama"))
    one_line_error("GGUF architecture 'gemma' is not supported; supported: llama, qwen2, qwen3", fn, *args)


@pytest.mark.parametrize("arch, bad", [("llama", "blk.0.attn_q_norm.weight"), ("llama", "rope_freqs.weight"),
                                       ("llama", "blk.2.attn_q.weight"), ("llama", "blk.01.attn_q.weight"),
                                       ("qwen3", "blk.0.attn_q.bias"), ("qwen2", "blk.1.attn_output.bias"),
                                       ("qwen2", "output.bias")])
def test_unknown_tensor(arch, bad):
    one_line_error(f"GGUF tensor {bad!r} is not read by the {arch} architecture", tensor_map, meta(arch),
                   [*full_names(arch), bad])


def test_missing_tensor_and_metadata_refusals():
    names = [n for n in full_names("qwen2") if n != "blk.1.attn_k.bias"]
    one_line_error("lacks tensor 'blk.1.attn_k.bias' (1 missing), which the qwen2 architecture requires",
                   tensor_map, meta("qwen2"), names)
    cases = [({"llama.rope.scaling.type": "yarn"}, "rope.scaling.type 'yarn' is not supported"),
             ({"llama.rope.scaling.type": "linear"}, "linear RoPE scaling without a positive"),
             ({"tokenizer.ggml.tokens": ["a"] * 7}, "vocab_size 300 differs from the 7 tokens"),
             ({"llama.rope.dimension_count": 8}, "partial rotary"),
             ({"llama.attention.head_count_kv": [2, 1]}, "varies per layer"),
             ({"llama.attention.head_count_kv": 3}, "not a multiple of head_count_kv 3")]
    for extra, match in cases:
        one_line_error(match, hf_config_dict, meta("llama", **extra))
    m = meta("llama")
    del m["llama.feed_forward_length"]
    one_line_error("lacks llama.feed_forward_length", hf_config_dict, m)
    linear = hf_config_dict(meta("llama", **{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
                                            "llama.attention.head_count_kv": [2, 2]}))
    assert linear["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert linear["num_key_value_heads"] == 2
