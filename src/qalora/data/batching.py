"""Examples → token ids with prompt-masked labels, and deterministic length-bucketed batches.

Loss masking: ``labels[t] = -100`` on every prompt token and on padding, ``labels[t] =
input_ids[t]`` on the response tokens, including the token that closes the response (the chat
template's end-of-turn, or eos with the plain template) — so the model learns to stop.

Batching is a pure function of ``(lengths, batch_size, seed, epoch)``: a trainer that resumes at
batch ``k`` of an epoch rebuilds the same plan and skips the first ``k`` batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qalora.data.readers import Example
from qalora.data.pairs import encode_pair
from qalora.errors import QaloraError

IGNORE_INDEX = -100

#: Prompt of the plain template (tokenizers without a chat template); the response follows,
#: then eos. Earlier turns of a conversation are rendered the same way, each answer followed
#: by a blank line; a system message goes first, followed by a blank line.
PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"

#: Length buckets: indices are shuffled, cut into chunks of ``batch_size * CHUNK_BATCHES``, and
#: each chunk is sorted by length before it is split into batches.
CHUNK_BATCHES = 50


def _ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` gives a list, or a dict / BatchEncoding in transformers 5."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        encoded = encoded[0]
    return [int(i) for i in encoded]


def _special_prefix(tokenizer: Any) -> list[int]:
    """The ids ``tokenizer(text)`` puts before the text (e.g. bos), found by encoding a probe."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _trim_after_end(tokenizer: Any, response: list[int]) -> list[int]:
    """Drop whitespace-only tokens the template puts after the end-of-turn token (``<|im_end|>\\n``)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if tokenizer.eos_token_id is not None:
        special.add(tokenizer.eos_token_id)
    ends = [k for k, t in enumerate(response) if t in special]
    if ends and ends[-1] < len(response) - 1:
        tail = response[ends[-1] + 1:]
        if not tokenizer.decode(tail).strip():
            return response[: ends[-1] + 1]
    return response


def _chat_ids(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    messages = [dict(m) for m in example.messages]
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        return prompt, full[len(prompt):]
    # The template renders the prompt differently inside the full conversation: split the strings.
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text) or len(full_text) == len(prompt_text):
        raise QaloraError(f"{example.source}: the tokenizer's chat template renders the conversation without "
                          "the prompt as a prefix, so the response cannot be located; use a tokenizer whose "
                          "template appends each turn, or clear tokenizer.chat_template to use the plain template")
    return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
            tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"])


def plain_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The plain-template prompt of ``messages[:-1]`` (everything before the final response)."""
    parts = []
    for m in messages[:-1]:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            parts.append(PLAIN_PROMPT.format(user=m["content"]))
        else:  # an earlier assistant answer
            parts.append(m["content"] + "\n\n")
    if messages[-2]["role"] != "user":  # e.g. ... assistant, assistant: still end with the response header
        parts.append("### Response:\n")
    return "".join(parts)


def _plain_ids(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    if tokenizer.eos_token_id is None:
        raise QaloraError(f"{example.source}: the tokenizer has neither a chat template nor an eos token, so a "
                          "response cannot be closed; set tokenizer.eos_token or a chat template")
    prompt = tokenizer(plain_prompt(example.messages), add_special_tokens=False)["input_ids"]
    prompt = _special_prefix(tokenizer) + prompt
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, response


def prompt_response_ids(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    """Untruncated ``(prompt ids, response ids)``; the response ends with its closing token.

    With ``tokenizer.chat_template``: prompt = template of ``messages[:-1]`` with the generation
    prompt, response = the rest of the template of all messages (checked to extend the prompt;
    whitespace after the end-of-turn token is dropped). Otherwise :data:`PLAIN_PROMPT` (after
    the tokenizer's bos, if it adds one) and ``response + eos``. A raw example (a completion
    record) is the scorer's split of ``(prompt, completion)`` (:func:`qalora.data.pairs.encode_pair`):
    no template, no eos.
    """
    if example.template == "raw":
        return encode_pair(tokenizer, example.messages[-2]["content"], example.response)
    if getattr(tokenizer, "chat_template", None):
        prompt, response = _chat_ids(tokenizer, example)
        return list(prompt), _trim_after_end(tokenizer, list(response))
    return _plain_ids(tokenizer, example)


def encode_example(tokenizer: Any, example: Example, max_seq_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, at most ``max_seq_len`` long.

    ``labels`` is ``-100`` on the prompt tokens and equals ``input_ids`` on the response tokens.
    An overlong example loses the end of its response, never the prompt.

    Raises:
        QaloraError: the prompt leaves no room for a response token (names the source, the
            prompt length and ``max_seq_len``).
    """
    _check_max_seq_len(max_seq_len)
    return _truncate(example, *prompt_response_ids(tokenizer, example), max_seq_len)


def _check_max_seq_len(max_seq_len: int) -> None:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise QaloraError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")


def _truncate(example: Example, prompt: list[int], response: list[int],
              max_seq_len: int) -> tuple[list[int], list[int]]:
    room = max_seq_len - len(prompt)
    if room < 1:
        raise QaloraError(f"{example.source}: the prompt is {len(prompt)} tokens, which leaves no room for the "
                          f"response within max_seq_len {max_seq_len}; use a larger --max-seq-len")
    response = response[:room]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


class TokenizedDataset:
    """Examples tokenized once: ``input_ids[i]``, ``labels[i]`` (lists of ints), ``lengths[i]``.

    Args:
        skip_too_long: True (for the default data) drops, and counts in ``n_skipped``, every
            example longer than ``max_seq_len``; False (user data) keeps every example,
            cutting overlong responses (counted in ``n_truncated``) and raising when a prompt
            alone does not fit.
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_seq_len: int, skip_too_long: bool = False):
        self.max_seq_len = max_seq_len
        self.input_ids: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.sources: list[str] = []
        self.n_skipped = 0
        self.n_truncated = 0
        _check_max_seq_len(max_seq_len)
        for example in examples:
            prompt, response = prompt_response_ids(tokenizer, example)
            if len(prompt) + len(response) > max_seq_len:
                if skip_too_long:
                    self.n_skipped += 1
                    continue
                self.n_truncated += 1
            ids, labels = _truncate(example, prompt, response, max_seq_len)
            self.input_ids.append(ids)
            self.labels.append(labels)
            self.sources.append(example.source)
        if not self.input_ids:
            raise QaloraError(f"none of the {len(examples)} examples fits max_seq_len {max_seq_len} "
                              f"({self.n_skipped} skipped as too long); use a larger --max-seq-len")
        self.lengths = [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.input_ids[i], self.labels[i]


def batch_plan(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of dataset indices for one epoch; a pure function of its inputs.

    With ``g = torch.Generator().manual_seed(seed * 1000003 + epoch)``: shuffle all indices
    (``randperm``), cut them into chunks of ``batch_size * 50``, sort each chunk by length
    (stable, so ties keep the shuffled order), split it into batches of ``batch_size`` (a
    chunk's last batch may be smaller), then shuffle the batch order with the same ``g``.
    Every index appears exactly once.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QaloraError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * CHUNK_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        bucket = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches.extend(bucket[k:k + batch_size] for k in range(0, len(bucket), batch_size))
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


def padding_fraction(plan: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded ``[B, T]`` slots (T = longest in each batch) that are padding."""
    slots = sum(len(batch) * max(lengths[i] for i in batch) for batch in plan if batch)
    used = sum(lengths[i] for batch in plan for i in batch)
    return 1.0 - used / slots if slots else 0.0


def collate(dataset: TokenizedDataset, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded int64 tensors of one batch, T = the longest example in it.

    Returns:
        ``input_ids`` [B, T] (``pad_id`` on padding), ``attention_mask`` [B, T] (1 on tokens,
        0 on padding) and ``labels`` [B, T] (``-100`` on prompt and padding).
    """
    if not indices:
        raise QaloraError("collate needs at least one index, got an empty batch")
    if pad_id is None:
        raise QaloraError("pad_id is None; pass tokenizer.pad_token_id, or eos_token_id when there is no pad token")
    rows = [dataset[i] for i in indices]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)          # [B, T]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)       # [B, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)            # [B, T]
    for b, (ids, labs) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[b, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    """``tokenizer.pad_token_id``, else its eos id (padding is masked, so any id works)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise QaloraError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad
