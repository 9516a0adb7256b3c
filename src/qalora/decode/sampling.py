"""Next-token choice from one step's logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch


def suppress(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """``logits [B, V]`` with ``token_ids`` set to ``-inf`` (a minimum length: eos is not allowed yet)."""
    if not token_ids:
        return logits
    logits = logits.clone()
    logits[:, token_ids] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``logits [B, V] / temperature``, then everything outside the ``top_k`` largest and outside
    the smallest set whose softmax mass reaches ``top_p`` set to ``-inf`` (the most likely token
    always stays). ``top_k = 0`` and ``top_p = 1`` keep every token."""
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]                    # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs                           # mass strictly above each token
        drop_sorted = before >= top_p                                          # first token: before = 0, kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def choose(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """``logits [B, V]`` → next tokens ``[B, 1]``: the argmax when ``temperature == 0``, else one
    draw from ``softmax(filter_logits(...))`` with ``generator``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
