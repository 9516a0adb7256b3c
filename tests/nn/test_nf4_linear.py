import pytest
import torch

from qalora.errors import QaloraError
from qalora.nn.nf4_linear import NF4Linear
from qalora.quant.nf4 import nf4_dequantize, nf4_quantize
from qalora.quant.packing import pack


def _layer(out_f=48, in_f=128, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) if bias else None
    return NF4Linear.from_weight(w, b, block_size=64), w, b


def test_buffers_layout_and_no_parameters():
    layer, w, b = _layer()
    assert list(layer.parameters()) == []
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "absmax", "bias"}
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (48, 64)   # half a byte per weight
    assert sd["absmax"].dtype == torch.float32 and sd["absmax"].shape == (48, 2)
    codes, absmax = nf4_quantize(w, 64)
    assert torch.equal(sd["qweight"], pack(codes, 4))
    assert torch.equal(layer.codes(), codes)
    assert torch.equal(sd["absmax"], absmax)
    assert torch.equal(sd["bias"], b)
    assert layer.bits == 4 and layer.block_size == 64
    assert layer.nbytes == 48 * 128 // 2 + 48 * 2 * 4
    assert "block_size=64" in repr(layer) and "bits=4" in repr(layer)
    assert set(_layer(bias=False)[0].state_dict()) == {"qweight", "absmax"}


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dequantized_matmul(bias):
    layer, w, b = _layer(bias=bias)
    codes, absmax = nf4_quantize(w, 64)
    wq = nf4_dequantize(codes, absmax, 64)
    x = torch.randn(2, 5, 128)
    ref = x @ wq.T + (b if bias else 0)
    # fp32 on both sides; only matmul blocking of a 3-D vs 2-D input may differ
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.dequantized_weight(), wq)


def test_output_dtype_follows_input():
    layer, w, b = _layer()
    x = torch.randn(3, 128).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = (x.float() @ layer.dequantized_weight().T + b).to(torch.bfloat16)
    assert torch.equal(y, ref)   # same fp32 computation, then one rounding to bf16


def test_meta_init_and_assign_load_reproduces_outputs():
    layer, _, _ = _layer()
    fresh = NF4Linear(128, 48, block_size=64, bias=True, device="meta")
    assert fresh.qweight.is_meta
    fresh.load_state_dict(layer.state_dict(), assign=True)
    assert not fresh.qweight.is_meta
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))


def test_zero_init_buffers():
    m = NF4Linear(64, 8, bias=True)
    assert m.qweight.shape == (8, 32) and m.qweight.dtype == torch.uint8
    assert m.absmax.shape == (8, 1) and m.bias.shape == (8,)


def test_grad_flows_to_input_only():
    layer, _, _ = _layer()
    x = torch.randn(2, 3, 128, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    # fp32 matmul in a different order (autograd's mm vs this one)
    torch.testing.assert_close(x.grad, grad_y @ layer.dequantized_weight(), rtol=1e-5, atol=1e-5)
    assert layer.qweight.grad is None and layer.absmax.grad is None


def test_grad_matches_plain_autograd_and_saves_nothing():
    """The frozen-base backward (dequantize again in backward) equals autograd through W~."""
    layer, _, b = _layer()
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert saved == []  # neither x nor a dense [48, 128] weight is kept for backward
    gy = torch.randn_like(y)
    y.backward(gy)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ layer.dequantized_weight().T + b).backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)  # fp32 GEMM rounding only


def test_bf16_input_grad_dtype():
    layer, _, _ = _layer()
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_bad_block_size():
    with pytest.raises(QaloraError, match="block_size 64 does not divide in_features 96"):
        NF4Linear(96, 8, block_size=64)
    with pytest.raises(QaloraError, match="in_features 96 of layers.0.q_proj"):
        NF4Linear.from_weight(torch.randn(8, 96), block_size=64, name="layers.0.q_proj")
