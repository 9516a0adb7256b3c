"""Third-party noise, silenced where it is imported.

Loading a model with transformers imports its torchao integration, and torchao's import prints a
"Failed to load …/_C_*.so" line per CUDA kernel library a CPU machine cannot load (logger
``torchao``) and torch prints a deprecation line per enum torchao registers (logger
``torch.utils._pytree``). :func:`quiet_imports` raises those two loggers to ERROR, and hides
DeprecationWarning / FutureWarning, for the duration of the import only; :func:`import_transformers`
imports transformers' model and quantizer modules that way once (later imports are no-ops).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_imports() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_transformers() -> None:
    """Import ``transformers`` with its quantizer integrations (which import torchao), quietly."""
    with quiet_imports():
        import transformers  # noqa: F401
        import transformers.quantizers.auto  # noqa: F401
