"""GGUF files: layout read through gguf-py, decoding via gguf_types, byte-identical write-back."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qalora.formats.gguf_file import read_gguf, write_like
from qalora.formats.gguf_types import GGUF_TYPES, dequantize, encode

ROWS = 3
QUANTIZED = {"blk.q4_0": ("Q4_0", 256), "blk.q4_1": ("Q4_1", 512), "blk.q5_0": ("Q5_0", 256),
             "blk.q8_0": ("Q8_0", 512)}
RANDOM_K = {"blk.q4_k": ("Q4_K", 512), "blk.q6_k": ("Q6_K", 256)}
FP16_AT = {"Q4_K": [0, 2], "Q6_K": [208]}  # byte offsets of the fp16 fields inside one block
UNSUPPORTED = {"blk.q8_1": ("Q8_1", 64), "blk.iq4_nl": ("IQ4_NL", 64)}
META = {"general.name": "tiny", "tiny.context_length": 128, "tiny.rope_theta": 0.25,
        "tokenizer.tokens": ["<s>", "a", "bc"], "tiny.flag": True}


def _random_k(type_name: str, cols: int, seed: int) -> np.ndarray:
    bw, bb = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(ROWS, cols // bw, bb), dtype=np.uint8)
    for at in FP16_AT[type_name]:
        vals = (rng.standard_normal((ROWS, cols // bw)) * 1e-3).astype("<f2")
        blocks[..., at:at + 2] = vals[..., None].view(np.uint8)
    return blocks.reshape(ROWS, -1)


def _build(path) -> dict:
    """Write a small GGUF at ``path``; return name → (type name, logical shape, written array)."""
    rng = np.random.default_rng(0)
    built = {}
    w = GGUFWriter(path, "tiny")
    w.add_string("general.name", META["general.name"])
    w.add_uint32("tiny.context_length", META["tiny.context_length"])
    w.add_float32("tiny.rope_theta", META["tiny.rope_theta"])
    w.add_array("tokenizer.tokens", META["tokenizer.tokens"])
    w.add_bool("tiny.flag", META["tiny.flag"])

    def add(name, type_name, shape, data, raw_dtype=None):
        w.add_tensor(name, data, raw_dtype=raw_dtype)
        built[name] = (type_name, shape, data)

    add("norm.weight", "F32", (5,), rng.standard_normal(5).astype(np.float32))
    add("embd.f16", "F16", (ROWS, 40), rng.standard_normal((ROWS, 40)).astype(np.float16))
    bf16 = gguf_quantize(rng.standard_normal((ROWS, 24)).astype(np.float32), GGMLQuantizationType.BF16)
    add("embd.bf16", "BF16", (ROWS, 24), bf16, GGMLQuantizationType.BF16)
    for name, (t, cols) in QUANTIZED.items():
        raw = gguf_quantize((rng.standard_normal((ROWS, cols)) * 0.02).astype(np.float32), GGMLQuantizationType[t])
        add(name, t, (ROWS, cols), raw, GGMLQuantizationType[t])
    for i, (name, (t, cols)) in enumerate(RANDOM_K.items()):
        add(name, t, (ROWS, cols), _random_k(t, cols, seed=i + 1), GGMLQuantizationType[t])
    for name, (t, cols) in UNSUPPORTED.items():
        bw, bb = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
        add(name, t, (ROWS, cols), rng.integers(0, 256, (ROWS, cols // bw * bb), dtype=np.uint8),
            GGMLQuantizationType[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return built


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, _build(path)


def _one_line_error(excinfo, *must_contain):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 240, msg
    for part in must_contain:
        assert str(part) in msg, msg


def test_layout_matches_what_was_written(model):
    path, built = model
    g = read_gguf(path)
    assert g.names() == list(built)
    for name, (t, shape, data) in built.items():
        info = g.tensor_info(name)
        assert (info.type_name, info.shape) == (t, shape)
        assert info.cols == shape[-1] and info.rows == (shape[0] if len(shape) == 2 else 1)
        assert info.nbytes == data.nbytes and info.offset % g.alignment == 0
        assert g.raw(name).tobytes() == data.tobytes()
    assert g.metadata() == {"general.architecture": "tiny", **META}


def test_decoded_matches_gguf_dequantize(model):
    path, built = model
    g = read_gguf(path)
    for name in [*QUANTIZED, *RANDOM_K]:
        t, (rows, cols), raw = built[name]
        dec = g.decoded(name)
        bt = GGUF_TYPES[t]
        assert dec.type_name == t and dec.codes.shape == (rows, cols)
        assert np.array_equal(dequantize(dec), gguf_dequantize(raw, bt.ggml_type))
        assert encode(t, dec.codes, dec.source).tobytes() == raw.tobytes()


def test_float_array_is_exact(model):
    path, built = model
    g = read_gguf(path)
    assert np.array_equal(g.float_array("norm.weight"), built["norm.weight"][2])
    f16 = g.float_array("embd.f16")
    assert f16.dtype == np.float32 and np.array_equal(f16, built["embd.f16"][2].astype(np.float32))
    bf16 = g.float_array("embd.bf16")
    assert bf16.shape == (ROWS, 24)
    assert np.array_equal(bf16, gguf_dequantize(built["embd.bf16"][2], GGMLQuantizationType.BF16))


def test_write_like_without_changes_is_identical(model, tmp_path):
    path, _ = model
    out = tmp_path / "copy.gguf"
    write_like(path, out, {})
    assert out.read_bytes() == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["copy.gguf"]  # no temp file left behind


@pytest.mark.parametrize("name", ["blk.q4_1", "blk.q6_k"])
def test_write_like_replaces_only_that_tensor(model, tmp_path, name):
    path, built = model
    src = read_gguf(path)
    dec = src.decoded(name)
    top = (1 << GGUF_TYPES[dec.type_name].bits) - 1
    codes = dec.codes.copy()
    bump = (np.arange(codes.size).reshape(codes.shape) % 3 == 0) & (codes < top)
    codes[bump] += 1
    out = tmp_path / "tuned.gguf"
    write_like(src, out, {name: encode(dec.type_name, codes, dec.source)})

    assert out.stat().st_size == path.stat().st_size
    new = read_gguf(out)
    assert np.array_equal(new.decoded(name).codes, codes) and bump.any()
    assert new.metadata() == src.metadata() and new.tensors == src.tensors
    for other in src.names():
        if other != name:
            assert new.raw(other).tobytes() == src.raw(other).tobytes()
    a, b, info = path.read_bytes(), out.read_bytes(), src.tensor_info(name)
    assert a[:info.offset] == b[:info.offset] and a[info.offset + info.nbytes:] == b[info.offset + info.nbytes:]


def test_write_like_refuses_bad_requests(model, tmp_path):
    path, _ = model
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError) as e:
        write_like(path, out, {"nope": np.zeros(4, np.uint8)})
    _one_line_error(e, "nope")
    with pytest.raises(ValueError) as e:
        write_like(path, out, {"blk.q4_0": np.zeros(7, np.uint8)})
    _one_line_error(e, "blk.q4_0", "7")
    with pytest.raises(ValueError) as e:
        write_like(path, out, {"blk.q4_0": np.zeros(read_gguf(path).tensor_info("blk.q4_0").nbytes, np.int8)})
    _one_line_error(e, "blk.q4_0", "uint8")
    assert list(tmp_path.iterdir()) == []
    before = path.read_bytes()
    with pytest.raises(ValueError) as e:
        write_like(path, path, {})
    _one_line_error(e, path)
    with pytest.raises(ValueError) as e:
        write_like(path, path.parent / "." / path.name, {})
    assert path.read_bytes() == before


def test_unsupported_types_are_named(model):
    path, _ = model
    g = read_gguf(path)
    for name, (t, _) in UNSUPPORTED.items():
        with pytest.raises(ValueError) as e:
            g.decoded(name)
        _one_line_error(e, name, t, "Q4_K")
        assert len(str(e.value)) < 200
    with pytest.raises(ValueError) as e:
        g.decoded("embd.f16")
    _one_line_error(e, "embd.f16", "F16")
    with pytest.raises(ValueError) as e:
        g.float_array("blk.q8_0")
    _one_line_error(e, "blk.q8_0", "Q8_0", "BF16")
    with pytest.raises(ValueError) as e:
        g.tensor_info("missing")
    _one_line_error(e, "missing", path)


def test_bad_files_are_refused_in_one_line(model, tmp_path):
    path, _ = model
    data = path.read_bytes()
    cases = {"missing.gguf": None, "empty.gguf": b"", "magic.gguf": b"GGML" + data[4:],
             "tiny.gguf": data[:3], "half.gguf": data[:len(data) // 2],
             "header.gguf": data[:GGUFReader(path).data_offset - 7]}
    for fname, content in cases.items():
        p = tmp_path / fname
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(ValueError) as e:
            read_gguf(p)
        _one_line_error(e, p, "expected")
        out = tmp_path / f"out-{fname}"
        with pytest.raises(ValueError):
            write_like(p, out, {})
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, c in cases.items() if c is not None)


def test_data_cut_after_reading_is_reported(model, tmp_path):
    path, _ = model
    p = tmp_path / "shrinks.gguf"
    p.write_bytes(path.read_bytes())
    g = read_gguf(p)
    last = g.names()[-1]
    p.write_bytes(path.read_bytes()[:g.tensor_info(last).offset + 1])
    with pytest.raises(ValueError) as e:
        g.raw(last)
    _one_line_error(e, last, p)


@pytest.mark.embedded
def test_the_embedded_gguf_reads_exactly_and_writes_back_byte_for_byte(tmp_path):
    """The shipped SmolLM2 Q4_1 file: every quantized tensor decodes to gguf-py's own values, and
    re-encodes to its bytes; a write-back with nothing replaced is the same file."""
    from pathlib import Path

    from qalora.default_model import gguf_path

    src = gguf_path()
    g = read_gguf(src)
    quantized = [n for n in g.names() if g.tensor_info(n).type_name in GGUF_TYPES]
    assert len(quantized) >= 200
    for name in quantized[:12] + quantized[-3:]:
        info, raw = g.tensor_info(name), g.raw(name)
        d = g.decoded(name)
        ref = gguf_dequantize(raw, GGMLQuantizationType[info.type_name]).reshape(info.rows, info.cols)
        assert np.array_equal(dequantize(d), ref.astype(np.float32)), name
        assert np.array_equal(encode(d.type_name, d.codes, d.source).reshape(-1), raw.reshape(-1)), name
    write_like(src, tmp_path / "same.gguf", {})
    assert (tmp_path / "same.gguf").read_bytes() == Path(src).read_bytes()
