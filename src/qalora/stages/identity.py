"""What a reusable stage was made from, and the one refusal when a rerun asks for something else.

Every stage a multi-stage run reuses (``pipeline``'s folders, ``reproduce``'s bases, adapters,
merges and rows) records the identity of its inputs beside its output: the fingerprint of the
model or checkpoint it read (a SHA-256), the adapter's SHA-256, and the configuration. A rerun
computes the identity it would record now and reuses the stage only when every field is equal;
otherwise it stops with one line naming the first field that differs, and writes nothing. A
stage whose record lacks a field is refused too (it cannot be checked, so it is not reused).
"""

from __future__ import annotations

import os
from pathlib import Path

from qalora.errors import QaloraError

_LABELS = {"source_sha256": "source model", "base_sha256": "base checkpoint", "adapter_sha256": "adapter",
           "checkpoint_sha256": "checkpoint"}


def _short(value) -> str:
    text = str(value)
    return f"{text[:12]}…" if len(text) == 64 else text


def normalized(cls, recorded) -> dict | None:
    """A configuration recorded as JSON, as dataclass ``cls`` would write it now (its current
    defaults filled in), or ``None`` when it is not one of ``cls``'s."""
    try:
        return cls(**recorded).to_dict()
    except (TypeError, QaloraError):
        return None


def require_same(where: str | os.PathLike, what: str, recorded: dict | None, wanted: dict,
                 hint: str = "choose another --out") -> None:
    """Refuse (one line) unless ``recorded`` holds every key of ``wanted`` with an equal value.

    ``where``: the stage's output; ``what``: what it holds ("quantized model", "adapter", …);
    ``recorded``: the identity stored with it (``None``: no record at all)."""
    where = str(Path(where))
    if recorded is None:
        raise QaloraError(f"{where!r} holds a {what} without a record of its inputs; {hint}")
    for key, want in wanted.items():
        have = recorded.get(key)
        if have is None:
            raise QaloraError(f"{where!r} holds a {what} with no recorded {_LABELS.get(key, key)}; it cannot be "
                              f"checked against this run; {hint}")
        if have != want:
            label = _LABELS.get(key, key)
            if isinstance(have, dict) and isinstance(want, dict):
                sub = next(k for k in sorted(set(have) | set(want), key=str) if have.get(k) != want.get(k))
                label, have, want = f"{label} ({sub})", have.get(sub), want.get(sub)
            raise QaloraError(f"{where!r} holds a {what} made with another {label}: {_short(have)}, this run: "
                              f"{_short(want)}; {hint}")
