"""Tests for the embedded default instruction mixture (qalora.data.mixture).

Exact checks (sets, equality). The contamination check is exhaustive: every item of every
evaluation set the task registry ships (the LAMBADA perplexity passages, every MMLU test and dev
question and choice, every row of the eight multiple-choice sets) gives its distinctive texts
(question, context, passage, choices), and none of them of >= 40 characters (shorter ones are
generic phrases that match by chance) may occur anywhere in the mixture's text, both
lower-cased and with whitespace runs collapsed to one space.
"""

from __future__ import annotations

import re

import pytest

from qalora.data.mixture import (SPLITS, TASK_CAPS, TASK_FILES, default_mixture, example_task, gsm8k_solution,
                                 is_validation, mixture_counts)
from qalora.data.text import heldout_texts
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


MIN_CHARS = 40  # shorter texts are generic phrases ("in the morning") that match by chance


def normalize(text: str) -> str:
    """Lower-cased, whitespace runs collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def _winogrande(doc) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + doc[o] + doc["sentence"][blank + 1:] for o in ("option1", "option2")]


# task registry name -> (hf_datasets folder, the distinctive texts of one row)
CHOICE_TEXTS = {
    "hellaswag": ("hellaswag/none/validation", lambda d: [d["ctx"], *d["endings"]]),
    "piqa": ("piqa/plain_text/validation", lambda d: [d["goal"], d["sol1"], d["sol2"]]),
    "winogrande": ("winogrande/winogrande_xl/validation", _winogrande),
    "arc_easy": ("ai2_arc/ARC-Easy/validation", lambda d: [d["question"], *d["choices"]["text"]]),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", lambda d: [d["question"], *d["choices"]["text"]]),
    "boolq": ("boolq/none/validation", lambda d: [d["question"], d["passage"]]),
    "openbookqa": ("openbookqa/main/validation", lambda d: [d["question_stem"], *d["choices"]["text"]]),
    "siqa": ("social_i_qa/none/validation", lambda d: [d["context"], d["question"], d["answerA"], d["answerB"],
                                                        d["answerC"]]),
}


def evaluation_texts() -> dict[str, list[str]]:
    """Every distinctive text (normalized, >= MIN_CHARS) of every registered evaluation task."""
    from qalora.eval import mmlu
    from qalora.eval.data import records

    raw = {"perplexity": heldout_texts(),
           "mmlu": [t for s in mmlu.SUBJECTS for split in ("test", "dev")
                    for d in records(f"{mmlu.FOLDER}/{s}/{split}") for t in (d["question"], *d["choices"])]}
    for task, (folder, texts) in CHOICE_TEXTS.items():
        raw[task] = [t for d in records(folder) for t in texts(d)]
    return {task: list(dict.fromkeys(n for n in map(normalize, texts) if len(n) >= MIN_CHARS))
            for task, texts in raw.items()}


def occurring(haystack: str, texts: list[str]) -> list[str]:
    """The ``texts`` that occur in ``haystack`` as substrings, exactly: every window of
    MIN_CHARS characters of the haystack is looked up among the texts' prefixes (one pass),
    and each hit is confirmed by comparing the whole text at that position."""
    by_prefix: dict[str, list[str]] = {}
    for t in texts:
        by_prefix.setdefault(t[:MIN_CHARS], []).append(t)
    found = set()
    for i in range(len(haystack) - MIN_CHARS + 1):
        for t in by_prefix.get(haystack[i:i + MIN_CHARS], ()):
            if haystack.startswith(t, i):
                found.add(t)
    return [t for t in texts if t in found]


def test_no_evaluation_or_heldout_text(splits):
    from qalora.eval.tasks import TASKS

    haystack = "\n".join(normalize(m["content"]) for split in SPLITS for e in splits[split] for m in e.messages)
    texts = evaluation_texts()
    assert set(texts) == {spec.name for spec in TASKS if spec.kind != "average"}  # every shipped set
    assert all(len(found) >= 400 for found in texts.values()), {k: len(v) for k, v in texts.items()}
    # the search can fire: a train prompt, and a window starting mid-word, are found
    planted = [normalize(splits["train"][0].messages[0]["content"])[:80], haystack[1_000_003:1_000_093]]
    assert occurring(haystack, planted) == planted
    everything = [t for found in texts.values() for t in found]
    leaked = set(occurring(haystack, everything))
    assert not leaked, {task: [t for t in found if t in leaked][:3]
                        for task, found in texts.items() if leaked & set(found)}


def test_unknown_split():
    with pytest.raises(QaloraError, match="unknown split 'test'; accepted: train, validation"):
        default_mixture("test")
