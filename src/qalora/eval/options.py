"""Options of :func:`qalora.eval.evaluate.evaluate` (the CLI reads its defaults here). Torch-free,
so ``qalora --help`` builds its options without importing torch."""

from __future__ import annotations

import dataclasses
from typing import Any

from qalora.errors import QaloraError
from qalora.eval.mmlu import SHOTS
from qalora.eval.task_spec import Selection


def _field(default: Any, help_: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help_})


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Options of :func:`evaluate` (the CLI reads its defaults here)."""

    shots: int = _field(0, "MMLU examples, the first of each subject's dev split: 0 or 5 (other tasks are 0-shot)")
    limit: int | None = _field(None, "items per task, all if not given (MMLU: spread evenly over the 57 subjects; "
                                     "perplexity: see windows)")
    seed: int = _field(0, "seed of the --limit subset")
    subset: str = _field("random", "which --limit items: 'random' (seeded) or 'first' (file order, as lm-eval)")
    batch_size: int = _field(4, "sequences per forward pass (perplexity windows; choices with separate contexts)")
    max_length: int = _field(2048, "tokens per scored sequence; longer prompts lose tokens on the left")
    seq_len: int = _field(512, "tokens per perplexity window")
    windows: int = _field(32, "perplexity windows (first N of the held-out stream)")

    def __post_init__(self):
        if self.shots not in SHOTS or isinstance(self.shots, bool):
            raise QaloraError(f"shots {self.shots!r} is not supported; use one of: {', '.join(map(str, SHOTS))}")
        Selection(self.limit, self.seed, self.subset)  # validates limit, seed and subset
        for name, minimum in (("batch_size", 1), ("max_length", 2), ("seq_len", 2), ("windows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise QaloraError(f"{name} must be an integer >= {minimum}, got {value!r}")

    @property
    def selection(self) -> Selection:
        return Selection(self.limit, self.seed, self.subset)
