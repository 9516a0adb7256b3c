"""Context-once scoring against score_tokens (every choice as its own full sequence)."""

import pytest
import torch

from qalora.errors import QaloraError
from qalora.eval.scoring import score_tokens
from qalora.eval.shared_prefix import score_shared_context


def _groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(1, 300, (n,), generator=g).tolist()  # noqa: E731
    return [(rand(12), [rand(1), rand(4), rand(2), rand(7)]),   # mixed lengths: two passes
            (rand(30), [rand(1), rand(1), rand(1), rand(1)]),   # MMLU-like: one pass
            (rand(1), [rand(3), rand(1)])]


def test_equals_score_tokens(tiny_model):
    groups = _groups()
    got = score_shared_context(tiny_model, groups)
    for (ctx, conts), res in zip(groups, got):
        ref = score_tokens(tiny_model, [(ctx, y) for y in conts], batch_size=8)
        for r, s, y in zip(ref, res, conts):
            assert s.n_tokens == r.n_tokens == len(y)
            # fp32, the same math in another order (cached keys/values vs one pass): 1e-4 relative
            assert s.loglik == pytest.approx(r.loglik, rel=1e-4, abs=1e-4)
            assert s.is_greedy == r.is_greedy


def test_greedy_flag_for_the_models_own_continuation(tiny_model):
    ctx = [5, 17, 42]
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(tiny_model(torch.tensor([ids])).logits[0, -1].argmax()))
    res = score_shared_context(tiny_model, [(ctx, [ids[3:], [ids[3], (ids[4] + 1) % 300, ids[5]]])])[0]
    assert res[0].is_greedy and not res[1].is_greedy


def test_keeps_training_flag_and_refuses_empty(tiny_model):
    tiny_model.train()
    score_shared_context(tiny_model, [([1, 2], [[3]])])
    assert tiny_model.training
    with pytest.raises(QaloraError, match="non-empty"):
        score_shared_context(tiny_model, [([1, 2], [[3], []])])
    with pytest.raises(QaloraError, match="non-empty"):
        score_shared_context(tiny_model, [([], [[3]])])
