"""Every exact kind's merged model exports to GGUF (and, with torchao installed, to the
transformers folder) unchanged: the stored form is canonical, so the exporters read the merged
codes, scales and offsets like any quantized checkpoint's."""

import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from qalora.adapters.attach import adapter_layers, add_adapters
from qalora.checkpoint import load, save_checkpoint
from qalora.config import LoraConfig, QuantConfig
from qalora.export.gguf import export_gguf
from qalora.export.gguf_blocks import rotary_row_order
from qalora.merging.surgery import merge_model_inplace
from qalora.quant.model import quantize_model

METHODS = {"qalora+scales": ("qalora", {"train_scales": True}), "peqa": ("peqa", {}),
           "lota+qalora": ("lota", {"with_qalora": True, "lota_omega": 1.0})}


def merged_checkpoint(method, switches, path):
    model, tok = tiny_llama(), tiny_tokenizer()
    quantize_model(model, QuantConfig(bits=3, group_size=32, method="rtn"), progress=False)
    torch.manual_seed(0)
    add_adapters(model, method, LoraConfig(rank=4, alpha=8, **switches))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for key, p in layer.adapter_parameters().items():
                if key in ("lora_B.weight", "log_scale"):
                    p.normal_(0, 0.05, generator=g)
                elif key == "lota_B":
                    p.copy_(torch.randint(-1, 2, p.shape, generator=g).float())
    merge_model_inplace(model)
    save_checkpoint(model, tok, path, {"source_model": "tiny"})
    return path


@pytest.mark.parametrize("name", list(METHODS))
def test_gguf_holds_every_merged_kind(name, tmp_path):
    method, switches = METHODS[name]
    ckpt = merged_checkpoint(method, switches, tmp_path / "m")
    report = export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    assert report["fallback"] == {} and report["tensor_types"]["Q4_1"] == 14
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    model = load(ckpt)
    m = model.get_submodule("model.layers.1.self_attn.q_proj")
    w = gguf.quants.dequantize(tensors["blk.1.attn_q.weight"].data, gguf.GGMLQuantizationType.Q4_1)
    w = w[np.argsort(rotary_row_order(w.shape[0], 4))]
    qw = m.quantized_weight()
    d = qw.scale.half().float().repeat_interleave(32, dim=1)
    o = qw.offset.half().float().repeat_interleave(32, dim=1)
    # exact: llama.cpp's blocks hold the merged codes with fp16(scale), fp16(offset)
    np.testing.assert_array_equal(w, (d * qw.codes().float() + o).numpy())


def test_torchao_holds_a_lota_merge(tmp_path):
    pytest.importorskip("torchao")
    from qalora.export.torchao import export_torchao

    ckpt = merged_checkpoint("lota", {"with_qalora": True, "lota_omega": 1.0}, tmp_path / "m")
    report = export_torchao(ckpt, tmp_path / "ao", progress=False)
    assert report["quantized_layers"] == 14 and report["max_abs_error"] <= 1e-6  # fp32 rounding of the zero point
