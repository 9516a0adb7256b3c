"""Training methods as lists of adapter kinds, and the base each trains on.

    qalora   QA-LoRA offsets                         (+ scales with --train-scales)
    peqa     trained scales (PEQA / E2E-QP)
    lota     LoTA-QAF ternary code updates + offsets (+ QA-LoRA offsets with --with-qalora,
                                                      + scales with --train-scales)
    qlora    LoRA on an NF4 base (baseline, lossy merge)
    lora     LoRA on the unquantized model (baseline, lossy merge)
"""

from __future__ import annotations

from dataclasses import dataclass

from qalora.errors import QaloraError


def ordered(kinds) -> tuple[str, ...]:
    from qalora.adapters.kinds.registry import ordered as in_registry_order  # torch-free import of this module

    return in_registry_order(kinds)


@dataclass(frozen=True)
class Method:
    """``base``: ``quantized`` (a qalora checkpoint), ``nf4`` (the fp model, NF4 in memory) or
    ``fp``; ``kinds``: always attached; ``options``: the ``LoraConfig`` switches it accepts,
    each adding one kind (``FLAG_KINDS``); ``lr``: the method's default AdamW learning rate
    (``TrainConfig.lr`` when none is given; see ``DEFAULT_LR_NOTE``)."""

    name: str
    base: str
    kinds: tuple[str, ...]
    options: tuple[str, ...] = ()
    label: str = ""
    lr: float = 2e-4


FLAG_KINDS = {"train_scales": "scales", "with_qalora": "qalora"}

# Why each method has its own rate. QA-LoRA's A sees the group *mean* of its input
# (``[..., in] -> [..., in/L]``), about 1/sqrt(L) the size of what LoRA's A sees, so at one
# rate its output moves about sqrt(L) times slower (5.7x at L = 32, 8x at L = 64). Under AdamW,
# scaling the pooled input by c is the same run as scaling alpha by c, so the variance-matching
# parametrization (sqrt(L) * mean) was measured as ``--alpha 16*sqrt(L)`` against a higher rate:
# the rate wins (docs/LEARNING_RATES.md), and the paper's function (and PEFT's, and every adapter
# trained before) stays as it is. The rates are the validation-chosen ones of the task suite.
DEFAULT_LR_NOTE = "docs/LEARNING_RATES.md"

METHODS: dict[str, Method] = {
    "qalora": Method("qalora", "quantized", ("qalora",), ("train_scales",), "QA-LoRA", lr=2e-3),
    "peqa": Method("peqa", "quantized", ("scales",), (), "PEQA (scales)"),
    "lota": Method("lota", "quantized", ("lota",), ("train_scales", "with_qalora"), "LoTA-QAF", lr=2e-3),
    "qlora": Method("qlora", "nf4", ("lora",), (), "QLoRA"),
    "lora": Method("lora", "fp", ("lora",), (), "LoRA"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise QaloraError(f"method {name!r} is unknown; use one of {', '.join(METHODS)}")
    return METHODS[name]


def method_kinds(method: str, lora) -> tuple[str, ...]:
    """The kinds ``method`` attaches under ``lora``'s switches; refuses a switch the method does
    not take (e.g. ``--with-qalora`` on ``qalora``), naming those it does."""
    m = get_method(method)
    kinds = list(m.kinds)
    for flag, kind in FLAG_KINDS.items():
        if getattr(lora, flag, False):
            if flag not in m.options:
                takes = ", ".join("--" + o.replace("_", "-") for o in m.options) or "none"
                raise QaloraError(f"--{flag.replace('_', '-')} does not apply to method {method!r} "
                                  f"(its switches: {takes})")
            kinds.append(kind)
    if getattr(lora, "lota_codes_only", False) and "lota" not in kinds:
        raise QaloraError(f"--lota-codes-only applies to method 'lota', not {method!r}")
    return ordered(kinds)
