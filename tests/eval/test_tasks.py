"""Task registry, name resolution and the --limit subsets (even spread, seeded, reproducible)."""

import pytest

from qalora.errors import QaloraError
from qalora.eval.task_spec import ChoiceItem, Selection, allocate, pick, select
from qalora.eval.tasks import registry, resolve_tasks


def test_registry_holds_perplexity_mmlu_and_the_commonsense_sets():
    names = list(registry())
    assert names == ["perplexity", "mmlu", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq",
                     "openbookqa", "siqa", "commonsense"]
    assert registry()["commonsense"].members == ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge",
                                                  "boolq", "openbookqa")
    reported = {n: s.reported for n, s in registry().items() if s.kind == "choice"}
    assert reported == {"mmlu": "acc", "hellaswag": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
                        "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "boolq": "acc",
                        "openbookqa": "acc_norm", "siqa": "acc"}


def test_resolve_splits_commas_dedupes_and_puts_members_first():
    assert resolve_tasks("piqa") == ["piqa"]
    assert resolve_tasks(["mmlu,piqa", "piqa", " boolq "]) == ["mmlu", "piqa", "boolq"]
    order = resolve_tasks(["piqa,commonsense"])
    assert order[0] == "piqa" and order[-1] == "commonsense" and len(order) == 8


@pytest.mark.parametrize("names, message", [
    (["mmlu,hellaswg"], "task 'hellaswg' is unknown; use one or more of: perplexity, mmlu, hellaswag"),
    ([","], "no task given"),
])
def test_resolve_errors(names, message):
    with pytest.raises(QaloraError, match=message):
        resolve_tasks(names)


def test_allocate_spreads_evenly_with_caps():
    assert allocate([100] * 57, 570) == [10] * 57
    assert allocate([100] * 57, 60) == [2, 2, 2] + [1] * 54
    assert allocate([3, 100, 100], 30) == [3, 14, 13]          # the small group's share moves on
    assert allocate([3, 5], 100) == [3, 5]                     # more than available: everything
    for sizes, limit in [([7, 1, 30, 2], 17), ([5] * 9, 44), ([1000], 3)]:
        q = allocate(sizes, limit)
        assert sum(q) == min(limit, sum(sizes)) and all(0 <= a <= n for a, n in zip(q, sizes))


def test_pick_is_seeded_and_sorted():
    a = pick(1838, 200, seed=0, key="piqa")
    assert a == pick(1838, 200, seed=0, key="piqa") and a == sorted(a) and len(set(a)) == 200
    assert a != pick(1838, 200, seed=1, key="piqa")
    assert a != pick(1838, 200, seed=0, key="boolq")           # one stream per task
    assert pick(1838, 200, seed=5, key="piqa", mode="first") == list(range(200))
    assert pick(10, 50, seed=0, key="x") == list(range(10))
    assert pick(10, 3, seed=0, key="x") == [4, 5, 6]           # pinned: the same on every machine


def test_select_whole_task_or_limit_per_group():
    assert select([3, 2], ["a", "b"], Selection()) == [[0, 1, 2], [0, 1]]
    got = select([100, 100], ["a", "b"], Selection(limit=5, seed=3))
    assert [len(g) for g in got] == [3, 2]
    assert got == select([100, 100], ["a", "b"], Selection(limit=5, seed=3))
    assert select([100, 100], ["a", "b"], Selection(limit=5, mode="first")) == [[0, 1, 2], [0, 1]]


@pytest.mark.parametrize("kwargs, message", [
    ({"limit": 0}, "limit must be a positive number of items per task, got 0"),
    ({"limit": -5}, "got -5"),
    ({"limit": 2.5}, "got 2.5"),
    ({"mode": "last"}, "subset mode 'last' is unknown; use one of: random, first"),
])
def test_selection_errors(kwargs, message):
    with pytest.raises(QaloraError, match=message):
        Selection(**kwargs)


def test_choice_item_checks_itself():
    with pytest.raises(ValueError):
        ChoiceItem(requests=(("a", " b"),), gold=0, lengths=(1,))
    with pytest.raises(ValueError):
        ChoiceItem(requests=(("a", " b"), ("a", " c")), gold=2, lengths=(1, 1))
