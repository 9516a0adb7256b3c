"""Both kernels against a naive dequantize-then-matmul written here from the formula."""

import pytest
import torch

from qalora.errors import QaloraError
from qalora.kernels.int4 import code_shift, scales_and_zeros
from qalora.kernels.registry import select_kernel
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight


def make_layer(out, inp, bits, L, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    codes, scale, offset = rtn_quantize(w, bits, L)
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, scale, offset, bits, L), b), codes, scale, offset, b


def naive_forward(x, codes, scale, offset, L, bias=None):
    out, inp = codes.shape
    w = torch.empty(out, inp, dtype=torch.float64)
    for g in range(inp // L):
        w[:, g * L:(g + 1) * L] = scale[:, g:g + 1].double() * codes[:, g * L:(g + 1) * L].double() + offset[:, g:g + 1].double()
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("L", [32, 64, 96])
def test_reference_path_matches_naive(bits, L):
    layer, codes, scale, offset, b = make_layer(64, 192, bits, L, seed=bits + L, bias=True)
    layer.kernel = "reference"
    x = torch.randn(3, 5, 192)
    y = layer(x)
    assert y.shape == (3, 5, 64)
    # fp32 GEMM vs fp64 naive: accumulated fp32 rounding over 192 terms
    torch.testing.assert_close(y.double(), naive_forward(x.reshape(-1, 192), codes, scale, offset, L, b).reshape(3, 5, 64),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("L", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 7, 200])
def test_int4_path_matches_reference(bits, L, rows):
    layer, codes, scale, offset, _ = make_layer(192, 256, bits, L, seed=bits * L)
    x = torch.randn(rows, 256)
    layer.kernel = "int4"
    y = layer(x)
    layer.kernel = "reference"
    ref = layer(x)
    # bf16 activations and bf16 scale/zero: relative error of a bf16 GEMM (~2^-8 per operand)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < 6e-3, rel
    assert y.dtype == x.dtype


def test_scales_and_zeros_convention():
    """Kernel zero for centred codes reproduces scale*q + offset exactly in fp32."""
    scale = torch.tensor([[0.5, 0.25]])
    offset = torch.tensor([[-1.0, 2.0]])
    for bits in (2, 3, 4):
        sz = scales_and_zeros(scale, offset, bits).float()       # [G, out, 2]
        for q in range(2**bits):
            w_kernel = (q + code_shift(bits) - 8) * sz[:, 0, 0] + sz[:, 0, 1]
            assert torch.equal(w_kernel, scale[0] * q + offset[0])
    assert code_shift(4) == 0  # 4-bit: zero = offset + 8 * scale, the documented tinygemm mapping


def test_auto_policy_and_refusals():
    layer, *_ = make_layer(64, 128, 4, 32)
    cpu = torch.device("cpu")
    assert select_kernel(layer, cpu, 1).name == "int4"
    assert select_kernel(layer, cpu, 4096).name == "int4"  # fastest at every M measured here
    layer8, *_ = make_layer(64, 128, 8, 32)
    assert select_kernel(layer8, cpu, 1).name == "reference"
    with pytest.raises(QaloraError, match="kernel 'int4' cannot run a 8-bit g32"):
        select_kernel(layer8, cpu, 1, "int4")
    odd, *_ = make_layer(40, 128, 4, 32)  # the CPU kernel needs out % 16 == 0
    assert select_kernel(odd, cpu, 1).name == "reference"
    with pytest.raises(QaloraError, match="unknown"):
        select_kernel(layer, cpu, 1, "magic")


def test_kernel_cache_follows_buffer_changes():
    """After the offsets change in place (a merge does this), the int4 cache is rebuilt."""
    layer, *_ = make_layer(64, 128, 4, 32)
    layer.kernel = "int4"
    # inputs of mean 1: each output's shift, 0.5 * sum(x) ~ 64, stands far above the bf16 error
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0)) + 1.0
    y0 = layer(x)
    with torch.no_grad():
        layer.offset.add_(0.5)
    y1 = layer(x)
    layer.kernel = "reference"
    torch.testing.assert_close(y1, layer(x), rtol=2e-2, atol=2e-2)  # bf16 path vs fp32
    shift = (0.5 * x.sum(-1, keepdim=True)).expand_as(y1)             # what the new offsets add
    torch.testing.assert_close(y1 - y0, shift, rtol=2e-2, atol=0.5)  # a stale cache would give 0


def test_fast_path_does_not_keep_a_dense_weight():
    layer, *_ = make_layer(64, 128, 4, 32)
    layer.kernel = "int4"
    layer(torch.randn(1, 128))
    state = layer._kernel_state["int4"][1]
    assert state["packed"].dtype == torch.uint8 and state["packed"].numel() == 64 * 128 // 2
    assert all(not (t.is_floating_point() and t.numel() >= 64 * 128) for t in state.values())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dense_kernel_is_the_reference_bit_for_bit_and_follows_changes(bits):
    layer, *_ = make_layer(48, 96, bits, 32, bias=True)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    layer.kernel = "reference"
    ref = layer(x)
    layer.kernel = "dense"
    assert torch.equal(layer(x), ref)
    with torch.no_grad():
        layer.offset.add_(0.25)  # the cached dense weight must be rebuilt
    got = layer(x)
    layer.kernel = "reference"
    assert torch.equal(got, layer(x)) and not torch.equal(got, ref)
    assert select_kernel(layer, torch.device("cpu"), 5).name != "dense"  # never chosen by auto
