import pytest
import torch
from torch import nn

from qalora.adapters.layer import AdaptedLinear
from qalora.config import LoraConfig
from qalora.errors import QaloraError
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight


def QALoRALinear(base, rank=64, alpha=16.0, name="layer"):
    return AdaptedLinear(base, ("qalora",), LoraConfig(rank=rank, alpha=alpha), name=name)


def LoRALinear(base, rank=64, alpha=16.0):
    return AdaptedLinear(base, ("lora",), LoraConfig(rank=rank, alpha=alpha))


def quant_layer(out=48, inp=128, bits=3, L=32, seed=0):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.1
    codes, s, o = rtn_quantize(w, bits, L)
    return QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, s, o, bits, L), kernel="reference")


def test_qalora_forward_matches_formula():
    base = quant_layer()
    layer = QALoRALinear(base, rank=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 7, 128)
    pooled = x.reshape(3, 7, 4, 32).mean(-1)
    ref = base(x) + 2.0 * pooled @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)  # fp32 reassociation only
    assert layer.lora_A.weight.shape == (8, 4) and layer.lora_B.weight.shape == (48, 8)


def test_qalora_starts_as_noop_and_group_size_comes_from_base():
    base = quant_layer(L=64)
    layer = QALoRALinear(base, rank=4)
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), base(x))
    assert layer.group_size == 64 and layer.lora_A.weight.shape == (4, 2)


def test_qalora_adapter_is_a_per_group_offset():
    """s·(B A)[o, g] / L added to every weight of group g equals the adapter's output."""
    base = quant_layer()
    layer = QALoRALinear(base, rank=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight)
    delta = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight) / 32          # [out, G]
    dense = base.dequantized_weight() + delta.repeat_interleave(32, dim=1)
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), x @ dense.t(), rtol=1e-5, atol=1e-5)


def test_qalora_refuses_a_dense_base():
    with pytest.raises(QaloraError, match="adapter kind 'qalora' needs a group-wise INTn QuantLinear .* at m.q, found Linear"):
        QALoRALinear(nn.Linear(64, 64), name="m.q")


def test_only_adapters_get_gradients_and_packed_buffers_do_not_move():
    base = quant_layer()
    layer = QALoRALinear(base, rank=8)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    assert {n for n, p in layer.named_parameters()} == {"lora_A.weight", "lora_B.weight"}
    a0 = layer.lora_A.weight.detach().clone()
    for _ in range(3):
        loss = layer(torch.randn(4, 128)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(layer.lora_A.weight, a0) and layer.lora_B.weight.abs().sum() > 0


def test_lora_on_dense_base():
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, rank=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 64)
    ref = base(x) + 2.0 * x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert not base.weight.requires_grad
    assert layer.lora_A.weight.shape == (4, 64)
