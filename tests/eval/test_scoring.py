"""Continuation log-likelihoods against a naive one-request-at-a-time reference."""

import pytest
import torch
import torch.nn.functional as F

from qalora.errors import QaloraError
from qalora.eval.scoring import encode_pair, loglikelihoods, score_tokens


def _naive(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits.double(), -1)[0]
    n = len(cont)
    rows = logp[len(ctx) - 1:len(ctx) - 1 + n]
    tgt = torch.tensor(cont)
    return rows.gather(1, tgt[:, None]).sum().item(), bool((rows.argmax(-1) == tgt).all())


def test_batched_scores_equal_one_at_a_time(tiny_model):
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(1, 100, (n,), generator=g).tolist(), torch.randint(1, 100, (m,), generator=g).tolist())
             for n, m in [(5, 1), (12, 3), (1, 4), (7, 7), (20, 2)]]
    got = score_tokens(tiny_model, pairs, batch_size=2)
    for (ctx, cont), s in zip(pairs, got):
        ref, greedy = _naive(tiny_model, ctx, cont)
        assert s.n_tokens == len(cont)
        assert abs(s.loglik - ref) <= 1e-4 * max(1.0, abs(ref))  # fp32 vs fp64 log-softmax
        assert s.is_greedy == greedy


def test_greedy_flag_is_true_for_the_models_own_argmax(tiny_model):
    ctx = [3, 14, 15, 92]
    with torch.no_grad():
        nxt = int(tiny_model(torch.tensor([ctx])).logits[0, -1].argmax())
    assert score_tokens(tiny_model, [(ctx, [nxt])])[0].is_greedy


def test_left_truncation_keeps_the_continuation(tiny_model):
    ctx, cont = list(range(1, 40)), [5, 6]
    got = score_tokens(tiny_model, [(ctx, cont)], max_length=10)[0]
    ref, _ = _naive(tiny_model, ctx[-9:], cont)  # 10 model inputs: 9 context tokens + the first of cont
    assert abs(got.loglik - ref) <= 1e-4 * max(1.0, abs(ref))


def test_encode_pair_moves_trailing_space_and_uses_prefix_for_empty_context(tiny_tok):
    ctx, cont = encode_pair(tiny_tok, "the cat ", "sat")
    assert tiny_tok.decode(ctx) == "the cat"
    assert tiny_tok.decode(cont) == " sat"
    ctx, cont = encode_pair(tiny_tok, "", "sat")
    assert ctx == [tiny_tok.bos_token_id if tiny_tok.bos_token_id is not None else tiny_tok.eos_token_id]


def test_string_requests_and_errors(tiny_model, tiny_tok):
    a, b = loglikelihoods(tiny_model, tiny_tok, [("the cat", " sat"), ("the cat", " sat on the mat")])
    assert b.n_tokens > a.n_tokens and b.loglik < a.loglik
    with pytest.raises(QaloraError, match="empty"):
        loglikelihoods(tiny_model, tiny_tok, [("the cat", "")])
    with pytest.raises(QaloraError, match="batch_size"):
        score_tokens(tiny_model, [([1], [2])], batch_size=0)
