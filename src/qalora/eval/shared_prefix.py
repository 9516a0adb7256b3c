"""Continuation log-likelihoods for choices that share one context, the context run once.

A multiple-choice item sends ``(c, y_1) … (c, y_k)`` with the same context tokens ``c`` (``C``
tokens; :func:`qalora.eval.scoring.encode_pair` keeps ``enc(context)`` for every choice).
:func:`qalora.eval.scoring.score_tokens` would run ``k`` rows of ``C + |y_i| - 1`` tokens; here::

    pass 1: c                        [1, C]       -> KV cache, logits of the last position only
    pass 2: y_i[:-1], right-padded   [k, L - 1]   on the cache repeated k times      (L = max |y_i|)

    loglik_i  = log p(y_i[0] | c) + sum_{j>=1} log p(y_i[j] | c, y_i[<j])
    is_greedy = every y_i[j] is the argmax at its position

Pass 2 is skipped when every continuation is one token (MMLU's letters, BoolQ's yes/no): one
forward of the context scores all choices, as lm-eval's logits cache does. The result equals
``score_tokens`` on the same pairs up to float reordering (a test bounds it). Contexts must fit
the model: callers send longer items to ``score_tokens``, which truncates on the left.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qalora.errors import QaloraError
from qalora.eval.scoring import Scored, _model_device

Group = tuple[list[int], Sequence[list[int]]]


def _score_group(model: torch.nn.Module, ctx: list[int], conts: Sequence[list[int]], device: torch.device) -> list[Scored]:
    """:class:`Scored` for each continuation of one context (module docstring)."""
    longer = [i for i, y in enumerate(conts) if len(y) > 1]
    out = model(torch.tensor([ctx], device=device), use_cache=bool(longer), logits_to_keep=1)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)                      # [V]
    top = int(first.argmax())
    logliks = [first[y[0]].item() for y in conts]
    greedy = [top == y[0] for y in conts]
    if longer:
        width = max(len(conts[i]) for i in longer) - 1
        batch = torch.zeros(len(longer), width, dtype=torch.long)                  # [k', L-1]
        for row, i in enumerate(longer):
            batch[row, :len(conts[i]) - 1] = torch.tensor(conts[i][:-1])
        cache = out.cache
        cache.batch_repeat_interleave(len(longer))
        logp = F.log_softmax(model(batch.to(device), cache=cache).logits.float(), dim=-1)  # [k', L-1, V]
        for row, i in enumerate(longer):
            targets = torch.tensor(conts[i][1:], device=logp.device)               # [|y|-1]
            rows = logp[row, :len(targets)]                                         # [|y|-1, V]
            logliks[i] += rows.gather(1, targets[:, None]).sum().item()
            greedy[i] = greedy[i] and bool((rows.argmax(-1) == targets).all())
        del logp
    return [Scored(loglik=ll, is_greedy=g, n_tokens=len(y)) for ll, g, y in zip(logliks, greedy, conts)]


def score_shared_context(model: torch.nn.Module, groups: Sequence[Group], *, progress: bool = False,
                         desc: str = "scoring") -> list[list[Scored]]:
    """``[[Scored per continuation] per group]`` for ``(context_ids, [continuation_ids, …])``
    groups, in input order; the model runs in eval mode under ``torch.inference_mode()``.

    Raises:
        QaloraError: an empty context or continuation.
    """
    for ctx, conts in groups:
        if not ctx or not conts or any(not y for y in conts):
            raise QaloraError("a shared-context group needs a non-empty context and non-empty continuations")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return [_score_group(model, list(ctx), conts, device)
                    for ctx, conts in tqdm(groups, desc=desc, unit="item", disable=not progress)]
    finally:
        model.train(was_training)
