"""Instruction data for fine-tuning: the one import for the trainer.

Pipeline (one file per step)::

    load_examples(spec)             readers.py / mixture.py   → list[Example]
    TokenizedDataset(examples, …)   batching.py               → ids + prompt-masked labels
    batch_plan(lengths, …)          batching.py               → length-bucketed index batches
    collate(dataset, batch, pad_id) batching.py               → input_ids / attention_mask / labels [B, T]

``spec`` is ``"default"`` (the embedded FLAN-style mixture, train split), a ``.json`` /
``.jsonl`` file (Alpaca or chat records, detected per record), or a ``datasets`` folder saved
with ``save_to_disk``.
"""

from __future__ import annotations

import pathlib

from qalora.data.batching import (IGNORE_INDEX, PLAIN_PROMPT, TokenizedDataset, batch_plan, collate,
                                  encode_example, pad_token_id, padding_fraction, prompt_response_ids)
from qalora.data.mixture import TASK_CAPS, TASK_FILES, default_mixture, example_task, mixture_counts
from qalora.data.readers import (Example, read_alpaca, read_chat_jsonl, read_file, read_hf_dataset)
from qalora.errors import QaloraError

__all__ = [
    "DEFAULT_SPEC", "IGNORE_INDEX", "PLAIN_PROMPT", "TASK_CAPS", "TASK_FILES", "Example", "TokenizedDataset",
    "batch_plan", "collate", "default_mixture", "encode_example", "example_task", "is_default", "load_examples",
    "mixture_counts", "pad_token_id", "padding_fraction", "prompt_response_ids", "read_alpaca",
    "read_chat_jsonl", "read_file", "read_hf_dataset",
]

DEFAULT_SPEC = "default"
FILE_SUFFIXES = (".json", ".jsonl")
#: Files that mark a ``save_to_disk`` folder (a Dataset has the first two, a DatasetDict the last).
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
ACCEPTED = (f"accepted: '{DEFAULT_SPEC}', a {' or '.join(FILE_SUFFIXES)} file of Alpaca or chat records, "
            "or a folder saved with datasets' save_to_disk")


def is_default(spec: str) -> bool:
    """Whether ``spec`` names the embedded mixture (so a trainer skips, rather than rejects, overlong examples)."""
    return spec == DEFAULT_SPEC


def load_examples(spec: str) -> list[Example]:
    """The examples named by ``spec``: ``"default"`` (train split, seed 0), a file, or a datasets folder.

    Raises:
        QaloraError: a missing path, an unsupported file type or folder, or any problem a reader
            reports (malformed JSON, a missing / mistyped field, an unknown role, no records).
    """
    if is_default(spec):
        return default_mixture("train")
    path = pathlib.Path(spec)
    if not path.exists():
        raise QaloraError(f"{spec}: no such file or folder; {ACCEPTED}")
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASETS_MARKERS):
            return read_hf_dataset(path)
        raise QaloraError(f"{path}: the folder has none of {', '.join(DATASETS_MARKERS)}, so it is not a "
                          f"datasets folder; {ACCEPTED}")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise QaloraError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; {ACCEPTED}")
    return read_file(path)
