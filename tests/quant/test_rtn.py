import pytest
import torch

from qalora.errors import QaloraError
from qalora.quant.qparams import dequantize
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight


def naive_rtn(w, bits, L):
    """Per (row, group) loop of the paper's min-max formula."""
    out, n = w.shape
    codes = torch.empty(out, n, dtype=torch.uint8)
    scale = torch.empty(out, n // L)
    offset = torch.empty(out, n // L)
    for o in range(out):
        for g in range(n // L):
            blk = w[o, g * L:(g + 1) * L]
            lo, hi = blk.min(), blk.max()
            s = (hi - lo) / (2**bits - 1)
            s = s if s > 0 else torch.tensor(1.0)
            codes[o, g * L:(g + 1) * L] = torch.round((blk - lo) / s).clamp(0, 2**bits - 1).to(torch.uint8)
            scale[o, g], offset[o, g] = s, lo
    return codes, scale, offset


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("L", [8, 32])
def test_rtn_equals_formula(bits, L):
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(bits * L))
    codes, scale, offset = rtn_quantize(w, bits, L)
    rc, rs, ro = naive_rtn(w, bits, L)
    assert torch.equal(scale, rs) and torch.equal(offset, ro)
    assert torch.equal(codes, rc)
    # dequantized error is at most half a step per weight (plus fp32 rounding)
    err = (dequantize(codes, scale, offset, L) - w).abs().reshape(12, 64 // L, L)
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-6).all()


def test_rtn_is_lossless_on_grid_weights():
    L, bits = 32, 4
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(8, 2, generator=g) + 0.1
    offset = torch.randn(8, 2, generator=g)
    q = torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8)
    q[:, ::32] = 0
    q[:, 1::32] = 15  # every group spans the full grid
    w = dequantize(q, scale, offset, L)
    codes, s, o = rtn_quantize(w, bits, L)
    assert torch.equal(codes, q)
    torch.testing.assert_close(dequantize(codes, s, o, L), w, rtol=0, atol=1e-6)  # fp32 rounding of scale


def test_constant_group():
    w = torch.full((2, 32), 0.25)
    codes, scale, offset = rtn_quantize(w, 3, 32)
    assert torch.equal(codes, torch.zeros_like(codes))
    assert torch.equal(dequantize(codes, scale, offset, 32), w)


def test_quantized_weight_record_roundtrip():
    w = torch.randn(16, 96)
    codes, scale, offset = rtn_quantize(w, 3, 32)
    qw = QuantizedWeight.from_codes(codes, scale, offset, 3, 32)
    assert torch.equal(qw.codes(), codes)
    assert qw.nbytes == 16 * 96 * 3 // 8 + 2 * 16 * 3 * 4
    assert torch.equal(qw.dequantize(), dequantize(codes, scale, offset, 32))


def test_bad_group_size_names_layer():
    with pytest.raises(QaloraError, match=r"group_size 48 does not divide in_features 64 of layers.0.q; use 16, 32, 64"):
        rtn_quantize(torch.randn(4, 64), 4, 48, name="layers.0.q")
    with pytest.raises(QaloraError, match="bits 6"):
        rtn_quantize(torch.randn(4, 64), 6, 32)
