"""A (context, continuation) pair as token ids, split as lm-evaluation-harness splits it.

The pair is encoded as one string so merges across the boundary count, and trailing whitespace
of the context moves to the continuation first::

    c = enc(context.rstrip())        y = enc(context + continuation)[len(c):]

An empty context is replaced by the tokenizer's bos (else eos) token. The scorer
(:mod:`qalora.eval.scoring`) and raw training on completion records
(:mod:`qalora.data.batching`) both use it, so a model tuned on a task's items is trained on
exactly the tokens it is scored on.
"""

from __future__ import annotations

from typing import Any

from qalora.errors import QaloraError


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)`` split as lm-eval does (see module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not continuation:
        raise QaloraError("a continuation to score is empty; every choice needs text")
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise QaloraError("an empty context needs a bos or eos token in the tokenizer")
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:  # the boundary merged into the context's tokens: encode the continuation alone
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return ctx, cont
