"""A few items of every task on the real embedded model (SmolLM2-135M-Instruct)."""

import pytest

import qalora
from qalora.eval.tasks import registry

pytestmark = [pytest.mark.embedded, pytest.mark.usefixtures("one_thread")]


def test_every_task_runs_on_the_embedded_model(embedded_dir):
    names = list(registry())
    report = qalora.evaluate("default", tasks=names, limit=1, shots=5, seq_len=64, windows=1, progress=False)
    res = report["results"]
    assert set(res) == set(names)
    for name, r in res.items():
        if r["kind"] == "multiple_choice":
            assert r["n"] == 1 and 0.0 <= r[r["reported"]]["value"] <= 1.0, name
    assert res["mmlu"]["shots"] == 5 and len(res["mmlu"]["subjects"]) == 1
    assert 1.0 < res["perplexity"]["perplexity"] < 100.0  # the instruct model on LAMBADA prose: ~20
    assert res["commonsense"]["n"] == 7
