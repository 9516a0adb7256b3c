"""GGUF block codecs: bit-exact dequantization against gguf-py and byte-exact round trips."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qalora.formats.gguf_types import GGUF_TYPES, Decoded, decode, dequantize, encode

SIMPLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANT = ["Q4_K", "Q5_K", "Q6_K"]
# byte offsets of the fp16 fields inside one block (written out here, independent of the module)
FP16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
           "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
EXPECTED = {  # bits, group size, tied zero
    "Q4_0": (4, 32, 8), "Q4_1": (4, 32, None), "Q5_0": (5, 32, 16), "Q5_1": (5, 32, None),
    "Q8_0": (8, 32, 128), "Q4_K": (4, 32, None), "Q5_K": (5, 32, None), "Q6_K": (6, 16, 32)}
SHAPES = [(3, 256), (3, 512), (2, 64)]


def _seed(*parts) -> int:
    return sum(ord(c) for c in "".join(map(str, parts)))


def _random_raw(name: str, rows: int, cols: int, seed: int, size: float = 1e-3) -> np.ndarray:
    """Random valid block bytes, with every fp16 field overwritten by a finite value (~``size``,
    both signs). Also builds the K-quant projections of test_gguf_import_types."""
    bw, bb = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // bw, bb), dtype=np.uint8)
    for at in FP16_AT[name]:
        vals = (rng.standard_normal((rows, cols // bw)) * size).astype("<f2")
        vals[0, 0] = 0.0  # a zero scale too
        blocks[..., at:at + 2] = vals[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def _quantized_raw(name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    return gguf_quantize(w, GGMLQuantizationType[name])


def _cases():
    for name in SIMPLE + KQUANT:
        for rows, cols in SHAPES:
            if cols % GGUF_TYPES[name].block_weights:
                continue
            if name in SIMPLE:
                yield pytest.param(name, rows, cols, "quantized", id=f"{name}-{rows}x{cols}-quantized")
            yield pytest.param(name, rows, cols, "random", id=f"{name}-{rows}x{cols}-random")


def _raw(name, rows, cols, how):
    seed = _seed(name, rows, cols, how)
    return _quantized_raw(name, rows, cols, seed) if how == "quantized" else _random_raw(name, rows, cols, seed)


def _bits_no_signed_zero(x: np.ndarray) -> np.ndarray:
    return (x + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 == +0.0; every other value unchanged


def test_registry_matches_gguf():
    assert sorted(GGUF_TYPES) == sorted(SIMPLE + KQUANT)
    for name, bt in GGUF_TYPES.items():
        assert bt.name == name and bt.ggml_type == GGMLQuantizationType[name]
        assert (bt.block_weights, bt.block_bytes) == GGML_QUANT_SIZES[bt.ggml_type]
        assert (bt.bits, bt.group_size, bt.zero) == EXPECTED[name]
        assert bt.block_weights % bt.group_size == 0 and bt.free


@pytest.mark.parametrize("name,rows,cols,how", list(_cases()))
def test_decode_matches_gguf_and_round_trips(name, rows, cols, how):
    bt = GGUF_TYPES[name]
    raw = _raw(name, rows, cols, how)
    assert raw.shape == (rows, cols // bt.block_weights * bt.block_bytes)
    dec = decode(name, raw, cols)

    # codes, scale, offset: dtypes, shapes, ranges
    groups = cols // bt.group_size
    assert dec.codes.dtype == np.uint8 and dec.codes.shape == (rows, cols)
    assert int(dec.codes.max()) < 2 ** bt.bits
    assert dec.scale.dtype == np.float32 and dec.scale.shape == (rows, groups)
    assert dec.offset.dtype == np.float32 and dec.offset.shape == (rows, groups)
    if bt.zero is not None:
        assert np.array_equal(dec.offset, np.float32(-bt.zero) * dec.scale)
        assert np.array_equal(dec.offset, -(bt.zero * dec.scale.astype(np.float64)))  # tie is exact
    if how == "random" and rows * cols >= 8 * 2 ** bt.bits:  # random bytes reach every code value
        assert int(dec.codes.min()) == 0 and int(dec.codes.max()) == 2 ** bt.bits - 1

    # bit-exact against gguf-py (up to the sign of an exact zero, see the module docstring)
    ref = gguf_dequantize(raw, bt.ggml_type).reshape(rows, cols).astype(np.float32)
    ours = dequantize(dec)
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    assert np.isfinite(ref).all()
    assert np.array_equal(ours, ref)
    assert np.array_equal(_bits_no_signed_zero(ours), _bits_no_signed_zero(ref))
    if bt.zero is None:  # no tied zero: the very same fp32 ops, so signed zeros agree too
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))

    # byte-exact round trip, also from copies with another integer dtype
    back = encode(name, dec.codes, dec.source)
    assert back.dtype == np.uint8 and np.array_equal(back, raw)
    src = {k: (v.astype(np.int64) if v.dtype.kind in "iu" else v) for k, v in dec.source.items()}
    assert np.array_equal(encode(dec.type_name, dec.codes.astype(np.int32), src), raw)


def test_source_contents():
    raw = _random_raw("Q4_K", 2, 512, 1)
    src = decode("Q4_K", raw, 512).source
    assert set(src) == {"d", "dmin", "sc", "mins"}
    assert src["d"].dtype == np.float16 and src["d"].shape == (2, 2)
    assert src["sc"].shape == src["mins"].shape == (2, 16) and int(src["sc"].max()) <= 63
    src6 = decode("Q6_K", _random_raw("Q6_K", 2, 256, 2), 256).source
    assert set(src6) == {"d", "sc"} and src6["sc"].dtype == np.int8 and src6["sc"].shape == (2, 16)
    assert set(decode("Q4_1", _quantized_raw("Q4_1", 2, 64, 3), 64).source) == {"d", "m"}
    assert set(decode("Q8_0", _quantized_raw("Q8_0", 2, 64, 3), 64).source) == {"d"}


def test_hand_built_q8_0_block():
    d = np.float16(0.5)
    q = np.arange(-128, 128, 8, dtype=np.int8)  # 32 values, then the int8 extremes -128 and 127
    q[-1] = 127
    raw = np.concatenate([np.array([d], "<f2").view(np.uint8), q.view(np.uint8)])[None, :]
    dec = decode("Q8_0", raw, 32)
    assert np.array_equal(dec.codes[0], (q.astype(np.int16) + 128).astype(np.uint8))
    assert np.array_equal(dequantize(dec)[0], q.astype(np.float32) * np.float32(0.5))


def test_errors():
    raw = _quantized_raw("Q4_0", 2, 64, 0)
    with pytest.raises(ValueError, match="'Q3_X'"):
        decode("Q3_X", raw, 64)
    with pytest.raises(ValueError, match="'Q2_K'"):
        encode("Q2_K", np.zeros((2, 256), np.uint8), {})
    with pytest.raises(ValueError, match="cols=48"):
        decode("Q4_0", raw, 48)
    with pytest.raises(ValueError, match="cols=64"):
        decode("Q4_K", _random_raw("Q4_K", 2, 256, 0), 64)
    with pytest.raises(ValueError, match=r"\(2, 36\).*\(rows, 18\)"):
        decode("Q4_0", raw, 32)
    with pytest.raises(ValueError, match="shape"):
        decode("Q4_0", raw.reshape(-1), 64)
    with pytest.raises(ValueError, match="int8"):
        decode("Q4_0", raw.view(np.int8), 64)

    dec = decode("Q4_0", raw, 64)
    bad = dec.codes.copy()
    bad[1, 5] = 16
    with pytest.raises(ValueError, match="code 16 .*0..15"):
        encode("Q4_0", bad, dec.source)
    with pytest.raises(ValueError, match="code -1"):
        encode("Q4_0", dec.codes.astype(np.int16) - 1, dec.source)
    with pytest.raises(ValueError, match="cols=40"):
        encode("Q4_0", np.zeros((2, 40), np.uint8), dec.source)
    with pytest.raises(ValueError, match="'d'"):
        encode("Q4_0", dec.codes, {"d": dec.source["d"].astype(np.float32)})

    dk = decode("Q4_K", _random_raw("Q4_K", 2, 256, 0), 256)
    with pytest.raises(ValueError, match=r"'mins'\] value 64 .*0\.\.63"):
        encode("Q4_K", dk.codes, {**dk.source, "mins": np.full((2, 8), 64)})
    with pytest.raises(ValueError, match="offset shape"):
        dequantize(Decoded("Q4_K", dk.codes, dk.scale, dk.offset[:, :4], dk.source))
