"""Instruction records and the readers that turn user files into them.

One record type, :class:`Example`: a conversation whose LAST message is the assistant response
the loss covers (everything before it is prompt). Four on-disk schemas are accepted, detected
per record by its keys:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}`` →
  user = instruction + ("\\n\\n" + input if input is non-empty), assistant = output;
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with at
  least one user turn and ending with an assistant turn (extra message keys are dropped);
* completion: ``{"prompt": str, "completion": str}`` → trained *raw*: no chat template, no eos,
  the text split into prompt and completion tokens exactly as a log-likelihood scorer splits a
  (context, continuation) pair (:func:`qalora.data.pairs.encode_pair`), so a model tuned on a
  task's items learns the very strings it is scored on;
* a Hugging Face ``datasets`` folder (``save_to_disk``) whose rows use one of these schemas.

Files are a JSON list of records (``.json``) or JSON lines (``.jsonl``; a ``.json`` file holding
JSON lines is read as such). Every error names the file, the 1-based line (the line where the
record starts, for a JSON list) or the datasets row, and what is accepted.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qalora.errors import QaloraError

ROLES = ("system", "user", "assistant")
ALPACA_HELP = "Alpaca records have 'instruction' (str), optional 'input' (str) and 'output' (str)"
COMPLETION_HELP = "completion records have 'prompt' (str) and 'completion' (non-empty str)"
TEMPLATES = ("chat", "raw")
CHAT_HELP = ("chat records have 'messages': a list of {'role': 'system'|'user'|'assistant', 'content': str} "
             "with a user turn, ending with an assistant turn")


def check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    """Validate a conversation and return it as a tuple of fresh ``{"role", "content"}`` dicts.

    Raises:
        QaloraError: not a non-empty list of objects, a message without a string ``role`` /
            ``content``, an unknown role, no user turn, or a last turn that is not the assistant's.
            The message starts with ``where`` (file and line, or the example's source).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise QaloraError(f"{where}: 'messages' must be a non-empty list, got {_short(messages)}; {CHAT_HELP}")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise QaloraError(f"{where}: message {k} must be an object, got {type(m).__name__}; {CHAT_HELP}")
        for field in ("role", "content"):
            if field not in m:
                raise QaloraError(f"{where}: message {k} is missing field '{field}'; {CHAT_HELP}")
            if not isinstance(m[field], str):
                raise QaloraError(f"{where}: message {k} field '{field}' must be a string, "
                                  f"got {type(m[field]).__name__}; {CHAT_HELP}")
        if m["role"] not in ROLES:
            raise QaloraError(f"{where}: message {k} has unknown role {m['role']!r}; "
                              f"accepted roles: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise QaloraError(f"{where}: the conversation has no user turn; {CHAT_HELP}")
    if out[-1]["role"] != "assistant":
        raise QaloraError(f"{where}: the last message has role {out[-1]['role']!r}, but it must be the "
                          f"assistant response the loss covers; {CHAT_HELP}")
    return tuple(out)


@dataclass(frozen=True)
class Example:
    """One training conversation.

    Attributes:
        messages: ``({"role": ..., "content": str}, ...)``; roles are system / user / assistant,
            there is a user turn, and the LAST message is the assistant response (the only part
            the loss covers).
        source: where it came from, e.g. ``"gsm8k:105"`` (task:doc_id) or ``"train.jsonl:12"`` (file:line);
            errors name it.
        template: ``"chat"`` (the tokenizer's chat template, or the plain one) or ``"raw"`` (a
            completion record: user = prompt, assistant = completion, concatenated as they are).
    """

    messages: tuple[dict[str, str], ...]
    source: str
    template: str = "chat"   # "raw": a completion record, encoded without any template

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", check_messages(self.messages, self.source))
        if self.template not in TEMPLATES:
            raise QaloraError(f"{self.source}: template {self.template!r} is not one of {', '.join(TEMPLATES)}")

    def __hash__(self) -> int:  # the dicts are not hashable; hash their items
        return hash((self.source, tuple((m["role"], m["content"]) for m in self.messages)))

    @property
    def response(self) -> str:
        """The text of the last (assistant) message."""
        return self.messages[-1]["content"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _string_field(record: Mapping, field: str, where: str, optional: bool = False) -> str:
    if field not in record or (optional and record[field] is None):
        if optional:
            return ""
        raise QaloraError(f"{where}: record is missing field '{field}'; {ALPACA_HELP}")
    value = record[field]
    if not isinstance(value, str):
        raise QaloraError(f"{where}: field '{field}' must be a string, got {type(value).__name__} "
                          f"{_short(value)}; {ALPACA_HELP}")
    if not optional and not value.strip():
        raise QaloraError(f"{where}: field '{field}' is empty; {ALPACA_HELP}")
    return value


def alpaca_example(record: Mapping, where: str, source: str) -> Example:
    """An Alpaca record → ``Example(user, assistant)``; extra keys are ignored."""
    instruction = _string_field(record, "instruction", where)
    extra = _string_field(record, "input", where, optional=True)
    output = _string_field(record, "output", where)
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return Example(({"role": "user", "content": user}, {"role": "assistant", "content": output}), source)


def completion_example(record: Mapping, where: str, source: str) -> Example:
    """A completion record ``{"prompt", "completion"}`` → a raw Example (no template)."""
    fields = {}
    for name in ("prompt", "completion"):
        value = record.get(name)
        if not isinstance(value, str) or (name == "completion" and not value.strip()):
            raise QaloraError(f"{where}: field '{name}' must be a{' non-empty' if name == 'completion' else ''} "
                              f"string, got {_short(value)}; {COMPLETION_HELP}")
        fields[name] = value
    return Example(({"role": "user", "content": fields["prompt"]}, {"role": "assistant", "content": fields["completion"]}),
                   source, template="raw")


def chat_example(record: Mapping, where: str, source: str) -> Example:
    """A chat record ``{"messages": [...]}`` → Example (see :func:`check_messages`)."""
    if "messages" not in record:
        raise QaloraError(f"{where}: record is missing field 'messages'; {CHAT_HELP}")
    return Example(check_messages(record["messages"], where), source)


def record_example(record: Any, where: str, source: str, schema: str | None = None) -> Example:
    """A record in any schema → Example; ``schema`` ("alpaca" / "chat" / "completion") forces one,
    else keys decide."""
    if not isinstance(record, Mapping):
        raise QaloraError(f"{where}: expected a JSON object, got {type(record).__name__} {_short(record)}")
    if schema is None:
        if record.get("messages") is not None:  # None: the column of another schema in a datasets table
            schema = "chat"
        elif record.get("instruction") is not None:
            schema = "alpaca"
        elif record.get("completion") is not None:
            schema = "completion"
        else:
            keys = [str(k)[:16] for k in record]
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "") or "none"
            raise QaloraError(f"{where}: record has none of 'messages' (chat), 'instruction' (Alpaca), "
                              f"'prompt' + 'completion'; its keys: {shown}")
    readers = {"chat": chat_example, "alpaca": alpaca_example, "completion": completion_example}
    return readers[schema](record, where, source)


def _json_error(path: pathlib.Path, e: json.JSONDecodeError, line_offset: int = 0) -> QaloraError:
    return QaloraError(f"{path} line {e.lineno + line_offset}: malformed JSON ({e.msg}, column {e.colno})")


def _jsonl_records(path: pathlib.Path, text: str) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise _json_error(path, e, line_offset=lineno - 1) from e


def _json_list_records(text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a (valid) top-level JSON list with the line each starts on."""
    decoder = json.JSONDecoder()
    pos, line, n = text.index("[") + 1, 1 + text.count("\n", 0, text.index("[")), len(text)

    def skip(p: int, chars: str) -> int:
        while p < n and text[p] in chars:
            p += 1
        return p

    while True:
        start = skip(pos, " \t\r\n,")
        line += text.count("\n", pos, start)
        if start >= n or text[start] == "]":
            return
        value, pos = decoder.raw_decode(text, start)
        yield line, value
        line += text.count("\n", start, pos)


def read_records(path: str | pathlib.Path) -> list[tuple[int, Any]]:
    """``(line, record)`` of every record of a JSON-list or JSON-lines file (records unchecked).

    Raises:
        QaloraError: missing / unreadable file, malformed JSON (file, line, column), a top level
            that is neither a list nor JSON lines, or no record at all.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise QaloraError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise QaloraError(f"{path}: not a UTF-8 text file ({e})") from e
    whole: Any = None
    if path.suffix.lower() == ".json" and text.strip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": several values, i.e. JSON lines in a .json file
                raise _json_error(path, e) from e
    if isinstance(whole, list):
        records = list(_json_list_records(text))
    elif isinstance(whole, dict):  # one record
        records = [(1 + text[: len(text) - len(text.lstrip())].count("\n"), whole)]
    elif whole is not None:
        raise QaloraError(f"{path}: a .json file must hold a JSON list of records (or JSON lines), "
                          f"got {type(whole).__name__} {_short(whole)}")
    else:
        records = list(_jsonl_records(path, text))
    if not records:
        raise QaloraError(f"{path}: no records (the file is empty); expected a JSON list or JSON lines of "
                          "Alpaca or chat records")
    return records


def read_file(path: str | pathlib.Path, schema: str | None = None) -> list[Example]:
    """Examples of a ``.json`` / ``.jsonl`` file; ``schema`` None detects it per record by its keys."""
    path = pathlib.Path(path)
    return [record_example(r, f"{path} line {line}", f"{path.name}:{line}", schema)
            for line, r in read_records(path)]


def read_alpaca(path: str | pathlib.Path) -> list[Example]:
    """Alpaca records from a JSON list or JSON-lines file (every record must be Alpaca)."""
    return read_file(path, schema="alpaca")


def read_chat_jsonl(path: str | pathlib.Path) -> list[Example]:
    """Chat records ``{"messages": [...]}`` from a JSON-lines file (every record must be chat)."""
    return read_file(path, schema="chat")


def read_hf_dataset(folder: str | pathlib.Path, split: str = "train") -> list[Example]:
    """Rows of a ``datasets`` folder saved with ``save_to_disk`` (Alpaca or chat rows, per row).

    A ``DatasetDict`` folder gives its ``split`` (default ``"train"``). Needs the ``datasets``
    package (imported here, lazily).
    """
    folder = pathlib.Path(folder)
    try:
        import datasets
    except ImportError as e:
        raise QaloraError(f"reading the datasets folder {folder} needs the datasets package; "
                          "run: pip install datasets") from e
    if not folder.is_dir():
        raise QaloraError(f"{folder}: no such folder")
    data = datasets.load_from_disk(str(folder))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise QaloraError(f"{folder}: no split {split!r}; it has {', '.join(data) or 'none'}")
        data = data[split]
    examples = [record_example(row, f"{folder} row {i}", f"{folder.name}:{i}") for i, row in enumerate(data)]
    if not examples:
        raise QaloraError(f"{folder}: no records (the dataset is empty)")
    return examples
