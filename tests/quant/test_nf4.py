import pytest
import torch

from qalora.errors import QaloraError
from qalora.quant.nf4 import NF4_CODE, NF4_ZERO_INDEX, nf4_dequantize, nf4_quantize
from qalora.quant.qparams import dequantize
from qalora.quant.rtn import rtn_quantize


def _gauss(out_f, in_f, seed=0, std=1.0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * std


def test_code_table():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert bool((NF4_CODE[1:] > NF4_CODE[:-1]).all())
    assert NF4_CODE[0].item() == -1.0 and NF4_CODE[15].item() == 1.0
    assert NF4_ZERO_INDEX == 7 and NF4_CODE[7].item() == 0.0
    # spot values from bitsandbytes get_4bit_type("nf4"), exact in fp32
    assert NF4_CODE[8].item() == torch.tensor(0.07958029955625534).item()
    assert NF4_CODE[1].item() == torch.tensor(-0.6961928009986877).item()


def test_shapes_and_dtypes():
    w = _gauss(6, 128)
    codes, absmax = nf4_quantize(w, 64)
    assert codes.dtype == torch.uint8 and codes.shape == (6, 128)
    assert absmax.dtype == torch.float32 and absmax.shape == (6, 2)
    assert int(codes.max()) <= 15
    assert torch.equal(absmax, w.reshape(6, 2, 64).abs().amax(-1))


def test_matches_naive_argmin():
    """bucketize on midpoints == argmin over a [.., 16] broadcast, except at exact (fp32) ties."""
    w = _gauss(96, 256, seed=1)
    codes, absmax = nf4_quantize(w, 64)
    x = (w.reshape(96, 4, 64) / absmax.unsqueeze(-1)).reshape(96, 256)      # same fp32 division
    dist = (x.unsqueeze(-1) - NF4_CODE).abs()                                # [out, in, 16]
    naive = dist.argmin(-1).to(torch.uint8)
    differ = codes != naive
    if differ.any():
        # only allowed where both codes are equally near (to fp32 rounding of the distances)
        d_fast = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)[differ]
        d_naive = dist.gather(-1, naive.long().unsqueeze(-1)).squeeze(-1)[differ]
        assert torch.allclose(d_fast, d_naive, rtol=0, atol=1e-6), (d_fast, d_naive)
        assert int(differ.sum()) < 10
    else:
        assert torch.equal(codes, naive)


def test_ties_go_to_lower_code():
    mid = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2                                # 15 midpoints
    row = torch.cat([torch.tensor([1.0]), mid]).reshape(1, 16)              # absmax exactly 1
    codes, absmax = nf4_quantize(row, 16)
    assert absmax.item() == 1.0
    assert codes[0, 0].item() == 15
    assert codes[0, 1:].tolist() == list(range(15))                        # m_k -> k (lower)


def test_roundtrip_error_bound():
    w = _gauss(64, 512, seed=2, std=0.02)
    codes, absmax = nf4_quantize(w, 64)
    wq = nf4_dequantize(codes, absmax, 64)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2                     # 0.1385, between 0.723 and 1
    bound = (half_gap * absmax).repeat_interleave(64, dim=1)                # [out, in]
    # + 1e-6 relative slack for the fp32 division/multiplication
    assert bool(((w - wq).abs() <= bound * (1 + 1e-6)).all())
    # the block's absmax weight is reproduced exactly (it maps to code 0 or 15)
    assert torch.equal(wq.reshape(64, 8, 64).abs().amax(-1), absmax)


def test_grid_weight_is_a_fixed_point():
    codes, absmax = nf4_quantize(_gauss(32, 192, seed=3), 64)
    w_grid = nf4_dequantize(codes, absmax, 64)
    codes2, absmax2 = nf4_quantize(w_grid, 64)
    assert torch.equal(codes2, codes)
    assert torch.equal(absmax2, absmax)


def test_zero_block():
    w = _gauss(3, 128, seed=4)
    w[1, 64:] = 0.0
    codes, absmax = nf4_quantize(w, 64)
    assert absmax[1, 1].item() == 1.0
    assert bool((codes[1, 64:] == NF4_ZERO_INDEX).all())
    wq = nf4_dequantize(codes, absmax, 64)
    assert bool((wq[1, 64:] == 0).all())


def test_low_precision_input_and_output_dtype():
    w = _gauss(8, 64, seed=5).to(torch.bfloat16)
    codes, absmax = nf4_quantize(w, 64)
    codes32, absmax32 = nf4_quantize(w.float(), 64)
    assert torch.equal(codes, codes32) and torch.equal(absmax, absmax32)
    assert nf4_dequantize(codes, absmax, 64, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_block_size_message():
    with pytest.raises(QaloraError, match=r"NF4 block_size 64 does not divide in_features 96 of weight; use 16, 32, 96"):
        nf4_quantize(torch.randn(4, 96), 64)
    with pytest.raises(QaloraError, match="block_size 0"):
        nf4_quantize(torch.randn(4, 96), 0)
    with pytest.raises(QaloraError, match="2-D"):
        nf4_quantize(torch.randn(2, 4, 64), 64)
    w = torch.randn(2, 64)
    w[0, 3] = float("nan")
    with pytest.raises(QaloraError, match="non-finite"):
        nf4_quantize(w, 64)


def _rel_errors(w, wq):
    e = w - wq
    fro = (e.norm() / w.norm()).item()                       # relative Frobenius (RMS) error
    l1 = (e.abs().mean() / w.abs().mean()).item()            # relative mean absolute error
    return fro, l1


def test_nf4_vs_rtn_on_gaussian_weight():
    """NF4 vs 4-bit min-max RTN on a Gaussian 1536x576 weight (measured, seed 0):

    ============  ==========  =========
    method        rel. Frob.  rel. MAE
    ============  ==========  =========
    NF4 B=64      0.0920      0.0913
    RTN g64       0.0896      0.0948
    RTN g32       0.0783      0.0812
    sym INT4 g64  0.1076      0.1144
    ============  ==========  =========

    NF4's advantage over asymmetric min-max RTN at the same block size holds in mean
    *absolute* error only; in Frobenius (squared) error min-max RTN g64 is ~2.6% better, so
    that ordering is NOT asserted. NF4 beats symmetric absmax INT4 (the comparison in the
    QLoRA paper) in both.
    """
    w = _gauss(1536, 576, seed=0, std=0.02)
    codes, absmax = nf4_quantize(w, 64)
    nf4_fro, nf4_l1 = _rel_errors(w, nf4_dequantize(codes, absmax, 64))
    q, s, o = rtn_quantize(w, 4, 64)
    rtn_fro, rtn_l1 = _rel_errors(w, dequantize(q, s, o, 64))
    wg = w.reshape(1536, 9, 64)
    step = wg.abs().amax(-1, keepdim=True) / 7
    sym_fro, sym_l1 = _rel_errors(w, (torch.round(wg / step).clamp(-7, 7) * step).reshape(w.shape))

    assert nf4_l1 < 0.98 * rtn_l1, (nf4_l1, rtn_l1)          # measured ratio 0.963
    assert nf4_fro < 1.05 * rtn_fro, (nf4_fro, rtn_fro)      # measured ratio 1.027 (RTN better)
    assert nf4_fro < 0.9 * sym_fro and nf4_l1 < 0.9 * sym_l1, (nf4_fro, sym_fro, nf4_l1, sym_l1)
