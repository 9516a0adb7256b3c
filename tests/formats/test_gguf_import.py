"""GGUF import → qalora checkpoint → GGUF export "like" the source, on the embedded SmolLM2 Q4_1 file.

One import per module (~15 s); every test reads that checkpoint. Exactness is bit for bit
(``torch.equal`` / byte comparison) except the logits against transformers' own GGUF load.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from qalora.checkpoint import load
from qalora.errors import QaloraError
from qalora.formats.gguf_file import read_gguf
from qalora.formats.gguf_import import (SOURCE_FILE, STORAGE_FILE, export_like, import_gguf,
                                        save_imported)
from qalora.formats.gguf_names import inverse_rotary_order
from qalora.quant.packing import pack

pytestmark = [pytest.mark.embedded, pytest.mark.usefixtures("one_thread")]

# HF module -> (GGUF tensor, rotary heads or None); SmolLM2-135M: 9 heads, 3 kv heads of 64
CHECKED = {"model.layers.0.self_attn.q_proj": ("blk.0.attn_q.weight", 9),
           "model.layers.7.self_attn.k_proj": ("blk.7.attn_k.weight", 3),
           "model.layers.13.self_attn.v_proj": ("blk.13.attn_v.weight", None),
           "model.layers.29.mlp.down_proj": ("blk.29.ffn_down.weight", None)}


@pytest.fixture(scope="module")
def src():
    from qalora.default_model import gguf_path

    return gguf_path()


@pytest.fixture(scope="module")
def ckpt(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_import") / "ckpt"
    meta = import_gguf(src, out)
    assert meta["method"] == "gguf-import" and meta["gguf_types"] == {"Q4_1": 210}
    assert (meta["bits"], meta["group_size"]) == (4, 32)
    return out


def _gguf_weight(g, name: str, heads) -> torch.Tensor:
    """gguf-py's own dequantization of ``name``, rows put in HF order."""
    info = g.tensor_info(name)
    w = gguf_dequantize(g.raw(name).reshape(info.rows, -1), GGMLQuantizationType[info.type_name])
    if heads is not None:
        w = w[inverse_rotary_order(info.rows, heads)]
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))


def test_layers_equal_gguf_py_bit_for_bit(ckpt, src):
    model = load(ckpt, kernel="reference")
    g = read_gguf(src)
    for module, (name, heads) in CHECKED.items():
        layer = model.get_submodule(module)
        assert torch.equal(layer.quantized_weight().dequantize(), _gguf_weight(g, name, heads)), module
    side = json.loads((ckpt / SOURCE_FILE).read_text())
    assert side["layers"]["model.layers.0.self_attn.q_proj"]["row_order"] == {"kind": "rotary", "heads": 9}
    assert side["layers"]["model.layers.0.self_attn.v_proj"]["row_order"] is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, no output.weight
    emb = gguf_dequantize(g.raw("token_embd.weight").reshape(49152, -1), GGMLQuantizationType.Q8_0)
    assert np.array_equal(model.model.embed_tokens.weight.detach().numpy(), emb)  # == : ±0.0 may differ (Q8_0)


def test_logits_match_transformers_gguf_load(ckpt, src):
    from transformers import AutoModelForCausalLM

    ours = load(ckpt, kernel="reference")
    ref = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    ref_state = ref.state_dict()
    for name, t in ours.state_dict().items():  # norms and embeddings: the same floats
        if name in ref_state:
            assert torch.equal(t, ref_state[name]), name
    for name, m in ours.named_modules():  # all 210 projections: the same dequantized values
        if hasattr(m, "qweight"):
            assert torch.equal(m.quantized_weight().dequantize(), ref_state[f"{name}.weight"]), name
    ids = torch.tensor([[1, 504, 3458, 282, 4670, 314, 29, 6431, 30, 2]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    # Every weight is bit-identical (above); only the matmul path differs (QuantLinear's reference
    # kernel vs nn.Linear). Measured with one thread: max |a - b| = 0.0 (logits up to ~31). The
    # tolerance leaves room for another GEMM blocking/summation order, fp32 noise ~1e-6 relative.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_export_without_training_is_byte_identical(ckpt, src, tmp_path):
    out = tmp_path / "same.gguf"
    report = export_like(ckpt, src, out)
    assert report["rewritten"] == [] and report["kept"] == 272
    assert out.read_bytes() == src.read_bytes()


def _bump_codes(model, module: str) -> torch.Tensor:
    """Codes +1 where below 15 in the first 40 rows of ``module``; returns the new dequantized weight."""
    layer = model.get_submodule(module)
    codes = layer.quantized_weight().codes().clone()
    head = codes[:40]
    head[head < 15] += 1
    layer.qweight = pack(codes, layer.bits)
    return layer.quantized_weight().dequantize()


def test_changed_codes_rewrite_only_that_tensor(ckpt, src, tmp_path):
    module, (name, heads) = "model.layers.0.self_attn.q_proj", CHECKED["model.layers.0.self_attn.q_proj"]
    model = load(ckpt, kernel="reference", mapped=False)
    want = _bump_codes(model, module)
    save_imported(model, None, tmp_path / "tuned", like=ckpt)
    out = tmp_path / "tuned.gguf"
    report = export_like(tmp_path / "tuned", src, out)
    assert report["rewritten"] == [name] and report["kept"] == 271
    g_src, g_out = read_gguf(src), read_gguf(out)
    assert torch.equal(_gguf_weight(g_out, name, heads), want)
    info = g_src.tensor_info(name)
    a, b = np.fromfile(src, dtype=np.uint8), np.fromfile(out, dtype=np.uint8)
    differ = np.flatnonzero(a != b)
    assert a.size == b.size and differ.size > 0
    assert info.offset <= differ.min() and differ.max() < info.offset + info.nbytes
    for other in ("blk.0.attn_k.weight", "blk.1.attn_q.weight", "token_embd.weight"):
        assert np.array_equal(g_out.raw(other), g_src.raw(other))


def test_refuses_other_source_and_unrepresentable_offset(ckpt, src, tmp_path):
    other = tmp_path / "other.gguf"
    shutil.copyfile(src, other)
    with open(other, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(QaloraError, match="SHA-256 differs") as e:
        export_like(ckpt, other, tmp_path / "x.gguf")
    assert "\n" not in str(e.value) and len(str(e.value)) < 240

    model = load(ckpt, kernel="reference", mapped=False)
    model.model.layers[4].mlp.gate_proj.offset[2, 3] += 1e-3
    save_imported(model, None, tmp_path / "moved", like=ckpt)
    with pytest.raises(QaloraError, match=r"'model\.layers\.4\.mlp\.gate_proj'.*scale/offset") as e:
        export_like(tmp_path / "moved", src, tmp_path / "y.gguf")
    assert "\n" not in str(e.value) and len(str(e.value)) < 240
    assert not (tmp_path / "y.gguf").exists()


def test_refuses_checkpoint_not_imported_or_with_edited_sidecar(ckpt, src, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    meta = json.loads((ckpt / "qalora.json").read_text())
    del meta["gguf_source"]
    (plain / "qalora.json").write_text(json.dumps(meta))
    with pytest.raises(QaloraError, match="not imported from a GGUF"):
        export_like(plain, src, tmp_path / "x.gguf")
    edited = tmp_path / "edited"
    edited.mkdir()
    shutil.copyfile(ckpt / "qalora.json", edited / "qalora.json")
    shutil.copyfile(ckpt / SOURCE_FILE, edited / SOURCE_FILE)
    (edited / STORAGE_FILE).write_bytes(b"not the storage")
    with pytest.raises(QaloraError, match=STORAGE_FILE.replace(".", r"\.")):
        export_like(edited, src, tmp_path / "x.gguf")
