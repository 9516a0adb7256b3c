"""End to end on a tiny random Llama: quantize (RTN, GPTQ) → save → load → generate."""

import json

import pytest
import torch
from conftest import assert_safetensors_exact
from torch import nn

from qalora.checkpoint import load, save_checkpoint
from qalora.config import QuantConfig
from qalora.errors import QaloraError
from qalora.nn.quant_linear import QuantLinear
from qalora.patch import quant_layers, quantized_nbytes
from qalora.quant.model import quantize_model

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (out, in) of the tiny Llama's projections (hidden 64, 2 of 4 heads for k/v, intermediate 128)
TINY_PROJ_SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
                    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
                    "mlp.down_proj": (64, 128)}
# packed bytes per row of 64 / 128 codes, from quant/packing.py's layout table
# (2-bit: 4 codes per byte, 3-bit: 8 codes per 3 bytes, 4-bit: 2 per byte, 8-bit: 1 per byte)
ROW_BYTES = {2: {64: 16, 128: 32}, 3: {64: 24, 128: 48}, 4: {64: 32, 128: 64}, 8: {64: 64, 128: 128}}


def tiny_checkpoint_table(bits: int, group_size: int = 32) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor a quantized tiny-Llama checkpoint holds: name -> (safetensors dtype, shape);
    the tied lm_head is stored once, as the embedding; rotary tables are not persistent."""
    table = {"model.embed_tokens.weight": ("F32", (300, 64)), "model.norm.weight": ("F32", (64,))}
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table[f"model.layers.{i}.{norm}.weight"] = ("F32", (64,))
        for proj, (out, inp) in TINY_PROJ_SHAPES.items():
            name = f"model.layers.{i}.{proj}"
            table[f"{name}.qweight"] = ("U8", (out, ROW_BYTES[bits][inp]))
            table[f"{name}.scale"] = table[f"{name}.offset"] = ("F32", (out, inp // group_size))
    return table


def calib_ids(n=16, t=32, vocab=300, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def layer_inputs(model, ids):
    """Inputs of every linear on ``ids``, captured with hooks on the fp model."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_swaps_every_projection(tiny_model, method):
    report = quantize_model(tiny_model, QuantConfig(bits=3, group_size=32, method=method, calib_batch_size=4),
                            calib_ids() if method == "gptq" else None, progress=False)
    layers = quant_layers(tiny_model)
    assert sorted(layers) == sorted(f"model.layers.{i}.{kind}.{p}" for i in range(2)
                                    for kind, ps in (("self_attn", PROJ[:4]), ("mlp", PROJ[4:])) for p in ps)
    assert not any(isinstance(m, nn.Linear) for n, m in tiny_model.named_modules() if n.startswith("model.layers"))
    assert isinstance(tiny_model.lm_head, nn.Linear)
    assert set(report["layer_errors"]) == set(layers)


def test_gptq_beats_rtn_on_calibration_outputs(tiny_model):
    """Per layer, GPTQ's output error on the calibration inputs is below RTN's (INT3 and INT2)."""
    import copy

    ids = calib_ids(n=32, t=64)
    for bits in (2, 3):
        rtn, gptq = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
        quantize_model(rtn, QuantConfig(bits=bits, group_size=32, method="rtn"), progress=False)
        quantize_model(gptq, QuantConfig(bits=bits, group_size=32, method="gptq", calib_batch_size=8), ids, progress=False)
        with torch.no_grad():
            ref, out_r, out_g = tiny_model(ids).logits, rtn(ids).logits, gptq(ids).logits
        err_r, err_g = (out_r - ref).pow(2).mean(), (out_g - ref).pow(2).mean()
        assert err_g < err_r, (bits, err_g.item(), err_r.item())
        # and layer by layer, on the inputs the first layer's linears actually receive
        x = layer_inputs(tiny_model, ids)
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"):
            w = tiny_model.get_submodule(name).weight
            y = x[name] @ w.t()
            e_r = (x[name] @ rtn.get_submodule(name).quantized_weight().dequantize().t() - y).pow(2).mean()
            e_g = (x[name] @ gptq.get_submodule(name).quantized_weight().dequantize().t() - y).pow(2).mean()
            assert e_g < e_r, (bits, name)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_save_load_roundtrip_and_generate(tmp_path, tiny_model, tiny_tok, bits):
    ids = calib_ids(n=8, t=32)
    quantize_model(tiny_model, QuantConfig(bits=bits, group_size=32, method="gptq", calib_batch_size=4), ids, progress=False)
    meta = save_checkpoint(tiny_model, tiny_tok, tmp_path / "q", {"bits": bits, "group_size": 32, "method": "gptq"})
    assert json.loads((tmp_path / "q" / "qalora.json").read_text())["sha256"] == meta["sha256"]
    loaded = load(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied weights stored once, re-tied
    read = load(tmp_path / "q", mapped=False)  # every tensor read into its own memory: the same model
    assert read.lm_head.weight is read.model.embed_tokens.weight
    for (k, a), (k2, b) in zip(loaded.state_dict().items(), read.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    for name, m in quant_layers(tiny_model).items():
        l2 = loaded.get_submodule(name)
        assert isinstance(l2, QuantLinear) and torch.equal(l2.qweight, m.qweight) and torch.equal(l2.offset, m.offset)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_model(ids).logits)
    out = loaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    # size, exactly: on disk every tensor's dtype and shape, packed back to back after the header
    tensor_bytes = assert_safetensors_exact(tmp_path / "q" / "model.safetensors", tiny_checkpoint_table(bits))
    # in memory: bits/8 bytes of codes per weight (rows of 64/128 hold whole packing units) + 8 per group
    sizes = quantized_nbytes(loaded)
    n = sizes["quantized_weights"]
    assert n == 2 * sum(o * i for o, i in TINY_PROJ_SHAPES.values()) == 73728
    assert sizes["quantized_bytes"] == n * bits // 8 + 2 * 4 * n // 32
    assert tensor_bytes == sizes["quantized_bytes"] + 4 * (300 * 64 + 5 * 64)  # + fp32 embedding and 5 norms


def test_no_linear_layers_refused():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)

    with pytest.raises(QaloraError, match="NoLinear has no linear layers to quantize"):
        quantize_model(NoLinear(), QuantConfig(method="rtn"), progress=False)


def test_group_size_that_does_not_divide_names_layer(tiny_model):
    with pytest.raises(QaloraError, match=r"group_size 48 does not divide in_features 64 of model.layers.0.self_attn.q_proj; use 16, 32, 64"):
        quantize_model(tiny_model, QuantConfig(bits=4, group_size=48, method="rtn"), progress=False)
    assert not quant_layers(tiny_model)  # nothing was touched


def test_gptq_needs_calibration(tiny_model):
    with pytest.raises(QaloraError, match="needs calibration"):
        quantize_model(tiny_model, QuantConfig(method="gptq"), None, progress=False)


@pytest.mark.parametrize("kwargs, match", [({"bits": 5}, "bits 5 is not supported; use one of 2, 3, 4, 8"),
                                           ({"method": "awq"}, "method 'awq' is unknown; use one of rtn, gptq"),
                                           ({"group_size": 0}, "group_size 0 is not supported")])
def test_config_validation(kwargs, match):
    with pytest.raises(QaloraError, match=match):
        QuantConfig(**kwargs)


def test_output_exists_refused_and_nothing_written(tmp_path, tiny_model, tiny_tok):
    quantize_model(tiny_model, QuantConfig(method="rtn"), progress=False)
    (tmp_path / "q").mkdir()
    with pytest.raises(QaloraError, match="already exists"):
        save_checkpoint(tiny_model, tiny_tok, tmp_path / "q", {})
    assert list((tmp_path / "q").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary folder left behind


def test_failed_save_leaves_nothing(tmp_path, tiny_model):
    quantize_model(tiny_model, QuantConfig(method="rtn"), progress=False)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tiny_model, BrokenTokenizer(), tmp_path / "q", {})
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_model, tiny_tok):
    quantize_model(tiny_model, QuantConfig(method="rtn"), progress=False)
    save_checkpoint(tiny_model, tiny_tok, tmp_path / "q", {})
    weights = tmp_path / "q" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(QaloraError, match="are corrupt"):
        load(tmp_path / "q")
    weights.write_bytes(data)
    meta = json.loads((tmp_path / "q" / "qalora.json").read_text())
    for edited in ({k: v for k, v in meta.items() if k != "sha256"}, {**meta, "sha256": {}},
                   {**meta, "sha256": {"model.safetensors": "abc"}}):
        (tmp_path / "q" / "qalora.json").write_text(json.dumps(edited))
        with pytest.raises(QaloraError, match="has no sha256 of model.safetensors; it was not written by qalora"):
            load(tmp_path / "q")  # never loaded unverified
    (tmp_path / "q" / "qalora.json").write_text(json.dumps(meta))
    weights.unlink()
    with pytest.raises(QaloraError, match="are missing"):
        load(tmp_path / "q")
    (tmp_path / "q" / "qalora.json").write_text("{not json")
    with pytest.raises(QaloraError, match="metadata .* is corrupt"):
        load(tmp_path / "q")
    with pytest.raises(QaloraError, match="is not a folder"):
        load(tmp_path / "nope")


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_decoder_families_roundtrip(tmp_path, tiny_tok, arch):
    """Qwen2 (biased q/k/v) and Mistral quantize with GPTQ, save, load and generate."""
    import transformers

    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    torch.manual_seed(0)
    cfg = cls[0](vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                 eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model = cls[1](cfg).eval()
    ids = calib_ids(n=8, t=32)
    quantize_model(model, QuantConfig(bits=4, group_size=32, method="gptq", calib_batch_size=4), ids, progress=False)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    save_checkpoint(model, tiny_tok, tmp_path / "q", {})
    loaded = load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
