"""``qalora eval`` end to end on a tiny model folder, and its one-line errors."""

import json

import pytest

from qalora.cli import main


@pytest.fixture
def model_dir(tmp_path, tiny_model, tiny_tok):
    tiny_model.save_pretrained(tmp_path / "m")
    tiny_tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_eval_writes_table_and_json(model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", "piqa,winogrande", "mmlu", "--limit", "2",
                 "--shots", "5", "--max-length", "256", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mmlu (5-shot)" in printed and "piqa" in printed and f"wrote {out}" in printed
    report = json.loads(out.read_text())
    assert report["model"] == str(model_dir) and report["options"]["shots"] == 5
    assert report["results"]["piqa"]["n"] == 2 and report["results"]["mmlu"]["shots"] == 5
    assert main(["eval", "--model", str(model_dir), "--tasks", "piqa", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--tasks", "piqa,hellaswag2"], "task 'hellaswag2' is unknown; use one or more of: perplexity, mmlu, hellaswag"),
    (["--tasks", "mmlu", "--limit", "0"], "limit must be a positive number of items per task, got 0"),
    (["--tasks", "mmlu", "--limit", "-2"], "got -2"),
    (["--tasks", "mmlu", "--shots", "1"], "shots 1 is not supported; use one of: 0, 5"),
])
def test_bad_input_is_one_line(model_dir, capsys, args, message):
    assert main(["eval", "--model", str(model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_folder_without_tokenizer(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err
    assert f"model folder '{tmp_path / 'm'}' has no tokenizer" in err and err.count("\n") == 1
