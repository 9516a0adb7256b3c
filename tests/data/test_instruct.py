"""Tests for the instruction readers and ``load_examples`` (qalora.data.readers / instruct).

Exact checks: the parsed messages, sources (file:line) and every error message's file, line
and field name.
"""

from __future__ import annotations

import json
import sys

import pytest

from qalora.data.instruct import (Example, default_mixture, load_examples, read_alpaca, read_chat_jsonl,
                                  read_hf_dataset)
from qalora.errors import QaloraError

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Say hi.", "output": "Hi!", "text": "extra keys are ignored"},
]
CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12", "name": "x"}]},
]


def user_assistant(user: str, assistant: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_alpaca_json_list_pretty_printed_gives_start_lines(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    examples = read_alpaca(path)
    assert [e.messages for e in examples] == [user_assistant("Add the numbers.\n\n2 and 3", "5"),
                                              user_assistant("Name a colour.", "Blue."),
                                              user_assistant("Say hi.", "Hi!")]
    # indent=2: "[" on line 1, each record spans 5 lines ("{", 3 fields, "},"), the third has 4 fields
    assert [e.source for e in examples] == ["alpaca.json:2", "alpaca.json:7", "alpaca.json:12"]
    assert load_examples(str(path)) == examples


def test_alpaca_jsonl(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + json.dumps(ALPACA[1]) + "\n", encoding="utf-8")
    examples = read_alpaca(path)
    assert [e.source for e in examples] == ["alpaca.jsonl:1", "alpaca.jsonl:3"]  # blank line skipped
    assert examples[0] == Example(user_assistant("Add the numbers.\n\n2 and 3", "5"), "alpaca.jsonl:1")
    assert examples[1].response == "Blue."


def test_chat_jsonl_keeps_role_and_content_only(tmp_path):
    examples = read_chat_jsonl(write_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert examples[0].messages == tuple(CHAT[0]["messages"])
    assert examples[1].messages[-1] == {"role": "assistant", "content": "12"}  # "name" dropped
    assert [e.source for e in examples] == ["chat.jsonl:1", "chat.jsonl:2"]


def test_load_examples_detects_the_schema_per_record(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA[0], CHAT[0], ALPACA[2]])
    examples = load_examples(path)
    assert [len(e.messages) for e in examples] == [2, 3, 2]
    assert examples[1].messages[0]["role"] == "system"


def test_json_suffix_holding_json_lines_and_a_single_object(tmp_path):
    lines = tmp_path / "lines.json"
    write_jsonl(lines, ALPACA[:2])
    assert [e.source for e in load_examples(str(lines))] == ["lines.json:1", "lines.json:2"]
    single = tmp_path / "one.json"
    single.write_text("\n" + json.dumps(ALPACA[2], indent=1), encoding="utf-8")
    assert [e.source for e in load_examples(str(single))] == ["one.json:2"]


def test_load_examples_default_is_the_train_split():
    assert load_examples("default") == default_mixture("train")


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow

    def dataset(rows, name):  # an explicit fingerprint skips datasets' dill hashing of the table
        return datasets.Dataset(pyarrow.Table.from_pylist(rows), fingerprint=name)

    folder = tmp_path / "ds"
    dataset([{"instruction": "Say hi.", "input": None, "output": "Hi!"}], "alpaca").save_to_disk(str(folder))
    assert load_examples(str(folder)) == [Example(user_assistant("Say hi.", "Hi!"), "ds:0")]
    chat_folder = tmp_path / "chat_ds"
    datasets.DatasetDict({"train": dataset(CHAT, "chat")}).save_to_disk(str(chat_folder))
    assert [e.messages for e in load_examples(str(chat_folder))] == [
        tuple(CHAT[0]["messages"]), tuple({"role": m["role"], "content": m["content"]} for m in CHAT[1]["messages"])]
    bad_folder = tmp_path / "bad_ds"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}]
    dataset(rows, "bad").save_to_disk(str(bad_folder))
    with pytest.raises(QaloraError, match=r"bad_ds row 1: field 'output' must be a string, got NoneType"):
        load_examples(str(bad_folder))


def test_hf_datasets_folder_without_the_package_names_the_install(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(QaloraError, match="pip install datasets"):
        load_examples(str(folder))
    with pytest.raises(QaloraError, match="pip install datasets"):
        read_hf_dataset(folder)


def bad(*records_or_text):
    """A JSONL body: dicts are dumped, strings are written as they are."""
    return "".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in records_or_text)


OK = ALPACA[0]
ERROR_CASES = {
    # name: (file name, file text, regex the message must match)
    "empty file": ("e.jsonl", "", r"e\.jsonl: no records"),
    "blank lines only": ("e.jsonl", "\n  \n", r"e\.jsonl: no records"),
    "empty JSON list": ("e.json", "[]", r"e\.json: no records"),
    "malformed JSONL": ("m.jsonl", bad(OK, OK, '{"instruction": "x", '), r"m\.jsonl line 3: malformed JSON"),
    "malformed JSON list": ("m.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]',
                            r"m\.json line 3: malformed JSON"),
    "not a list": ("n.json", "42", r"n\.json: a \.json file must hold a JSON list"),
    "record not an object": ("r.jsonl", bad(OK, "[1, 2]"), r"r\.jsonl line 2: expected a JSON object, got list"),
    "unknown schema": ("u.jsonl", bad({"prompt": "a", "answer": "b"}),
                       r"u\.jsonl line 1: record has none of 'messages' \(chat\), 'instruction' \(Alpaca\), 'prompt' "
                       r"\+ 'completion'; its keys: prompt, answer$"),
    "missing output": ("o.jsonl", bad(OK, {"instruction": "a"}), r"o\.jsonl line 2: record is missing field 'output'"),
    "empty instruction": ("i.jsonl", bad({"instruction": " ", "output": "b"}),
                          r"i\.jsonl line 1: field 'instruction' is empty"),
    "output not a string": ("t.jsonl", bad({"instruction": "a", "output": 5}),
                            r"t\.jsonl line 1: field 'output' must be a string, got int"),
    "input not a string": ("t.jsonl", bad({"instruction": "a", "input": ["x"], "output": "b"}),
                           r"t\.jsonl line 1: field 'input' must be a string, got list"),
    "messages not a list": ("c.jsonl", bad({"messages": "hi"}),
                            r"c\.jsonl line 1: 'messages' must be a non-empty list"),
    "messages empty": ("c.jsonl", bad({"messages": []}), r"c\.jsonl line 1: 'messages' must be a non-empty list"),
    "message missing content": ("c.jsonl", bad(CHAT[0], {"messages": [{"role": "user"}]}),
                                r"c\.jsonl line 2: message 0 is missing field 'content'"),
    "content not a string": ("c.jsonl", bad({"messages": [{"role": "user", "content": None}]}),
                             r"c\.jsonl line 1: message 0 field 'content' must be a string, got NoneType"),
    "unknown role": ("c.jsonl", bad({"messages": [{"role": "user", "content": "a"},
                                                  {"role": "tool", "content": "b"}]}),
                     r"c\.jsonl line 1: message 1 has unknown role 'tool'; accepted roles: system, user, assistant"),
    "no user turn": ("c.jsonl", bad({"messages": [{"role": "system", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]}),
                     r"c\.jsonl line 1: the conversation has no user turn"),
    "last turn not assistant": ("c.jsonl", bad({"messages": [{"role": "user", "content": "a"}]}),
                                r"c\.jsonl line 1: the last message has role 'user'.*assistant"),
    "unsupported suffix": ("d.txt", bad(OK), r"d\.txt: unsupported file type '\.txt'.*\.json or \.jsonl"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_load_examples_errors_name_file_line_and_field(tmp_path, case):
    name, text, pattern = ERROR_CASES[case]
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(QaloraError, match=pattern) as info:
        load_examples(str(path))
    assert "\n" not in str(info.value)  # one-line messages


def test_a_record_of_no_known_schema_is_refused_in_one_short_line(tmp_path):
    record = {f"column_{k}_with_a_long_name_{'x' * 40}": k for k in range(12)}
    path = write_jsonl(tmp_path / "u.jsonl", [record])
    with pytest.raises(QaloraError, match=r"its keys: column_0_with_a_, column_1_with_a_, column_2_with_a_ and 9 more$") as info:
        load_examples(str(path))
    assert len(str(info.value)) - len(str(path)) < 170


def test_schema_specific_readers_reject_the_other_schema(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0]])
    with pytest.raises(QaloraError, match=r"a\.jsonl line 1: record is missing field 'messages'"):
        read_chat_jsonl(path)
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT[0]])
    with pytest.raises(QaloraError, match=r"c\.jsonl line 1: record is missing field 'instruction'"):
        read_alpaca(path)


def test_missing_path_and_plain_folder(tmp_path):
    with pytest.raises(QaloraError, match=r"nope\.jsonl: no such file or folder; accepted: 'default'"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(QaloraError, match=r"none of dataset_info\.json, state\.json"):
        load_examples(str(tmp_path))


def test_example_validates_its_messages():
    with pytest.raises(QaloraError, match=r"mine:3: message 0 has unknown role 'bot'"):
        Example(({"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}), "mine:3")
    example = Example([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "x")
    assert isinstance(example.messages, tuple) and example.response == "b"
