"""GGUF import → qalora checkpoint → GGUF export "like" the source, for every block type but Q4_1.

``test_gguf_import`` covers the embedded SmolLM2 file (all projections Q4_1). Here a tiny llama
(hidden 256, intermediate 512, 2 layers, 4 heads / 2 kv heads of 64, vocabulary 300: every
projection's column count is a multiple of 256, as the K-quants need) is quantized, exported with
qalora's own exporter (so the tokenizer and config metadata are right), and rewritten with
``gguf.GGUFWriter`` (every key/value and every tensor copied, as gguf-py's
``scripts/gguf_new_metadata.py`` copies a file) with its 14 projections replaced by another type:

- Q4_0, Q5_0, Q5_1, Q8_0: ``gguf.quants.quantize`` of the exported Q4_1 weights, dequantized;
- Q4_K, Q5_K, Q6_K: seeded random block bytes (gguf-py has no K-quant quantizer) with finite,
  small fp16 ``d``/``dmin`` (one zero ``d``; built by ``test_gguf_types._random_raw``);
- mixed: llama.cpp's Q4_K_M-like mix: Q4_K for attn_q/k/output and ffn_gate/up, Q6_K for attn_v
  and ffn_down in block 0; block 1 has Q5_K attn_v and Q8_0 ffn_down.

Per file (one import each): every projection's ``QuantLinear`` has its type's bits/group size and
dequantizes to gguf-py's dequantization of the file's tensor, rows in HF order (llama's rotary
Q/K order undone), bit for bit up to the sign of an exact zero (for the tied-zero types gguf-py
computes ``(q - z) * d`` and qalora ``q * d + (-z * d)``, so where the weight is 0 one may be
-0.0: compared after ``x + 0.0``; measured, the raw bits differ only there, in the Q4_0, Q5_0,
Q6_K and mixed files, and are identical for the others); ``export_like`` without training
writes the file back byte for byte; logits equal transformers' own GGUF loader (which
dequantizes every type here with gguf-py).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from formats.test_gguf_types import _random_raw
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qalora.checkpoint import load, save_checkpoint
from qalora.config import QuantConfig
from qalora.export.gguf import export_gguf
from qalora.formats.gguf_file import read_gguf
from qalora.formats.gguf_import import export_like, import_gguf
from qalora.formats.gguf_names import inverse_rotary_order
from qalora.formats.gguf_types import GGUF_TYPES
from qalora.quant.model import quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HEADS, KV_HEADS = 2, 4, 2
PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}
ROTARY = {"attn_q": HEADS, "attn_k": KV_HEADS}
SIMPLE = ("Q4_0", "Q5_0", "Q5_1", "Q8_0")  # gguf.quants.quantize of real weights
KQUANT = ("Q4_K", "Q5_K", "Q6_K")          # random valid blocks
MIXED = {0: {"attn_v": "Q6_K", "ffn_down": "Q6_K"}, 1: {"attn_v": "Q5_K", "ffn_down": "Q8_0"}}
CASES = (*SIMPLE, *KQUANT, "mixed")
IDS = [[0, 5, 17, 42, 99, 150, 201, 250, 299, 7, 64, 128]]


def qtype(case: str, block: int, part: str) -> str:
    """The GGUF type of projection ``blk.<block>.<part>.weight`` in the file of ``case``."""
    return MIXED[block].get(part, "Q4_K") if case == "mixed" else case


def _projection_raw(name: str, reader_tensor, type_name: str, seed: int) -> np.ndarray:
    rows, cols = (int(d) for d in reversed(reader_tensor.shape))  # GGUF dims are innermost first
    if type_name in KQUANT:
        return _random_raw(type_name, rows, cols, seed, size=1e-4)
    w = gguf_dequantize(reader_tensor.data, reader_tensor.tensor_type).reshape(rows, cols).astype(np.float32)
    return gguf_quantize(w, GGMLQuantizationType[type_name])


def write_variant(base, out, case: str) -> None:
    """``base`` with every projection replaced by one of ``case``'s type(s), everything else copied."""
    reader = gguf.GGUFReader(base, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():  # gguf_new_metadata.copy_with_new_metadata's copy
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
    replaced = 0
    for i, t in enumerate(reader.tensors):
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in PROJ and parts[3] == "weight":
            type_name = qtype(case, int(parts[1]), parts[2])
            raw = _projection_raw(t.name, t, type_name, seed=1000 * CASES.index(case) + i)
            writer.add_tensor(t.name, raw, raw_dtype=GGMLQuantizationType[type_name])
            replaced += 1
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    assert replaced == LAYERS * len(PROJ)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-import-types")
    model = tiny_llama(hidden=256, inter=512, layers=LAYERS)
    quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(model, tiny_tokenizer(), root / "base", {"source_model": "tiny"})
    export_gguf(root / "base", root / "base.gguf", progress=False)
    folder = root / "gguf"
    folder.mkdir()
    out = {}
    for case in CASES:
        write_variant(root / "base.gguf", folder / f"{case}.gguf", case)
        out[case] = folder / f"{case}.gguf"
    return out


@pytest.fixture(scope="module", params=CASES)
def case(request, files, tmp_path_factory):
    """``(case, gguf path, imported checkpoint)``: one import per file."""
    name = request.param
    ckpt = tmp_path_factory.mktemp(f"ckpt-{name}") / "ckpt"
    meta = import_gguf(files[name], ckpt)
    types = {}
    for b in range(LAYERS):
        for part in PROJ:
            types[qtype(name, b, part)] = types.get(qtype(name, b, part), 0) + 1
    assert meta["method"] == "gguf-import" and meta["gguf_types"] == types
    main = GGUF_TYPES[max(types, key=types.get)]
    assert (meta["bits"], meta["group_size"]) == (main.bits, main.group_size)
    return name, files[name], ckpt


def _plus_zero(t: torch.Tensor) -> torch.Tensor:
    return t + 0.0  # -0.0 + 0.0 == +0.0; every other value unchanged


def test_file_has_the_case_types(case):
    name, path, _ = case
    g = read_gguf(path)
    for b in range(LAYERS):
        for part in PROJ:
            assert g.tensor_info(f"blk.{b}.{part}.weight").type_name == qtype(name, b, part)
    assert g.tensor_info("token_embd.weight").type_name == "F16" and "output.weight" not in g.tensors


def test_layers_equal_gguf_py(case):
    name, path, ckpt = case
    model = load(ckpt, kernel="reference")
    g = read_gguf(path)
    for b in range(LAYERS):
        for part, module in PROJ.items():
            tensor, type_name = f"blk.{b}.{part}.weight", qtype(name, b, part)
            layer = model.get_submodule(f"model.layers.{b}.{module}")
            bt = GGUF_TYPES[type_name]
            assert (layer.bits, layer.group_size) == (bt.bits, bt.group_size), tensor
            info = g.tensor_info(tensor)
            want = gguf_dequantize(g.raw(tensor).reshape(info.rows, -1), bt.ggml_type).astype(np.float32)
            if part in ROTARY:
                want = want[inverse_rotary_order(info.rows, ROTARY[part])]
            want = torch.from_numpy(np.ascontiguousarray(want))
            got = layer.quantized_weight().dequantize()
            assert got.dtype == torch.float32 and got.shape == want.shape, tensor
            assert torch.isfinite(want).all(), tensor
            assert torch.equal(_plus_zero(got), _plus_zero(want)), tensor


def test_export_without_training_is_byte_identical(case, tmp_path):
    name, path, ckpt = case
    out = tmp_path / f"{name}.gguf"
    report = export_like(ckpt, path, out)
    assert report["rewritten"] == [] and report["kept"] == len(read_gguf(path).tensors)
    assert out.read_bytes() == path.read_bytes()


def test_logits_match_transformers_gguf_load(case):
    from transformers import AutoModelForCausalLM

    name, path, ckpt = case
    ours = load(ckpt, kernel="reference")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ref_state = ref.state_dict()
    for module, m in ours.named_modules():  # the same dequantized weights (up to the sign of 0)
        if hasattr(m, "qweight"):
            assert torch.equal(_plus_zero(m.quantized_weight().dequantize()),
                               _plus_zero(ref_state[f"{module}.weight"])), module
    ids = torch.tensor(IDS)
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert torch.isfinite(a).all()
    # Same weights; only the matmul path differs (QuantLinear's reference kernel vs nn.Linear):
    # fp32 GEMM summation order. Measured with one thread: max |a - b| = 0.0 for every file
    # (logits up to ~6); the tolerance leaves room for another blocking, fp32 noise ~1e-6 relative.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
