"""Top-k / top-p filtering against a naive per-row reference."""

import torch

from qalora.decode.sampling import choose, filter_logits, suppress


def _naive(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    x = row / temperature
    order = sorted(range(len(x)), key=lambda i: -float(x[i]))
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(torch.stack([x[i] for i in order]), 0)
    kept, mass = [], 0.0
    for i, p in zip(order, probs.tolist()):
        if mass >= top_p:
            break
        kept.append(i)
        mass += p
    return set(kept)


def test_filter_matches_naive():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for t, k, p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.5, 0, 0.8), (1.0, 5, 0.5), (2.0, 20, 0.95)]:
        f = filter_logits(logits, t, k, p)
        for b in range(4):
            kept = set(torch.isfinite(f[b]).nonzero().flatten().tolist())
            assert kept == _naive(logits[b], t, k, p), (t, k, p, b)


def test_greedy_choice_and_suppression():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert choose(logits, 0.0, 0, 1.0, None).tolist() == [[1], [0]]
    assert choose(suppress(logits, [1, 0]), 0.0, 0, 1.0, None).tolist() == [[2], [2]]
    g = torch.Generator().manual_seed(0)
    draws = choose(logits.repeat(200, 1), 1.0, 1, 1.0, g)  # top-1 sampling is the argmax
    assert set(draws[0::2].flatten().tolist()) == {1} and set(draws[1::2].flatten().tolist()) == {0}
