"""The chunked head + cross entropy against ``F.cross_entropy`` over whole logits, and a few
training steps against the whole-logits path."""

import pytest
import torch
import torch.nn.functional as F

from qalora.training import head_loss
from qalora.training.head_loss import fused_head_ce


@pytest.mark.parametrize("chunk,bias", [(7, False), (64, True), (1000, False)])
def test_loss_and_grad_equal_whole_logits(chunk, bias):
    g = torch.Generator().manual_seed(0)
    n, d, v = 50, 16, 97
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(d, v, bias=bias).double().requires_grad_(False)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100                                   # unscored rows: no loss, no gradient
    ref = F.cross_entropy(head(h), t, ignore_index=-100, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, h)
    ours = fused_head_ce(h, head, t, chunk=chunk)
    (grad,) = torch.autograd.grad(3.0 * ours, h)     # the incoming gradient scales it
    # fp64 here, but the chunks compute in fp32: tolerances of fp32 rounding on values ~1e2
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, 3.0 * ref_grad, rtol=0, atol=1e-5)
    assert torch.equal(grad[::5], torch.zeros_like(grad[::5]))


def test_no_grad_path_and_trainable_head_refused(tiny_model):
    h = torch.randn(4, 64)
    head = tiny_model.get_output_embeddings()
    with torch.no_grad():
        val = fused_head_ce(h, head, torch.tensor([1, 2, -100, 3]))
        ref = F.cross_entropy(head(h), torch.tensor([1, 2, -100, 3]), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(val, ref, rtol=1e-6, atol=0)
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    assert head_loss.applies(tiny_model)
    head.weight.requires_grad_(True)                 # a trained head needs its own gradient: not this path
    assert not head_loss.applies(tiny_model)
    assert not head_loss.applies(torch.nn.Sequential(tiny_model))
