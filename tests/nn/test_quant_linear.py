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
