"""What ``qalora reproduce`` runs: the rows of the paper's Table 1 and the budgets.

Rows (every tuned row uses the same data, steps, rank, alpha, learning rate and seed)::

    base                   the unquantized model (fp32 compute)
    rtn / gptq             the base quantized to INTn without tuning
    lora                   16-bit LoRA, merged into the dense weights
    qlora                  QLoRA on an NF4 base, merged in 16 bits (kept fp32 here)
    qlora+rtn / qlora+gptq QLoRA merged in 16 bits, then quantized again to INTn (lossy)
    qalora                 QA-LoRA on the GPTQ INTn base, merged exactly into the offsets

Bit widths 4, 3, 2 at group size 32 (the paper's), plus one larger group size at INT3.
"""

from __future__ import annotations

import dataclasses

from qalora.errors import QaloraError
from qalora.reproduce.grids import grid_name

# The paper's seven commonsense tasks, plus SocialIQA (reported beside them, not averaged).
COMMONSENSE = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
EXTRA_CHOICE = ("siqa",)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of everything a run does.

    Attributes:
        steps: optimizer steps of every tuned row (batch ``batch_size`` x ``max_seq_len`` tokens).
        calib_samples: GPTQ calibration sequences (of 256 tokens).
        choice_limit: items per commonsense task (seeded subset; ``None`` = all).
        mmlu_limit / mmlu5_limit: MMLU items, 0-shot / 5-shot, spread over the 57 subjects.
        ppl_windows: 512-token perplexity windows of held-out LAMBADA passages.
        eval_batch_size: sequences per scoring forward.
    """

    name: str
    steps: int
    calib_samples: int
    choice_limit: int | None
    mmlu_limit: int | None
    mmlu5_limit: int | None
    ppl_windows: int
    eval_batch_size: int = 8
    batch_size: int = 4
    max_seq_len: int = 256
    lr: float | None = 2e-4  # the original code's one rate (the paper suite); None: each method's own
    rank: int = 64
    alpha: float = 16.0
    seed: int = 0


BUDGETS = {
    # about two hours on 2 CPU cores (see docs/RESULTS.md for the measured time)
    "small": Budget("small", steps=100, calib_samples=32, choice_limit=80, mmlu_limit=114, mmlu5_limit=57,
                    ppl_windows=4),
    # a GPU: every item, longer training
    "full": Budget("full", steps=1000, calib_samples=128, choice_limit=None, mmlu_limit=None, mmlu5_limit=None,
                   ppl_windows=64, eval_batch_size=32, batch_size=16),
    # minutes: checks the whole path end to end (tests, smoke runs); its numbers mean nothing
    "smoke": Budget("smoke", steps=2, calib_samples=4, choice_limit=4, mmlu_limit=4, mmlu5_limit=2, ppl_windows=1,
                    max_seq_len=128),
}


def budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise QaloraError(f"budget {name!r} is unknown; use one of: {', '.join(BUDGETS)}")
    return BUDGETS[name]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table. ``bits``/``group_size`` are ``None`` for 16/32-bit rows."""

    method: str
    bits: int | None = None
    group_size: int | None = None

    @property
    def id(self) -> str:
        return self.method if self.bits is None else f"{self.method}-{grid_name(self.bits, self.group_size)}"

    @property
    def tuned(self) -> bool:
        return self.method in ("lora", "qlora", "qlora+rtn", "qlora+gptq", "qalora")

    @property
    def label(self) -> str:
        names = {"base": "base (fp32)", "rtn": "RTN, no tuning", "gptq": "GPTQ, no tuning", "lora": "LoRA (16-bit)",
                 "qlora": "QLoRA (NF4 + 16-bit merge)", "qlora+rtn": "QLoRA w/ RTN", "qlora+gptq": "QLoRA w/ GPTQ",
                 "qalora": "QA-LoRA (merged)"}
        bits = "" if self.bits is None else f" INT{self.bits} g{self.group_size}"
        return names[self.method] + bits


def plan_rows(bits: tuple[int, ...] = (4, 3, 2), group_size: int = 32, extra_group: int | None = 64,
              extra_bits: tuple[int, ...] = (3,)) -> list[Row]:
    """The rows in table order (dependencies come first: quantized bases before QA-LoRA)."""
    rows = [Row("base"), Row("lora"), Row("qlora")]
    sizes = [(b, group_size) for b in bits] + [(b, extra_group) for b in extra_bits if extra_group]
    for method in ("rtn", "gptq", "qlora+rtn", "qlora+gptq", "qalora"):
        rows += [Row(method, b, g) for b, g in sizes if not (method in ("rtn", "qlora+rtn") and g != group_size)]
    return rows


def check_paper_rows(suite: str, paper_rows: list[str] | None) -> None:
    """Refuse (one line) ``paper_rows`` for another suite, or a method no paper row has."""
    if paper_rows is None:
        return
    if suite != "paper":
        raise QaloraError("--paper-rows applies to --suite paper only")
    methods = list(dict.fromkeys(r.method for r in plan_rows()))
    bad = [m for m in paper_rows if m not in methods]
    if bad or not paper_rows:
        raise QaloraError(f"paper row {bad[0] if bad else ''!r} is unknown; use: {', '.join(methods)}")
