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
