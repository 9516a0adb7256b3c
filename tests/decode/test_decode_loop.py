"""The decode loop against ``model.generate``, on a tiny quantized Llama (fp32 reference kernel)."""

import pytest
import torch

from qalora.config import DecodeConfig
from qalora.decode import decode
from qalora.decode.step import bound_kernels
from qalora.errors import QaloraError
from qalora.nn.quant_linear import QuantLinear
from qalora.config import QuantConfig
from qalora.patch import set_kernel
from qalora.quant.model import quantize_model


@pytest.fixture
def qmodel(tiny_model):
    quantize_model(tiny_model, QuantConfig(bits=3, group_size=32, method="rtn"), progress=False)
    set_kernel(tiny_model, "reference")
    return tiny_model.eval()


def _hf(model, ids, n, eos=None, min_new=None):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n if min_new is None else min_new,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_generate(qmodel, batch):
    ids = torch.randint(3, 300, (batch, 9), generator=torch.Generator().manual_seed(batch))
    ours = decode(qmodel, ids, DecodeConfig(max_new_tokens=20))
    assert torch.equal(ours, _hf(qmodel, ids, 20))


def test_greedy_logits_equal_the_uncached_forward(qmodel, monkeypatch):
    """Each step's logits (those the loop chooses from) are the full forward's at that position,
    to fp32 rounding: the preallocated cache attends to exactly the tokens before it."""
    import qalora.decode.loop as loop

    seen = []
    choose = loop.choose
    monkeypatch.setattr(loop, "choose", lambda logits, *a: seen.append(logits.clone()) or choose(logits, *a))
    ids = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    out = decode(qmodel, ids, DecodeConfig(max_new_tokens=6))
    seq = torch.cat([ids, out], dim=1)
    with torch.no_grad():
        full = qmodel(seq).logits[0]                                   # [T + 6, V]
    assert len(seen) == 6
    # one token at a time against one pass over the sequence: the GEMMs group the sums differently
    torch.testing.assert_close(torch.cat(seen), full[ids.shape[1] - 1:-1], rtol=0, atol=1e-5)
    assert torch.equal(full[ids.shape[1] - 1:-1].argmax(-1), out[0])


def test_eos_ends_the_sequence_and_min_new_tokens_suppresses_it(qmodel):
    ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    free = decode(qmodel, ids, DecodeConfig(max_new_tokens=12))
    eos = int(free[0, 3])                       # make the 4th greedy token the end of sequence
    first = int((free[0] == eos).nonzero()[0])  # (or an earlier occurrence of the same token)
    short = decode(qmodel, ids, DecodeConfig(max_new_tokens=12), eos_token_id=eos)
    assert torch.equal(short, free[:, :first + 1])
    forced = decode(qmodel, ids, DecodeConfig(max_new_tokens=12), eos_token_id=eos, min_new_tokens=12)
    assert forced.shape == (1, 12) and torch.equal(forced, _hf(qmodel, ids, 12, eos=eos))


def test_sampling_is_seeded(qmodel):
    ids = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(3))
    cfg = DecodeConfig(max_new_tokens=10, temperature=1.3, top_k=40, top_p=0.9, seed=11)
    a, b = decode(qmodel, ids, cfg), decode(qmodel, ids, cfg)
    c = decode(qmodel, ids, DecodeConfig(max_new_tokens=10, temperature=1.3, top_k=40, top_p=0.9, seed=12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bound_kernels_give_the_same_output_and_are_released(qmodel):
    x = torch.randn(2, 64)
    layer = next(m for m in qmodel.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        plain = layer(x)
        with bound_kernels(qmodel, 2):
            assert layer._bound is not None
            bound = layer(x)
    assert layer._bound is None and torch.equal(plain, bound)


def test_bad_prompt_shape_is_one_line(qmodel):
    with pytest.raises(QaloraError, match="shape"):
        decode(qmodel, torch.tensor([1, 2, 3]))
    with pytest.raises(QaloraError, match="min_new_tokens"):
        decode(qmodel, torch.tensor([[1, 2]]), DecodeConfig(max_new_tokens=2), min_new_tokens=3)


def test_compiled_step_gives_the_eager_tokens(qmodel):
    """``compile=True`` (torch.compile of the one-token step, static cache) decodes the same
    greedy tokens as the eager loop, twice (the second call reuses the compiled step and cache)."""
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(9))
    eager = decode(qmodel, ids, DecodeConfig(max_new_tokens=8))
    for _ in range(2):
        assert torch.equal(decode(qmodel, ids, DecodeConfig(max_new_tokens=8, compile=True)), eager)
