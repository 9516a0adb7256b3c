"""The evaluate driver on the tiny model: result layout, the commonsense average, errors."""

import json
import math

import pytest

import qalora
from qalora.errors import QaloraError
from qalora.eval.evaluate import EvalOptions, evaluate


def test_results_layout_and_average(tiny_model, tiny_tok):
    report = evaluate(tiny_model, tiny_tok, ["commonsense", "mmlu", "siqa"], limit=2, max_length=256, progress=False)
    json.dumps(report, allow_nan=False)  # JSON-able, no NaN
    res = report["results"]
    assert report["tasks"][-3:] == ["commonsense", "mmlu", "siqa"] and len(res) == 10
    for name in ("piqa", "hellaswag", "siqa"):
        assert res[name]["n"] == 2 and res[name]["split"] == "validation" and res[name]["shots"] == 0
        assert set(res[name]) >= {"acc", "acc_norm", "reported", "n_available", "seconds"}
    assert "acc_norm" not in res["winogrande"]
    assert res["mmlu"]["n"] == 2 and res["mmlu"]["split"] == "test" and res["mmlu"]["shots"] == 0
    members = res["commonsense"]["members"]
    assert members["piqa"] == "acc_norm" and members["boolq"] == "acc"
    mean = sum(res[m][metric]["value"] for m, metric in members.items()) / 7
    assert res["commonsense"]["score"]["value"] == pytest.approx(mean)
    se = math.sqrt(sum(res[m][metric]["stderr"] ** 2 for m, metric in members.items())) / 7
    assert res["commonsense"]["score"]["stderr"] == pytest.approx(se) and res["commonsense"]["n"] == 14


def test_same_seed_same_items_and_perplexity_still_runs(tiny_model, tiny_tok):
    a = evaluate(tiny_model, tiny_tok, "boolq,perplexity", limit=3, seed=7, seq_len=16, windows=2, progress=False)
    b = evaluate(tiny_model, tiny_tok, "boolq", limit=3, seed=7, progress=False)
    assert a["results"]["boolq"]["acc"] == b["results"]["boolq"]["acc"]
    ppl = a["results"]["perplexity"]
    assert ppl["kind"] == "perplexity" and ppl["n_windows"] == 2 and ppl["n_tokens"] == 30


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": "mmlu,truthfulqa"}, "task 'truthfulqa' is unknown; use one or more of: perplexity, mmlu"),
    ({"limit": 0}, "limit must be a positive number"),
    ({"limit": -1}, "limit must be a positive number"),
    ({"shots": 3}, "shots 3 is not supported; use one of: 0, 5"),
    ({"subset": "middle"}, "subset mode 'middle' is unknown"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
])
def test_bad_options(tiny_model, tiny_tok, kwargs, message):
    kwargs = {"tasks": "piqa", **kwargs}
    with pytest.raises(QaloraError, match=message):
        evaluate(tiny_model, tiny_tok, progress=False, **kwargs)


def test_cli_defaults_are_the_dataclass_defaults():
    from qalora.cli import build_parser

    args = build_parser().parse_args(["eval"])
    assert {f: getattr(args, f) for f in ("shots", "limit", "seed", "subset", "batch_size", "seq_len", "windows")} == \
        {"shots": 0, "limit": None, "seed": 0, "subset": "random", "batch_size": 4, "seq_len": 512, "windows": 32}
    assert EvalOptions().batch_size == args.batch_size


def test_api_refuses_a_folder_without_tokenizer_before_loading(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(QaloraError, match="has no tokenizer"):
        qalora.evaluate(tmp_path / "m", tasks="piqa")
    with pytest.raises(QaloraError, match="needs its tokenizer"):
        qalora.evaluate(tiny_model, tasks="piqa")
    with pytest.raises(QaloraError, match="is unknown"):  # task names are checked before any loading
        qalora.evaluate("no/such/folder", tasks="piqa2")
