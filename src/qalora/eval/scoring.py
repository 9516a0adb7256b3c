"""Log-likelihood of continuations given contexts: the primitive of multiple-choice scoring.

For a request ``(context, continuation)`` with token ids ``c = enc(context)`` and
``y = enc(context + continuation)[len(c):]`` (the lm-evaluation-harness convention: the pair
is encoded as one string so merges across the boundary count, and trailing whitespace of the
context moves to the continuation first)::

    loglik    = sum_{j} log p(y_j | c, y_<j)
    is_greedy = all_j  argmax_v p(v | c, y_<j) == y_j

An empty context is replaced by the tokenizer's bos (else eos) token, as lm-eval does.
Sequences longer than ``max_length`` lose tokens on the left (the continuation is always kept
whole). Requests run longest first in right-padded batches; results come back in input order.
Log-probabilities are computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qalora.data.pairs import encode_pair  # noqa: F401  (the scorer's tokenization, shared with raw training)
from qalora.errors import QaloraError


@dataclasses.dataclass(frozen=True)
class Scored:
    """One request's result: summed continuation log-prob (nats), whether greedy decoding
    would produce the continuation, and its length in tokens."""

    loglik: float
    is_greedy: bool
    n_tokens: int


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def score_tokens(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8,
                 max_length: int = 2048, progress: bool = False, desc: str = "scoring") -> list[Scored]:
    """:class:`Scored` for already-tokenized ``(context_ids, continuation_ids)`` pairs.

    Each batch is ``[B, T]`` right-padded with 0 (padding sits after every scored position, so a
    causal model never attends to it); logits ``[B, T, V]`` are cast to fp32 and only the
    continuation positions are gathered.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QaloraError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    seqs = []
    for ctx, cont in pairs:
        if not cont:
            raise QaloraError("a continuation to score has no tokens")
        if len(cont) > max_length:
            raise QaloraError(f"a continuation of {len(cont)} tokens exceeds max_length {max_length}")
        ids = (list(ctx) + list(cont))[-(max_length + 1):]
        seqs.append((ids[:-1], len(cont)))  # inputs; the last token is only ever a target
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[Scored | None] = [None] * len(seqs)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
                idx = order[start:start + batch_size]
                width = len(seqs[idx[0]][0])
                batch = torch.zeros(len(idx), width, dtype=torch.long)
                for row, i in enumerate(idx):
                    ids = seqs[i][0]
                    batch[row, :len(ids)] = torch.tensor(ids)
                logp = F.log_softmax(model(batch.to(device)).logits.float(), dim=-1)  # [B, T, V]
                for row, i in enumerate(idx):
                    ids, n_cont = seqs[i]
                    full = pairs[i][0] + pairs[i][1]
                    targets = torch.tensor(full[-n_cont:], device=logp.device)   # [n_cont]
                    rows = logp[row, len(ids) - n_cont:len(ids)]                  # [n_cont, V]
                    loglik = rows.gather(1, targets[:, None]).sum().item()
                    greedy = bool((rows.argmax(-1) == targets).all())
                    out[i] = Scored(loglik=loglik, is_greedy=greedy, n_tokens=n_cont)
                del logp
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def loglikelihoods(model: torch.nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]], *,
                   batch_size: int = 8, max_length: int = 2048, progress: bool = False,
                   desc: str = "scoring") -> list[Scored]:
    """:class:`Scored` for each ``(context, continuation)`` string pair, in input order."""
    pairs = [encode_pair(tokenizer, c, y) for c, y in requests]
    return score_tokens(model, pairs, batch_size=batch_size, max_length=max_length, progress=progress, desc=desc)
