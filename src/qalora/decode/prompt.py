"""The prompt of ``qalora generate`` as token ids: one user turn rendered with the tokenizer's
chat template (when asked and when the tokenizer has one), else the plain text."""

from __future__ import annotations

import torch


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids ``[1, T]`` of ``prompt``: with ``chat`` and a chat template, the template's
    rendering of ``[{"role": "user", "content": prompt}]`` followed by the assistant's turn
    header (``add_generation_prompt``); otherwise the tokenizer's encoding of the text."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]
