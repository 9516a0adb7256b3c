"""``KINDS``: the registered adapter kinds, in transform order (scales, then codes, then
offsets). A method names its kinds; a layer applies them in this order whatever order they were
named in. Adding a kind is one file defining a :class:`~qalora.adapters.kinds.base.Kind` and one
line here.
"""

from __future__ import annotations

from qalora.adapters.kinds.base import Kind
from qalora.adapters.kinds.lora import LORA
from qalora.adapters.kinds.lota import LOTA
from qalora.adapters.kinds.qalora import QALORA
from qalora.adapters.kinds.scales import SCALES
from qalora.errors import QaloraError

KINDS: tuple[Kind, ...] = (SCALES, LOTA, QALORA, LORA)


def get_kind(name: str) -> Kind:
    for k in KINDS:
        if k.name == name:
            return k
    raise QaloraError(f"adapter kind {name!r} is unknown; use one of {', '.join(k.name for k in KINDS)}")


def ordered(names) -> tuple[str, ...]:
    """``names`` in registry (transform) order; refuses unknown and repeated names."""
    names = list(names)
    for n in names:
        get_kind(n)
    if len(set(names)) != len(names):
        raise QaloraError(f"adapter kinds {names} repeat a kind")
    return tuple(k.name for k in KINDS if k.name in names)
