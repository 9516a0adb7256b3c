import pytest
import torch

from qalora.nn.quant_linear import QuantLinear
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight


def test_buffers_not_parameters_and_state_dict_roundtrip():
    w = torch.randn(32, 64)
    codes, s, o = rtn_quantize(w, 3, 32)
    layer = QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, s, o, 3, 32), torch.randn(32))
    assert list(layer.parameters()) == []
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scale", "offset", "bias"}
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (32, 24)
    fresh = QuantLinear(64, 32, 3, 32, bias=True)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.quantized_weight().codes(), codes)


@pytest.mark.parametrize("bits, group", [(5, 32), (6, 16)])
def test_imported_widths_compute_scale_q_plus_offset(bits, group):
    """5- and 6-bit codes (GGUF Q5_*, Q6_K; groups of 16 for Q6_K) are stored packed and computed
    as ``scale * q + offset`` by the reference kernel (fp32 GEMM against the naive weight)."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (24, 64), generator=g, dtype=torch.uint8)
    scale, offset = torch.rand(24, 64 // group, generator=g) * 0.01, torch.randn(24, 64 // group, generator=g) * 0.1
    layer = QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, scale, offset, bits, group), None)
    assert layer.bits == bits and layer.kernel == "auto" and torch.equal(layer.quantized_weight().codes(), codes)
    naive = (codes.float().reshape(24, -1, group) * scale[..., None] + offset[..., None]).reshape(24, 64)
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(layer(x), x @ naive.t(), rtol=0, atol=1e-6)  # fp32 GEMM order only


def test_invalid_kernel_name():
    with pytest.raises(ValueError, match="kernel 'fast' is unknown"):
        QuantLinear(64, 32, 4, 32, kernel="fast")


@pytest.mark.parametrize("kernel", ["reference", "int4"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_grad_x_equals_autograd_through_dequantized_weight(kernel, bits):
    """The custom backward (dequantize in backward, nothing saved) equals plain autograd."""
    w = torch.randn(64, 128) * 0.1
    codes, s, o = rtn_quantize(w, bits, 32)
    layer = QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, s, o, bits, 32), torch.randn(64), kernel=kernel)
    x = torch.randn(2, 5, 128, requires_grad=True)
    gy = torch.randn(2, 5, 64)
    layer(x).backward(gy)
    x_ref = x.detach().clone().requires_grad_(True)
    dense = layer.quantized_weight().dequantize()
    (x_ref @ dense.t() + layer.bias).backward(gy)
    # backward is fp32 on every kernel: fp32 GEMM rounding only
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_backward_saves_no_dense_weight_or_input():
    layer = QuantLinear(512, 512, 4, 32)
    x = torch.randn(8, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert saved == []  # neither x [8, 512] nor a dense [512, 512] weight is kept for backward
    y.sum().backward()
    assert x.grad.shape == x.shape
