"""Training and validation batches for the trainer, addressed by micro-batch number.

Micro-batch ``k`` lives in epoch ``k // n`` at position ``k % n`` of that epoch's
``batch_plan`` (``n`` batches per epoch): a pure function of ``k``, the seed and the data, which
is what makes resuming exact. Validation is a fixed list of batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qalora.config import TrainConfig
from qalora.data.instruct import (Example, TokenizedDataset, batch_plan, collate, default_mixture, is_default,
                                  load_examples, pad_token_id)
from qalora.data.mixture import is_validation
from qalora.errors import QaloraError

VAL_SEED = 1234  # validation batches never depend on the run's seed


def _prompt_text(example: Example) -> str:
    return "\n".join(m["content"] for m in example.messages[:-1])


def split_examples(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """User data: a stable 5 % validation split by prompt hash (at least one example each side)."""
    if len(examples) < 2:
        raise QaloraError(f"the data has {len(examples)} example; training needs at least 2 "
                          "(one is held out for the validation loss)")
    val = [e for e in examples if is_validation(_prompt_text(e))]
    train = [e for e in examples if not is_validation(_prompt_text(e))]
    if not val:
        train, val = examples[:-max(1, len(examples) // 20)], examples[-max(1, len(examples) // 20):]
    if not train:
        train, val = val[1:], val[:1]
    return train, val


@dataclass
class TrainData:
    train: TokenizedDataset
    val: TokenizedDataset
    batch_size: int
    eval_batches: int
    seed: int
    pad_id: int
    _plans: dict = field(default_factory=dict)
    _val: list | None = None

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val)

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: batch_plan(self.train.lengths, self.batch_size, self.seed, epoch)}
        return self._plans[epoch]

    def train_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Micro-batch number ``k`` (0-based, counting across epochs)."""
        n = len(self._plan(0))
        return collate(self.train, self._plan(k // n)[k % n], self.pad_id)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        """The fixed validation batches (built once)."""
        if self._val is None:
            plan = batch_plan(self.val.lengths, self.batch_size, VAL_SEED, 0)[: self.eval_batches]
            self._val = [collate(self.val, idx, self.pad_id) for idx in plan]
        return self._val


def load_train_data(spec: str, tokenizer, cfg: TrainConfig) -> TrainData:
    """Read, split and tokenize ``spec`` (``"default"``, a JSON/JSONL file or a datasets folder)."""
    if is_default(spec):
        train_ex, val_ex = default_mixture("train", seed=cfg.seed), default_mixture("validation")
    else:
        train_ex, val_ex = split_examples(load_examples(spec))
    skip = is_default(spec)  # the embedded mixture drops overlong items; user data must fit
    train = TokenizedDataset(train_ex, tokenizer, cfg.max_seq_len, skip_too_long=skip)
    val = TokenizedDataset(val_ex, tokenizer, cfg.max_seq_len, skip_too_long=skip)
    return TrainData(train, val, cfg.batch_size, cfg.eval_batches, cfg.seed, pad_token_id(tokenizer))
