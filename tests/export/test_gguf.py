"""GGUF export: Q4_1 blocks (exact up to fp16 rounding of d and m), llama.cpp's rotary row order,
a full tiny-model export read back with gguf-py, refusals, and, on the embedded SmolLM2, a
tensor-by-tensor and key-by-key comparison with the llama.cpp-made GGUF it was converted from
(every Q4_1 and F32 tensor byte for byte; what differs, and why, is listed in that test)."""

import json

import gguf
import numpy as np
import pytest
import torch

from qalora.checkpoint import load, save_checkpoint
from qalora.config import QuantConfig
from qalora.errors import QaloraError
from qalora.export.gguf import add_llama_metadata, add_tokenizer, bpe_vocab, choose_pre_tokenizer, export_gguf
from qalora.export.gguf_blocks import q4_1_blocks, q4_1_weights, rotary_row_order, to_f16
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.qparams import dequantize
from qalora.quant.model import quantize_model

Q4_1 = gguf.GGMLQuantizationType.Q4_1


def random_weight(bits, group_size, out_f=8, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = torch.rand(out_f, in_f // group_size, generator=g) * 0.02 + 1e-3
    offset = torch.randn(out_f, in_f // group_size, generator=g) * 0.1
    return codes, scale, offset


def fp16_expectation(codes, scale, offset, group_size):
    """``fp16(scale) * q + fp16(offset)`` in fp32, column by column (independent of the exporter)."""
    d = scale.half().float().repeat_interleave(group_size, dim=1)
    m = offset.half().float().repeat_interleave(group_size, dim=1)
    return (d * codes.float() + m).numpy()


def fp16_tolerance(scale, offset, bits):
    """Max |error| from rounding d and m to fp16 (relative 2**-11 each): |Δd|·q_max + |Δm|."""
    return float(2**-11 * (scale.abs().max() * (2**bits - 1) + offset.abs().max())) * 1.001


# ----------------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64])
def test_q4_1_round_trip(bits, group_size):
    codes, scale, offset = random_weight(bits, group_size, seed=bits * 100 + group_size)
    blocks = q4_1_blocks(codes, scale, offset, group_size)
    assert blocks.dtype == np.uint8 and blocks.shape == (8, 128 // 32 * 20)
    back = gguf.quants.dequantize(blocks, Q4_1)
    assert back.shape == (8, 128)
    # exact: gguf-py (like ggml) computes fp16(d) * q + fp16(m) in fp32
    np.testing.assert_array_equal(back, fp16_expectation(codes, scale, offset, group_size))
    np.testing.assert_array_equal(q4_1_weights(codes, scale, offset, group_size), back)
    # and qalora's fp32 weights, up to the fp16 rounding of d and m
    torch.testing.assert_close(torch.from_numpy(back), dequantize(codes, scale, offset, group_size),
                               rtol=0, atol=fp16_tolerance(scale, offset, bits))


def test_q4_1_byte_layout():
    q = torch.tensor([list(range(16)) + list(range(15, -1, -1))] * 2, dtype=torch.uint8)  # [2, 32]
    q = torch.cat([q, 15 - q], dim=1)                                                     # [2, 64]: two blocks
    scale = torch.tensor([[1.5, 0.25], [1.0, 2.0]])
    offset = torch.tensor([[-2.0, 0.5], [3.0, -1.0]])
    blocks = q4_1_blocks(q, scale, offset, group_size=32)
    assert blocks.shape == (2, 40)
    b = blocks[0, :20]
    assert bytes(b[:2]) == np.float16(1.5).tobytes() == b"\x00\x3e"     # d, little-endian fp16
    assert bytes(b[2:4]) == np.float16(-2.0).tobytes() == b"\x00\xc0"   # m
    assert list(b[4:]) == [j | (15 - j) << 4 for j in range(16)]         # q[j] low nibble, q[j+16] high
    second = blocks[0, 20:]                                              # block 2 of row 0 = group 1
    assert bytes(second[:4]) == np.float16(0.25).tobytes() + np.float16(0.5).tobytes()
    assert list(second[4:]) == [(15 - j) | j << 4 for j in range(16)]
    assert bytes(blocks[1, 20:24]) == np.float16(2.0).tobytes() + np.float16(-1.0).tobytes()
    # one group of 64 spans both blocks: both carry the same d and m
    wide = q4_1_blocks(q, scale[:, :1], offset[:, :1], group_size=64)
    assert bytes(wide[0, :4]) == bytes(wide[0, 20:24]) == bytes(b[:4])


def test_q4_1_refusals():
    codes, scale, offset = random_weight(4, 32)
    with pytest.raises(QaloraError, match="above Q4_1's 4-bit maximum 15.*fallback='f16'"):
        q4_1_blocks(codes.clone().fill_(200), scale, offset, 32)
    c16, s16, o16 = random_weight(4, 16)
    with pytest.raises(QaloraError, match="group_size 16.*multiple of the 32-weight Q4_1 block"):
        q4_1_blocks(c16, s16, o16, 16)
    with pytest.raises(QaloraError, match="beyond fp16's range"):
        q4_1_blocks(codes, scale * 1e7, offset, 32)
    with pytest.raises(QaloraError, match="scale has shape"):
        q4_1_blocks(codes, scale[:, :2], offset, 32)
    with pytest.raises(QaloraError, match="beyond fp16's range"):
        to_f16(torch.tensor([1e6]))


def test_rotary_row_order_is_llama_cpp_permute():
    """llama.cpp's ``LlamaModel.permute`` applied to a dense matrix moves whole rows by our order."""
    for rows, n_head in ((64, 4), (32, 2), (576, 9), (192, 3)):
        w = torch.randn(rows, 40)
        permuted = w.reshape(n_head, 2, rows // n_head // 2, 40).swapaxes(1, 2).reshape(rows, 40)
        order = rotary_row_order(rows, n_head)
        assert torch.equal(permuted, w[torch.from_numpy(order)])
        assert sorted(order) == list(range(rows))
    with pytest.raises(QaloraError):
        rotary_row_order(30, 4)


# ----------------------------------------------------------------------------------- tokenizer

def test_pre_tokenizer_table():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert choose_pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    assert choose_pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == "smollm"
    assert choose_pre_tokenizer({"pre_tokenizer": byte_level}, ("/models/SmolLM2-135M-Instruct",)) == "smollm"
    assert choose_pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}}, ("smollm",)) == "default"


def test_bpe_vocab_types_and_refusals():
    tok = {"model": {"type": "BPE", "vocab": {"a": 1, "b": 2, "<|x|>": 3}}, "decoder": {"type": "ByteLevel"},
           "added_tokens": [{"id": 3, "content": "<|x|>", "special": False}, {"id": 4, "content": "hello", "special": False},
                            {"id": 5, "content": "<s>", "special": True}]}
    tokens, types = bpe_vocab(tok, 7)
    assert tokens == ["[PAD0]", "a", "b", "<|x|>", "hello", "<s>", "[PAD6]"]
    T = gguf.TokenType
    assert types == [T.UNUSED, T.NORMAL, T.NORMAL, T.CONTROL, T.USER_DEFINED, T.CONTROL, T.UNUSED]
    with pytest.raises(QaloraError, match="token id 5"):
        bpe_vocab(tok, 5)
    with pytest.raises(QaloraError, match="byte-level BPE"):
        bpe_vocab({"model": {"type": "Unigram", "vocab": []}, "decoder": {"type": "Metaspace"}}, 5)


# ----------------------------------------------------------------------------------- metadata

def llama_config(**over):
    from types import SimpleNamespace

    base = dict(model_type="llama", hidden_act="silu", num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                head_dim=16, max_position_embeddings=256, num_hidden_layers=2, intermediate_size=128,
                rms_norm_eps=1e-5, vocab_size=300, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return SimpleNamespace(**{**base, **over})


def test_metadata_refusals_and_head_dim():
    writer = gguf.GGUFWriter(None, "llama")
    meta = add_llama_metadata(writer, llama_config(head_dim=32), "m")  # head_dim * heads != hidden
    assert meta["rope_freq_base"] == 1e6 and meta["rope_dimension_count"] == 32
    keys = set(writer.kv_data[0])
    assert {"llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count"} <= keys
    for over, match in ((dict(model_type="qwen2"), "llama-architecture"), (dict(hidden_act="gelu"), "hidden_act"),
                        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "'llama3'"),
                        (dict(rope_parameters={"full_attention": {"rope_theta": 1e4}}), "per-layer-type")):
        with pytest.raises(QaloraError, match=match):
            add_llama_metadata(gguf.GGUFWriter(None, "llama"), llama_config(**over), "m")


# ----------------------------------------------------------------------------------- full export

def make_checkpoint(model, tok, path, bits=3, group_size=32, skip=("lm_head",)):
    quantize_model(model, QuantConfig(bits=bits, group_size=group_size, method="rtn", skip=skip), progress=False)
    save_checkpoint(model, tok, path, {"source_model": "tiny"})
    return path


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


GGUF_PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}


def test_export_tiny_model(tiny_model, tiny_tok, tmp_path):
    ckpt = make_checkpoint(tiny_model, tiny_tok, tmp_path / "ckpt")
    out = tmp_path / "tiny.gguf"
    report = export_gguf(ckpt, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]  # no temp file left
    assert report["file_bytes"] == out.stat().st_size and report["fallback"] == {}
    assert report["tensor_types"] == {"Q4_1": 14, "F32": 5, "F16": 1}
    fields, tensors = read_gguf(out)

    cfg = tiny_model.config
    expect = {"general.architecture": "llama", "general.name": "ckpt", "llama.context_length": 256,
              "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 128,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
              "llama.rope.dimension_count": 16, "llama.vocab_size": 300,
              "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_1), "general.quantization_version": 2,
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.add_bos_token": False,
              "tokenizer.ggml.eos_token_id": 0}
    for key, value in expect.items():
        assert fields[key] == value, key
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)

    # tokenizer: every id's token, and the merges, as in tokenizer.json
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    assert fields["tokenizer.ggml.tokens"] == [vocab[i] for i in range(300)]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in tj["model"]["merges"]]
    assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL  # <eos>

    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in [*GGUF_PROJ.values(), "attn_norm", "ffn_norm"]}
    assert set(tensors) == names  # tied embeddings: no output.weight

    model = load(ckpt)
    heads = {"attn_q": 4, "attn_k": 2}
    for i in range(2):
        for hf, short in GGUF_PROJ.items():
            t = tensors[f"blk.{i}.{short}.weight"]
            m = model.get_submodule(f"model.layers.{i}.{hf}")
            assert isinstance(m, QuantLinear) and t.tensor_type == Q4_1
            assert list(t.shape) == [m.in_features, m.out_features]  # GGUF lists ne0 (columns) first
            w = gguf.quants.dequantize(t.data, Q4_1)
            if short in heads:  # undo llama.cpp's rotary row order
                w = w[np.argsort(rotary_row_order(w.shape[0], heads[short]))]
            qw = m.quantized_weight()
            np.testing.assert_array_equal(w, fp16_expectation(qw.codes(), qw.scale, qw.offset, 32))
            torch.testing.assert_close(torch.from_numpy(w), m.dequantized_weight(), rtol=0,
                                       atol=fp16_tolerance(qw.scale, qw.offset, 3))
            assert report["tensors"][f"blk.{i}.{short}.weight"]["max_abs_error"] <= fp16_tolerance(qw.scale, qw.offset, 3)
        for short, hf in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            t = tensors[f"blk.{i}.{short}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(t.data, model.get_submodule(f"model.layers.{i}.{hf}").weight.detach().numpy())
    np.testing.assert_array_equal(tensors["output_norm.weight"].data, model.model.norm.weight.detach().numpy())
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(emb.data, model.model.embed_tokens.weight.detach().half().numpy())


def untied_llama(seed=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "linear", "rope_theta": 50000.0, "factor": 2.0},
                      attention_bias=True, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    return model


@pytest.mark.parametrize("skip, float_type, output_type", [(("lm_head",), "f16", "F16"), (("lm_head",), "f32", "F32"),
                                                           ((), "f16", "Q4_1")])
def test_export_untied_lm_head_biases_rope_scaling(tiny_tok, tmp_path, skip, float_type, output_type):
    model = untied_llama()
    ckpt = make_checkpoint(model, tiny_tok, tmp_path / "ckpt", bits=4, skip=skip)
    report = export_gguf(ckpt, tmp_path / "m.gguf", float_type=float_type, progress=False)
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    assert fields["llama.rope.freq_base"] == 50000.0 and fields["llama.attention.head_count_kv"] == 1
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 2.0
    # biases: F32, Q and K entries in the same rotary order as their rows
    attn = model.model.layers[0].self_attn
    for short, proj, heads in (("attn_q", attn.q_proj, 2), ("attn_k", attn.k_proj, 1), ("attn_v", attn.v_proj, None)):
        b = proj.bias.detach()
        want = b[torch.from_numpy(rotary_row_order(b.shape[0], heads))] if heads else b
        assert tensors[f"blk.0.{short}.bias"].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(tensors[f"blk.0.{short}.bias"].data, want.numpy())
    out = tensors["output.weight"]
    assert out.tensor_type.name == output_type and list(out.shape) == [64, 300]
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == float_type.upper()
    np.testing.assert_array_equal(emb.data, model.model.embed_tokens.weight.detach().numpy().astype(emb.data.dtype))
    if output_type != "Q4_1":
        np.testing.assert_array_equal(out.data, model.lm_head.weight.detach().numpy().astype(out.data.dtype))
    else:
        np.testing.assert_allclose(gguf.quants.dequantize(out.data, Q4_1), model.lm_head.dequantized_weight().numpy(),
                                   rtol=0, atol=report["tensors"]["output.weight"]["max_abs_error"])


@pytest.mark.parametrize("bits, group_size, why", [(8, 32, "8-bit codes"), (4, 16, "group_size 16")])
def test_unsupported_layers_refused_or_f16_fallback(tiny_model, tiny_tok, tmp_path, bits, group_size, why):
    ckpt = make_checkpoint(tiny_model, tiny_tok, tmp_path / "ckpt", bits=bits, group_size=group_size)
    out = tmp_path / "m.gguf"
    with pytest.raises(QaloraError, match=f"{why}.*fallback='f16'"):
        export_gguf(ckpt, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written

    report = export_gguf(ckpt, out, fallback="f16", progress=False)
    assert report["tensor_types"] == {"F16": 15, "F32": 5}
    assert len(report["fallback"]) == 14 and all(why in fb["reason"] for fb in report["fallback"].values())
    _, tensors = read_gguf(out)
    model = load(ckpt)
    m = model.model.layers[1].self_attn.k_proj
    t = tensors["blk.1.attn_k.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    exact = m.dequantized_weight()[torch.from_numpy(rotary_row_order(32, 2))].numpy()  # GGUF row order
    np.testing.assert_array_equal(t.data, exact.astype(np.float16))
    err = report["fallback"]["blk.1.attn_k.weight"]["max_abs_error"]
    assert err == float(np.abs(t.data.astype(np.float32) - exact).max()) and 0 < err < 1e-3

    with pytest.raises(QaloraError, match="already exists"):
        export_gguf(ckpt, out, fallback="f16", progress=False)
    with pytest.raises(QaloraError, match="fallback 'f8' is unknown"):
        export_gguf(ckpt, tmp_path / "x.gguf", fallback="f8", progress=False)


# ----------------------------------------------------------------------------------- embedded model

@pytest.mark.embedded
def test_smollm2_tokenizer_matches_llama_cpp(embedded_dir, tmp_path):
    """The tokenizer written from the SmolLM2 folder equals the one llama.cpp's converter put in
    the shipped GGUF (the folder was rebuilt from that GGUF)."""
    from qalora.default_model import gguf_path

    writer = gguf.GGUFWriter(tmp_path / "tok.gguf", "llama")
    info = add_tokenizer(writer, embedded_dir, 49152, hints=(str(embedded_dir),))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    assert info["pre"] == "smollm" and info["tokens"] == 49152 and info["chat_template"]
    mine, _ = read_gguf(tmp_path / "tok.gguf")
    ref, _ = read_gguf(gguf_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert mine[key] == ref[key], key


# Keys of the shipped GGUF that the exporter does not reproduce: general.name is the checkpoint
# folder's name; the provenance keys llama.cpp's converter reads from the HF model card have no
# source in a qalora checkpoint; add_space_prefix is not written (false is llama.cpp's default
# for gpt2 vocabularies). Every other key of the shipped file is written with its type and value.
SHIPPED_ONLY_KEYS = {"general.organization", "general.finetune", "general.basename", "general.size_label",
                     "general.license", "general.languages", "tokenizer.ggml.add_space_prefix"}


def gguf_fields(reader):
    """``{key: (value types, value)}`` of every metadata key (the GGUF.* header counts left out)."""
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.embedded
def test_smollm2_int4_export_matches_llama_cpp_tensor_by_tensor(tmp_path):
    """SmolLM2 ships as a llama.cpp Q4_1 GGUF; our HF folder is its dequantization, on which RTN
    INT4 g32 recovers every block's d, m and codes. Exporting that checkpoint gives, against the
    shipped file: the same 272 tensor names and shapes; every Q4_1 projection (210) and F32 norm
    (61) with the same type and the very same bytes, Q/K rotary row order included; the
    embedding as F16 where the shipped one is Q8_0, equal to fp16 of the Q8_0 values exactly;
    every metadata key with the same type and value except ``general.name`` and
    ``SHIPPED_ONLY_KEYS`` (absent), and no key the shipped file lacks. The files are not
    byte-identical: the embedding type, those keys, and the key and tensor order differ."""
    import qalora
    from qalora.default_model import gguf_path

    qalora.quantize("default", tmp_path / "q4", QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    report = export_gguf(tmp_path / "q4", tmp_path / "q4.gguf", progress=False)
    assert report["tensor_types"] == {"Q4_1": 210, "F32": 61, "F16": 1}
    assert_matches_shipped(tmp_path / "q4.gguf", gguf_path(), name="q4")


def assert_matches_shipped(path, shipped, name: str) -> None:
    """The comparison of the test above, of the GGUF at ``path`` against the ``shipped`` one."""
    mine_reader, ref_reader = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(shipped))
    mine, ref = ({t.name: t for t in r.tensors} for r in (mine_reader, ref_reader))
    assert set(mine) == set(ref) and len(ref) == 272
    same = 0
    for tensor, t in ref.items():
        assert list(mine[tensor].shape) == list(t.shape), tensor
        if tensor == "token_embd.weight":
            continue
        assert mine[tensor].tensor_type == t.tensor_type, tensor
        assert mine[tensor].data.tobytes() == t.data.tobytes(), tensor
        same += 1
    assert same == 271
    emb, ref_emb = mine["token_embd.weight"], ref["token_embd.weight"]
    assert (emb.tensor_type, ref_emb.tensor_type) == (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0)
    q8 = gguf.quants.dequantize(ref_emb.data, ref_emb.tensor_type)   # fp16(d) * int8 q, in fp32
    assert np.array_equal(emb.data, q8.astype(np.float16))
    mine_fields, ref_fields = gguf_fields(mine_reader), gguf_fields(ref_reader)
    assert set(mine_fields) == set(ref_fields) - SHIPPED_ONLY_KEYS
    differ = {k for k in mine_fields if mine_fields[k] != ref_fields[k]}
    assert differ == {"general.name"} and mine_fields["general.name"][1] == name
