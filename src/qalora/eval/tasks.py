"""The evaluation task registry: every task by name, and the run order of a request.

The types (items, task record, selection) live in ``qalora.eval.task_spec``.
"""

from __future__ import annotations

from collections.abc import Iterable

from qalora.errors import QaloraError
from qalora.eval import mmlu, multiple_choice
from qalora.eval.task_spec import TaskSpec

PERPLEXITY = TaskSpec(name="perplexity", kind="perplexity", reported="perplexity",
                      summary="perplexity on the first windows of held-out LAMBADA passages")


TASKS: tuple[TaskSpec, ...] = (PERPLEXITY, mmlu.MMLU, *multiple_choice.TASKS, multiple_choice.COMMONSENSE)


def registry() -> dict[str, TaskSpec]:
    """Every task by name, in display order."""
    return {spec.name: spec for spec in TASKS}


def resolve_tasks(names: str | Iterable[str]) -> list[str]:
    """Task names in run order: comma-separated entries split, duplicates dropped, each average
    task preceded by its members.

    Raises:
        QaloraError: no task, or an unknown name (the message lists the known ones).
    """
    if isinstance(names, str):
        names = [names]
    wanted = [n.strip() for entry in names for n in str(entry).split(",") if n.strip()]
    known = registry()
    if not wanted:
        raise QaloraError(f"no task given; use one or more of: {', '.join(known)}")
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise QaloraError(f"task {unknown[0]!r} is unknown; use one or more of: {', '.join(known)}")
    order: list[str] = []
    for name in wanted:
        for n in (*known[name].members, name):
            if n not in order:
                order.append(n)
    return order
