"""The printed table and the no-overwrite atomic JSON file."""

import json

import pytest

from qalora.errors import QaloraError
from qalora.eval.report import format_table, write_json_new

EST = {"value": 0.655, "stderr": 0.0337, "n": 200}
REPORT = {"results": {
    "piqa": {"kind": "multiple_choice", "split": "validation", "shots": 0, "n": 200, "reported": "acc_norm",
             "acc": {"value": 0.64, "stderr": 0.034, "n": 200}, "acc_norm": EST, "seconds": 40.2},
    "commonsense": {"kind": "average", "n": 1400, "score": EST, "acc": EST, "seconds": 0.0},
    "perplexity": {"kind": "perplexity", "perplexity": 12.3456, "n_tokens": 16352, "seconds": 3},
}}


def test_table():
    lines = format_table(REPORT).splitlines()
    assert lines[0].split()[:4] == ["task", "split", "n", "metric"]
    assert lines[1].split() == ["piqa", "validation", "200", "acc_norm", "65.50", "±", "3.37", "acc", "64.00", "±",
                                "3.40", "40", "s"]
    assert "12.346" in lines[3] and "avg" in lines[2]


def test_write_json_new(tmp_path):
    out = tmp_path / "r.json"
    write_json_new(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    with pytest.raises(QaloraError, match="already exists"):
        write_json_new(out, {"a": 2})
    assert json.loads(out.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]
