"""``evaluate``: run registered tasks on a model and return a JSON-able dict.

Result of a multiple-choice task (``acc`` / ``acc_norm`` as in
:mod:`qalora.eval.choice_scoring`, each ``{"value", "stderr", "n"}``, see
:mod:`qalora.eval.stats`)::

    {"kind": "multiple_choice", "split": "validation", "shots": 0, "n": 200, "n_available": 1838,
     "reported": "acc_norm", "acc": {...}, "acc_norm": {...}, "seconds": 41.2,
     "per_item": {"index": ["17", ...], "acc": [1, 0, ...], "acc_norm": [...]}}

``per_item`` keeps every item's outcome, so two models scored on the same items can be compared
paired (:mod:`qalora.eval.paired`).

MMLU adds ``acc_macro``, ``categories`` and ``subjects`` (:mod:`qalora.eval.mmlu`). An average
task (``commonsense``) holds ``score``: the unweighted mean over its members of each one's
reported metric, with ``se = sqrt(sum_k se_k^2) / K`` (tasks independent), and ``acc``: the
same mean of plain accuracies. ``perplexity`` is :class:`qalora.eval.perplexity.PerplexityResult`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from qalora.errors import QaloraError
from qalora.eval.choice_scoring import ItemScore, score_items
from qalora.eval.options import EvalOptions
from qalora.eval.stats import Estimate, accuracy, average
from qalora.eval.task_spec import TaskSpec
from qalora.eval.tasks import registry, resolve_tasks

#: How an item's outcome gives each metric.
METRICS: dict[str, Callable[[ItemScore], bool]] = {"acc": lambda s: s.acc, "acc_norm": lambda s: s.acc_norm}

#: Files one of which a Hugging Face tokenizer folder holds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "tekken.json")


def require_tokenizer(model: str | os.PathLike) -> None:
    """Refuse a model folder that exists but holds no tokenizer file (before its weights load).

    Raises:
        QaloraError: naming the folder and the files looked for.
    """
    folder = Path(str(model)).expanduser()
    is_model = (folder / "config.json").is_file() or (folder / "qalora.json").is_file()
    if folder.is_dir() and is_model and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise QaloraError(f"model folder {str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                          f"copy the tokenizer files of the model it came from into it")


def run_perplexity(model: torch.nn.Module, tokenizer: Any, options: EvalOptions, progress: bool) -> dict[str, Any]:
    from qalora.eval.perplexity import perplexity

    res = perplexity(model, tokenizer, seq_len=options.seq_len, max_windows=options.windows,
                     batch_size=options.batch_size, progress=progress)
    return {"kind": "perplexity", **res.to_dict()}


def run_choice(spec: TaskSpec, model: torch.nn.Module, tokenizer: Any, options: EvalOptions,
               progress: bool) -> dict[str, Any]:
    """Load the task's selected items, score them, summarise (module docstring)."""
    shots = options.shots if spec.uses_shots else 0
    chosen = spec.load(shots, options.selection)  # type: ignore[misc]
    scores = score_items(model, tokenizer, chosen.items, batch_size=options.batch_size,
                         max_length=options.max_length, progress=progress, desc=spec.name)
    out: dict[str, Any] = {"kind": "multiple_choice", "split": spec.split, "shots": shots, "n": len(scores),
                           "n_available": chosen.n_available, "reported": spec.reported}
    if spec.summarize is not None:
        out.update(spec.summarize(chosen.items, [s.acc for s in scores]))
    else:
        out.update({m: accuracy([METRICS[m](s) for s in scores]).to_dict() for m in spec.metrics})
    out["per_item"] = per_item(chosen.items, scores, spec.metrics)
    return out


def item_key(item) -> str:
    """An item's identity within its task: its source row, prefixed by its group (MMLU subject)."""
    return f"{item.group}/{item.index}" if item.group else str(item.index)


def per_item(items, scores: list[ItemScore], metrics) -> dict[str, list]:
    """Each scored item's key and 0/1 outcome per metric, in scoring order: what a paired
    comparison of two models on the same items needs (:mod:`qalora.eval.paired`)."""
    return {"index": [item_key(i) for i in items], **{m: [int(METRICS[m](s)) for s in scores] for m in metrics}}


def run_average(spec: TaskSpec, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over the members of their reported metric (``score``) and of ``acc``."""
    tasks = registry()
    reported = {m: tasks[m].reported for m in spec.members}
    score = average([Estimate(**results[m][metric]) for m, metric in reported.items()])
    acc = average([Estimate(**results[m]["acc"]) for m in spec.members])
    return {"kind": "average", "members": reported, "n": score.n, "reported": "score",
            "score": score.to_dict(), "acc": acc.to_dict()}


def evaluate(model: torch.nn.Module, tokenizer: Any, tasks: str | Iterable[str] = ("perplexity",), *,
             shots: int = EvalOptions.shots, limit: int | None = EvalOptions.limit, seed: int = EvalOptions.seed,
             subset: str = EvalOptions.subset, batch_size: int = EvalOptions.batch_size,
             max_length: int = EvalOptions.max_length, seq_len: int = EvalOptions.seq_len,
             windows: int = EvalOptions.windows, progress: bool = True) -> dict[str, Any]:
    """Run ``tasks`` (names or comma-separated names, see :func:`qalora.eval.tasks.registry`).

    Returns:
        ``{"tasks": [names in run order], "options": {...}, "results": {name: result}}`` with
        each result as in the module docstring plus its wall time ``seconds``.

    Raises:
        QaloraError: an unknown task, ``shots`` not 0 or 5, ``limit < 1``, a bad subset mode.
    """
    options = EvalOptions(shots=shots, limit=limit, seed=seed, subset=subset, batch_size=batch_size,
                          max_length=max_length, seq_len=seq_len, windows=windows)
    names = resolve_tasks(tasks)
    specs = registry()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        spec = specs[name]
        start = time.perf_counter()
        if spec.kind == "perplexity":
            res = run_perplexity(model, tokenizer, options, progress)
        elif spec.kind == "choice":
            res = run_choice(spec, model, tokenizer, options, progress)
        else:
            res = run_average(spec, results)
        res["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = res
    return {"tasks": names, "options": dataclasses.asdict(options), "results": results}
