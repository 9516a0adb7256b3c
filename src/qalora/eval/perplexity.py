"""Perplexity of a causal LM on fixed-length windows of held-out text.

For windows ``x[w, 0..T-1]`` (``T = seq_len``) the model predicts tokens ``1..T-1`` of each
window from the ones before it (no context crosses a window boundary)::

    nll  = -1/N * sum_{w, t=1..T-1} log p(x[w, t] | x[w, <t])      N = n_windows * (T - 1)
    ppl  = exp(nll)

Log-probabilities are computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qalora.data.text import heldout_texts, token_windows
from qalora.errors import QaloraError


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token, in nats.
        n_tokens: number of predicted tokens, ``n_windows * (seq_len - 1)``.
        n_windows: number of windows evaluated (``<= max_windows``).
        seq_len: tokens per window.
    """

    perplexity: float
    nll: float
    n_tokens: int
    n_windows: int
    seq_len: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (cpu for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def window_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch of windows.

    Args:
        logits: ``[B, T, V]`` (any float dtype; cast to fp32).
        input_ids: ``[B, T]``.
    Returns:
        fp32 scalar ``-sum_{b, t=1..T-1} log softmax(logits[b, t-1])[input_ids[b, t]]``.
    """
    shifted = logits[:, :-1].float()                                  # [B, T-1, V]
    targets = input_ids[:, 1:]                                        # [B, T-1]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Iterable[str] | None = None, *,
               seq_len: int = 512, max_windows: int = 32, batch_size: int = 4, progress: bool = True,
               device: str | torch.device | None = None) -> PerplexityResult:
    """Perplexity of a causal LM (``model(input_ids).logits``: ``[B, T, V]``) on held-out text.

    The windows are the FIRST ``max_windows`` consecutive ``seq_len``-token windows of the token
    stream of ``texts`` (default: :func:`qalora.data.text.heldout_texts`, LAMBADA passages joined
    by eos); only as much text as they need is tokenized. Fewer windows are used when the texts
    are shorter. The model runs in eval mode under ``torch.inference_mode()`` (its training flag
    is restored afterwards), ``batch_size`` windows at a time; only one batch's logits are held.

    Args:
        device: where the windows are sent; default the device of the model's first parameter.

    Raises:
        QaloraError: ``seq_len < 2``, ``max_windows < 1``, ``batch_size < 1``, or the texts give
            no full window.
    """
    for name, value, minimum in (("seq_len", seq_len, 2), ("max_windows", max_windows, 1),
                                 ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise QaloraError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if texts is None:
        texts = heldout_texts()
    windows = token_windows(tokenizer, texts, seq_len, limit_tokens=max_windows * seq_len)  # [n, T]
    device = torch.device(device) if device is not None else _model_device(model)

    was_training = model.training
    model.eval()
    nll_sum = 0.0  # python float (fp64) accumulator across batches
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch",
                              disable=not progress):
                ids = windows[start:start + batch_size].to(device)  # [B, T]
                logits = model(ids).logits                          # [B, T, V]
                nll_sum += window_nll_sum(logits, ids).item()
                del logits
    finally:
        model.train(was_training)

    n_windows = windows.shape[0]
    n_tokens = n_windows * (seq_len - 1)
    nll = nll_sum / n_tokens
    ppl = math.exp(nll) if nll < 709.0 else math.inf  # exp overflows a float past ~709.78
    return PerplexityResult(perplexity=ppl, nll=nll, n_tokens=n_tokens, n_windows=n_windows, seq_len=seq_len)
