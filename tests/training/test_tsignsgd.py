"""t-SignSGD against a naive reference (Python lists, sorted quantile), its schedule, its state."""

import math

import pytest
import torch

from qalora.training.tsignsgd import TAU, TSignSGD, grad_threshold, sigma_at


def naive_update(p: list[float], g: list[float], sigma: float) -> list[float]:
    a = sorted(abs(x) for x in g)
    thr = a[min(max(math.ceil(sigma * len(a)), 1), len(a)) - 1]          # nearest-rank quantile
    out = []
    for pi, gi in zip(p, g):
        step = (1 if gi > 0 else -1) if abs(gi) > thr and abs(gi) > TAU else 0
        out.append(float(min(1, max(-1, round(pi - step)))))
    return out


def test_update_matches_the_naive_reference():
    gen = torch.Generator().manual_seed(0)
    p = torch.randint(-1, 2, (13, 7), generator=gen).float()
    opt = TSignSGD([p], total_steps=10)
    want = p.flatten().tolist()
    for step in range(1, 11):
        g = torch.randn(13, 7, generator=gen)
        g[0, :3] = 0.0                                                   # zero gradients never move
        want = naive_update(want, g.flatten().tolist(), sigma_at(step, 10))
        p.grad = g
        opt.step()
        assert p.flatten().tolist() == want, step
    assert set(p.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_at_most_the_top_fraction_moves():
    p = torch.zeros(1000)
    p.grad = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    opt = TSignSGD([p], total_steps=100)
    opt.step()                                                           # σ(1) = 0.95 + 0.049/80
    assert opt.last_changed == int((p != 0).sum()) and 0 < opt.last_changed <= 50
    assert torch.equal(p[p != 0], -torch.sign(p.grad[p != 0]))


def test_schedule():
    assert sigma_at(80, 100) == pytest.approx(0.999)
    assert sigma_at(40, 100) == pytest.approx(0.95 + 0.5 * 0.049)
    assert sigma_at(90, 100) == pytest.approx(0.999 + 0.5 * 0.0009)
    assert sigma_at(100, 100) == sigma_at(150, 100) == 0.9999
    assert float(grad_threshold(torch.tensor([3.0, -1.0, 2.0, 4.0]), 0.5)) == 2.0


def test_state_dict_carries_the_schedule():
    p = torch.zeros(10)
    opt = TSignSGD([p], total_steps=5)
    p.grad = torch.ones(10)
    opt.step()
    opt.step()
    again = TSignSGD([torch.zeros(10)], total_steps=5)
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["step"] == 2
