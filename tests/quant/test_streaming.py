"""Quantizing from a folder one decoder layer at a time gives the very tensors of quantizing the
whole loaded model, never holds more than one fp32 layer, and refuses broken folders in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from qalora.api import quantize
from qalora.checkpoint import save_checkpoint
from qalora.config import QuantConfig
from qalora.data.text import calibration_batch
from qalora.errors import QaloraError
from qalora.models import load_fp_model, load_fp_skeleton
from qalora.nn.quant_linear import QuantLinear
from qalora.patch import decoder_layers
from qalora.quant.model import quantize_model
from qalora.quant.streaming import TensorSource
from tests.conftest import tiny_llama


def _untied(seed=1):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _folder(tmp_path, model, tok, shard: str | None = None):
    d = tmp_path / "fp"
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(d)
    return d


def _whole(folder, config, tmp_path):
    """The reference: load the whole fp32 model, quantize it, write it."""
    fp, tok, _ = load_fp_model(folder)
    calib = None
    if config.method == "gptq":
        calib = calibration_batch(tok, n_samples=config.calib_samples, seq_len=config.calib_seq_len, seed=config.seed)
    quantize_model(fp, config, calib, progress=False)
    save_checkpoint(fp, tok, tmp_path / "whole", {"reference": True})
    return load_file(tmp_path / "whole" / "model.safetensors")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("build,shard", [(tiny_llama, None), (_untied, "40KB")], ids=["tied", "untied-sharded"])
def test_streamed_quantize_equals_whole_model(tmp_path, tiny_tok, method, build, shard):
    folder = _folder(tmp_path, build(), tiny_tok, shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    config = QuantConfig(bits=3, group_size=32, method=method, calib_samples=4, calib_seq_len=32)
    quantize(folder, tmp_path / "streamed", config, progress=False)
    got = load_file(tmp_path / "streamed" / "model.safetensors")
    want = _whole(folder, config, tmp_path)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    a = json.loads((tmp_path / "streamed" / "config.json").read_text())
    b = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert a == b


def test_at_most_one_fp32_layer_is_alive(tmp_path, tiny_tok):
    folder = _folder(tmp_path, _untied(), tiny_tok)
    model, _, _, load_layer = load_fp_skeleton(folder)
    layers = decoder_layers(model)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert model.lm_head.weight.device.type == "cpu" and model.model.embed_tokens.weight.device.type == "cpu"
    seen = []

    def watch(i, layer):
        for j, other in enumerate(layers):
            dense = [n for n, m in other.named_modules() if isinstance(m, torch.nn.Linear)]
            if j < i:
                assert not dense, f"layer {j} still holds fp32 linears {dense[:2]} when layer {i} is read"
            if j > i:
                assert all(p.device.type == "meta" for p in other.parameters()), f"layer {j} read before its turn"
        load_layer(i, layer)
        seen.append(i)

    quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False, load_layer=watch)
    assert seen == [0, 1, 2]
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 3 * 7


def test_broken_folders_refused(tmp_path, tiny_tok):
    folder = _folder(tmp_path, _untied(), tiny_tok, "40KB")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[-1]
    (folder / shard).rename(folder / "gone.safetensors")
    with pytest.raises(QaloraError, match="shard .* is missing"):
        TensorSource(folder)
    (folder / "gone.safetensors").rename(folder / shard)
    index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(QaloraError, match="no weight_map"):
        TensorSource(folder)
    index.unlink()
    with pytest.raises(QaloraError, match="neither model.safetensors"):
        TensorSource(folder)
    (folder / shard).write_bytes(b"not safetensors")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(QaloraError, match="has no tensor 'model.embed_tokens.weight'"):
        load_fp_skeleton(folder)


def test_wrong_shape_in_folder_refused(tmp_path, tiny_tok):
    folder = _folder(tmp_path, _untied(), tiny_tok)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    model, _, _, load_layer = load_fp_skeleton(folder)
    with pytest.raises(QaloraError, match=r"model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\)"):
        load_layer(0, decoder_layers(model)[0])


def test_reader_matches_safetensors_for_every_dtype(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {"bf16": torch.randn(3, 5).bfloat16(), "f16": torch.randn(7).half(), "f64": torch.randn(2, 2).double(),
               "i64": torch.arange(6).reshape(2, 3), "u8": torch.randint(0, 255, (4, 4), dtype=torch.uint8),
               "bool": torch.rand(5) > 0.5, "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = TensorSource(tmp_path)
    for name, t in tensors.items():
        got = source.get(name, t.dtype if t.is_floating_point() else torch.float32)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    assert torch.equal(source.get("bf16"), tensors["bf16"].float())  # floating tensors convert on request
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(QaloraError, match="lies outside the file"):
        TensorSource(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(QaloraError, match="not a readable safetensors file"):
        TensorSource(tmp_path)
