"""Every adapter kind: its forward against a naive reference, its exact merge against its own
unmerged forward (fp64), LoTA's code moves at the grid's edges at every width, and the merge's
refusals. Layers are small and random; parameters are set to non-trivial values directly."""

import pytest
import torch

from qalora.adapters.kinds.lota import code_moves
from qalora.adapters.layer import AdaptedLinear
from qalora.config import LoraConfig
from qalora.errors import QaloraError
from qalora.merging.exact import merge_layer, merged_triple
from qalora.merging.verify import float64
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight

COMBOS = [("qalora",), ("scales",), ("qalora", "scales"), ("lota",), ("lota", "qalora"), ("lota", "scales"),
          ("lota", "qalora", "scales")]


pytestmark = pytest.mark.usefixtures("one_thread")


def quant_layer(out=24, inp=128, bits=3, L=32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.1
    codes, s, o = rtn_quantize(w, bits, L)
    b = torch.randn(out, generator=g) * 0.1 if bias else None
    return QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, s, o, bits, L), bias=b, kernel="reference")


def randomize(layer: AdaptedLinear, seed: int = 1) -> None:
    """Trained-looking parameters: B of QA-LoRA non-zero, log-scales of a few %, a ternary B_T."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if "qalora" in layer.kinds:
            layer.lora_B.weight.normal_(0, 0.05, generator=g)
        if "scales" in layer.kinds:
            layer.log_scale.normal_(0, 0.05, generator=g)
        if "lota" in layer.kinds:
            layer.lota_B.copy_(torch.randint(-1, 2, layer.lota_B.shape, generator=g).float())


def adapted(kinds, bits=3, rank=8, omega=2.0, **kw):
    layer = AdaptedLinear(quant_layer(bits=bits, **kw), kinds, LoraConfig(rank=rank, alpha=16, lota_omega=omega))
    randomize(layer)
    return layer


@torch.no_grad()
def naive_weight(layer: AdaptedLinear) -> torch.Tensor:
    """Each kind's formula written out per element (fp64 loops over groups)."""
    base = layer.base
    q = QuantizedWeight(base.qweight, base.scale, base.offset, base.bits, base.group_size, base.in_features).codes()
    q = q.double()
    scale, offset = base.scale.double().clone(), base.offset.double().clone()
    L, out_f, in_f = layer.group_size, layer.out_features, layer.in_features
    if "scales" in layer.kinds:
        scale = (scale * torch.exp(layer.log_scale.double())).float().double()
    w = torch.empty(out_f, in_f, dtype=torch.float64)
    dw = layer.lota_B.double() @ layer.lota_A.double() if "lota" in layer.kinds else None
    for o in range(out_f):
        for g in range(in_f // L):
            cols = range(g * L, (g + 1) * L)
            mu = 0.0
            moves = {}
            if dw is not None:
                om = layer.lota_omega
                for i in cols:
                    m = 1 if dw[o, i] > om and q[o, i] < 2**layer.bits - 1 else -1 if dw[o, i] < -om and q[o, i] > 0 else 0
                    moves[i] = m
                    mu += (float(dw[o, i]) - om * m) / om
                mu /= L
            delta = 0.0
            if "qalora" in layer.kinds:
                delta = layer.scaling * float(layer.lora_B.weight[o].double() @ layer.lora_A.weight[:, g].double()) / L
            for i in cols:
                w[o, i] = scale[o, g] * (q[o, i] + moves.get(i, 0) + mu) + offset[o, g] + delta
    return w


@pytest.mark.parametrize("kinds", COMBOS, ids=["+".join(k) for k in COMBOS])
def test_forward_matches_the_formula(kinds):
    layer = adapted(kinds)
    x = torch.randn(5, 128, dtype=torch.float64)
    with float64(layer):
        got = layer(x)
    want = x @ naive_weight(layer).t() + layer.base.bias.double()
    # fp64 throughout; different summation order only
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kinds", COMBOS, ids=["+".join(k) for k in COMBOS])
def test_merge_equals_the_unmerged_forward(kinds):
    layer = adapted(kinds)
    merged = merge_layer(layer)
    x = torch.randn(7, 128, dtype=torch.float64)
    with float64(layer, merged):
        a, b = layer(x), merged(x)
    # fp64 forwards: the merged offsets are the exact ones rounded to fp32 once (|offset| ~ 0.3, half
    # an ulp ~ 1.5e-8 per weight; 128 inputs of |x| ~ 1 accumulate to well under 1e-6)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert (a - layer.base(x.float()).double()).abs().max() > 1e-3  # the adapter does move the output
    # what may change changed, the rest is the base's very tensor
    assert (merged.qweight is layer.base.qweight) == ("lota" not in kinds)
    assert (merged.scale is layer.base.scale) == ("scales" not in kinds)
    if "lota" in kinds:
        dq = merged.quantized_weight().codes().short() - layer.base.quantized_weight().codes().short()
        assert dq.abs().max() == 1 and (dq != 0).float().mean() > 0.01


def test_untrained_adapters_merge_bit_identically():
    for kinds in COMBOS:
        base = quant_layer()
        layer = AdaptedLinear(base, kinds, LoraConfig(rank=4))
        merged = merge_layer(layer)
        assert torch.equal(merged.qweight, base.qweight), kinds
        assert torch.equal(merged.scale, base.scale) and torch.equal(merged.offset, base.offset), kinds


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lota_codes_stay_in_range_at_the_grid_edges(bits):
    """Codes at 0 and at 2^b - 1 pushed past the edge in both directions move only inwards."""
    base = quant_layer(out=8, inp=64, bits=bits, bias=False)
    top = 2**bits - 1
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    codes[:4] = top                      # rows 0-3 at the top edge, rows 4-7 at the bottom
    codes[:, 1::2] = top // 2            # every other column in the middle
    qw = QuantizedWeight.from_codes(codes, base.scale, base.offset, bits, 32)
    base.qweight = qw.packed
    layer = AdaptedLinear(base, ("lota",), LoraConfig(rank=4, lota_omega=1.0))
    with torch.no_grad():
        layer.lota_A.fill_(1.0)
        layer.lota_B.copy_(torch.tensor([1.0, -1.0]).repeat(4).unsqueeze(1).repeat(1, 4))  # rows +4, -4, +4, ...
    new = merged_triple(layer)[0].short()
    up = (torch.arange(8) % 2 == 0).unsqueeze(1)                  # rows pushed up (+4 > ω), others down
    at_top = (torch.arange(8) < 4).unsqueeze(1)
    edge = torch.where(up, torch.where(at_top, 0, 1), torch.where(at_top, -1, 0)).expand(8, 32)
    middle = torch.where(up, 1, -1).expand(8, 32)
    want = torch.empty(8, 64, dtype=torch.int16)
    want[:, 0::2], want[:, 1::2] = edge, middle
    assert torch.equal(new - codes.short(), want)
    assert int(new.min()) >= 0 and int(new.max()) <= top


def test_code_moves_threshold_is_strict():
    dw = torch.tensor([[2.0, 2.5, -2.0, -2.5, 0.0]])
    q = torch.full((1, 5), 3)
    assert code_moves(dw, q, 2.0, 3).tolist() == [[0.0, 1.0, 0.0, -1.0, 0.0]]


def test_merge_refuses_a_dense_kind_and_invalid_triples():
    with pytest.raises(QaloraError, match="'lora' adapter .* does not merge exactly"):
        merge_layer(AdaptedLinear(torch.nn.Linear(64, 8), ("lora",), LoraConfig(rank=2)), "m.q")
    layer = adapted(("scales",))
    with torch.no_grad():
        layer.log_scale[0, 0] = -200.0          # exp underflows: a zero scale
    with pytest.raises(QaloraError, match="not a positive finite fp32 number"):
        merge_layer(layer, "m.q")
    layer = adapted(("qalora",))
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(QaloraError, match="offset is not finite"):
        merge_layer(layer, "m.q")


def test_kinds_refuse_bases_they_do_not_fit():
    with pytest.raises(QaloraError, match="adapter kind 'scales' needs a group-wise INTn QuantLinear .* at x"):
        AdaptedLinear(torch.nn.Linear(64, 8), ("scales",), LoraConfig(rank=2), name="x")
    with pytest.raises(QaloraError, match="adapter kind 'lora' needs an unquantized nn.Linear"):
        AdaptedLinear(quant_layer(), ("lora",), LoraConfig(rank=2))
    with pytest.raises(QaloraError, match="adapter kind 'dora' is unknown"):
        AdaptedLinear(quant_layer(), ("dora",), LoraConfig(rank=2))


def test_gradients_reach_every_kind_and_not_the_base():
    layer = adapted(("lota", "qalora", "scales"))
    before = {k: v.clone() for k, v in layer.base.state_dict().items()}
    x = torch.randn(6, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    for name in ("lora_A.weight", "lora_B.weight", "log_scale", "lota_A", "lota_B"):
        assert layer.get_parameter(name).grad is not None and layer.get_parameter(name).grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    for k, v in layer.base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_triple_backward_matches_autograd_on_the_dense_weight():
    """TripleLinear rebuilds the weight in backward; compare with plain autograd through it."""
    layer = adapted(("lota", "scales"))
    x = torch.randn(6, 128, dtype=torch.float64)
    with float64(layer):
        x1 = x.clone().requires_grad_()
        layer(x1).sin().sum().backward()
        g1 = {n: p.grad.clone() for n, p in layer.named_parameters()}
        for p in layer.parameters():
            p.grad = None
        x2 = x.clone().requires_grad_()
        w = layer.effective_triple(torch.float64).weight()
        (x2 @ w.t() + layer.base.bias).sin().sum().backward()
        g2 = {n: p.grad.clone() for n, p in layer.named_parameters()}
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-12)  # fp64, same math
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=0, atol=1e-10, msg=n)


def test_lota_codes_only_moves_codes_and_leaves_scale_and_offset_bit_for_bit():
    """``lota_codes_only``: the forward is ``scale * (q + m) + offset`` and the merge writes only
    ``q' = q + m``: scale and offset stay the base's exact bytes (a form whose offsets are tied)."""
    base = quant_layer()
    layer = AdaptedLinear(base, ("lota",), LoraConfig(rank=8, alpha=16, lota_omega=2.0, lota_codes_only=True))
    randomize(layer)
    merged = merge_layer(layer)
    dq = merged.quantized_weight().codes().short() - base.quantized_weight().codes().short()
    assert dq.abs().max() == 1 and (dq != 0).float().mean() > 0.01
    assert torch.equal(merged.offset, base.offset) and torch.equal(merged.scale, base.scale)
    x = torch.randn(5, 128, dtype=torch.float64)
    with float64(layer, merged):
        torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=1e-9)   # one fp64 weight, two GEMM orders
    with pytest.raises(QaloraError, match="--lota-codes-only applies to method 'lota', not 'qalora'"):
        from qalora.adapters.methods import method_kinds

        method_kinds("qalora", LoraConfig(lota_codes_only=True))
