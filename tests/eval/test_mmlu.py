"""MMLU prompts (lm-eval 0.4's format, written out by hand), categories and the two averages."""

import pytest

from qalora.eval import mmlu
from qalora.eval.data import subfolders
from qalora.eval.task_spec import ChoiceItem, Selection

Q = {"question": " What is 2 + 2?\n", "choices": ["3", "4", "5", "22"], "answer": 1}
SHOT1 = {"question": "Is 7 prime?", "choices": ["yes", "no", "maybe", "sometimes"], "answer": 0}
SHOT2 = {"question": "What is 3 * 3?", "choices": ["6", "9", "33", "1"], "answer": 1}


def test_zero_shot_prompt():
    item = mmlu.mmlu_item("elementary_mathematics", Q, [])
    expected = ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert [r[0] for r in item.requests] == [expected] * 4
    assert [r[1] for r in item.requests] == [" A", " B", " C", " D"]
    assert item.gold == 1 and item.group == "elementary_mathematics"


def test_few_shot_prompt():
    got = mmlu.prompt("high_school_mathematics", Q, [SHOT1, SHOT2])
    expected = ("The following are multiple choice questions (with answers) about high school mathematics.\n\n"
                "Is 7 prime?\nA. yes\nB. no\nC. maybe\nD. sometimes\nAnswer: A\n\n"
                "What is 3 * 3?\nA. 6\nB. 9\nC. 33\nD. 1\nAnswer: B\n\n"
                "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert got == expected


def test_categories_are_lm_evals_and_cover_the_packaged_subjects():
    assert len(mmlu.SUBJECTS) == 57 and list(mmlu.SUBJECTS) == subfolders(mmlu.FOLDER)
    assert {c: len(s) for c, s in mmlu.CATEGORIES.items()} == {"humanities": 13, "stem": 19, "social_sciences": 12,
                                                               "other": 13}
    assert mmlu.CATEGORY_OF["econometrics"] == "social_sciences" and mmlu.CATEGORY_OF["formal_logic"] == "humanities"


def test_limit_spreads_over_subjects_and_shots_come_from_dev():
    chosen = mmlu.load(5, Selection(limit=114, seed=0))
    assert chosen.n_available == 14042 and len(chosen.items) == 114
    per_subject = {}
    for it in chosen.items:
        per_subject[it.group] = per_subject.get(it.group, 0) + 1
    assert set(per_subject.values()) == {2} and len(per_subject) == 57
    first = chosen.items[0]
    assert first.requests[0][0].count("\nAnswer:") == 6 and first.requests[0][0].startswith(mmlu.header("abstract_algebra"))
    again = mmlu.load(5, Selection(limit=114, seed=0)).items
    other = mmlu.load(5, Selection(limit=114, seed=1)).items
    assert [i.index for i in again] == [i.index for i in chosen.items] != [i.index for i in other]


def _item(subject):
    return ChoiceItem(requests=(("q", " A"), ("q", " B")), gold=0, lengths=(1, 1), group=subject)


def test_summary_item_weighted_and_macro():
    items = [_item("anatomy")] * 4 + [_item("virology")] * 1 + [_item("philosophy")] * 2
    correct = [True, True, True, False, False, True, False]
    s = mmlu.summarize(items, correct)
    assert s["subjects"]["anatomy"]["acc"]["value"] == 0.75 and s["subjects"]["virology"]["acc"]["n"] == 1
    assert s["acc"]["value"] == pytest.approx(4 / 7) and s["acc"]["n"] == 7
    assert s["acc_macro"]["value"] == pytest.approx((0.75 + 0 + 0.5) / 3)
    # pooled binomial stderr over all 7 items, defined although virology has a single item
    assert s["acc"]["stderr"] == pytest.approx(((4 / 7) * (3 / 7) / 6) ** 0.5)
    assert s["acc_macro"]["stderr"] is None  # the per-subject mean needs every subject's stderr
    assert set(s["categories"]) == {"stem", "other", "humanities"}
    assert s["categories"]["stem"]["acc"]["value"] == 0.75 and s["categories"]["stem"]["subjects"] == 1
