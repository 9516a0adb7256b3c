"""Rate selection: the validation part comes from the training items only, the choice is the
best validation accuracy with ties to the lower rate."""

import json
from types import SimpleNamespace

import pytest

from qalora.errors import QaloraError
from qalora.eval.task_spec import ChoiceItem
from qalora.reproduce.rates import choose, has_rate, prepare_selection
from qalora.reproduce.task_split import item_key, split_items
from qalora.reproduce.tasks import TASK_ROWS


def _items(n):
    return [ChoiceItem(requests=((f"Review {i}: x{i % 7}. Sentiment:", " negative"),
                                 (f"Review {i}: x{i % 7}. Sentiment:", " positive")), gold=i % 2,
                       lengths=(9, 9), index=i) for i in range(n)]


def _point(lr, acc, metric="acc"):
    return {"lr": lr, "reported": metric, metric: {"value": acc}}


def test_choose_takes_the_best_and_the_lower_rate_on_a_tie():
    assert choose([_point(1e-4, 0.5), _point(1e-3, 0.8), _point(1e-2, 0.7)]) == 1e-3
    assert choose([_point(1e-2, 0.8), _point(1e-3, 0.8), _point(1e-4, 0.6)]) == 1e-3
    assert choose([_point(1e-3, 0.2, "acc_norm"), _point(1e-2, 0.3, "acc_norm")]) == 1e-2
    with pytest.raises(QaloraError, match="no rate was tried"):
        choose([])


def test_every_tuned_row_but_lota_alone_has_a_rate():
    rated = {r.name for r in TASK_ROWS if has_rate(r)}
    assert rated == {"lora", "qlora", "qlora+rtn", "qlora+gptq", "qalora", "qalora+scales", "peqa", "lota+qalora"}


def test_validation_is_carved_from_training_items_never_the_held_out(tmp_path):
    items = _items(60)
    split = split_items(items, 20)
    ws = SimpleNamespace(root=tmp_path)
    sel = prepare_selection(ws, "sst2", split.train, 10)
    val = {item_key(i) for i in sel.validation}
    trained = [json.loads(line)["prompt"] for line in sel.data.read_text().splitlines()]
    assert len(sel.validation) >= 10 and len(trained) + len(sel.validation) == len(split.train)
    assert not val & {item_key(i) for i in split.heldout}                       # never a held-out item
    assert not val & {item_key(i) for i in split.train if i.requests[0][0] in trained}
    assert prepare_selection(ws, "sst2", split.train, 10).validation == sel.validation   # reread, same cut
    with pytest.raises(QaloraError, match="another selection split"):
        prepare_selection(ws, "sst2", split.train, 12)


def test_points_of_an_earlier_report_are_chosen_from_without_training(tmp_path):
    from qalora.reproduce.rates import choose_rate, seed_points, selection_id
    from qalora.reproduce.tasks import TaskBudget

    row = next(r for r in TASK_ROWS if r.name == "qalora")
    tb = TaskBudget(steps=2, batch_size=4, max_seq_len=64, heldout=8, validation=4, rates=(1e-3, 1e-2))
    points = [{"id": selection_id("sst2", row, (4, 64), lr), "task": "sst2", "row": "qalora", "lr": lr,
               "reported": "acc", "acc": {"value": v}} for lr, v in ((1e-3, 0.6), (1e-2, 0.9))]
    assert seed_points(tmp_path, points) == 2 and seed_points(tmp_path, points) == 0   # never overwrites
    ws = SimpleNamespace(root=tmp_path)        # no model, no base: training anything would fail here
    lr, used = choose_rate(ws, "sst2", row, sel=None, tb=tb, say=lambda m: None)
    assert lr == 1e-2 and [p["lr"] for p in used] == [1e-3, 1e-2]
    lota = next(r for r in TASK_ROWS if r.name == "lota")
    assert choose_rate(ws, "sst2", lota, sel=None, tb=tb) == (None, [])


def test_the_selection_table_bolds_a_rate_only_once_every_rate_is_in():
    from qalora.reproduce.tasks_report import selection_lines

    def p(row, lr, v):
        return {"task": "sst2", "row": row, "label": row, "lr": lr, "reported": "acc", "acc": {"value": v, "n": 150}}

    summary = {"selection": [p("qalora", 1e-3, 0.8), p("qalora", 1e-2, 0.9), p("peqa", 1e-3, 0.7)]}
    lines = selection_lines(summary, "sst2")
    assert "| qalora | 80.0 | **90.0** |" in lines and "| peqa (still choosing) | 70.0 | - |" in lines
