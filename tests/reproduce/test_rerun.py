"""Paper rows built again and set beside the report's rows of the same id
(:mod:`qalora.reproduce.rerun`): the changes against naive references, the subset run on a tiny
model, and the command's refusals."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from conftest import tiny_llama, tiny_tokenizer
from qalora.reproduce import Row, reproduce
from qalora.reproduce.plan import COMMONSENSE
from qalora.reproduce.rerun import changes, rerun_file, rerun_markdown, rerun_report

TASKS = [*COMMONSENSE, "mmlu_0shot", "mmlu_5shot"]


def _results(flip: int, per_item: bool = True) -> dict:
    out = {}
    for k, t in enumerate(TASKS):
        bits = [(i * 5 + k) % 3 == 0 for i in range(30)]
        bits = [not b if i < flip else b for i, b in enumerate(bits)]
        metric = "acc" if t.startswith("mmlu") else "acc_norm"
        est = {"value": sum(bits) / 30, "stderr": 0.08, "n": 30}
        out[t] = {"reported": metric, metric: est, "acc": est}
        if per_item:
            out[t]["per_item"] = {"index": [str(i) for i in range(30)], metric: [int(b) for b in bits]}
    out["commonsense"] = {"score": {"value": statistics.mean(out[t][out[t]["reported"]]["value"] for t in COMMONSENSE),
                                    "stderr": 0.03, "n": 30 * len(COMMONSENSE)}}
    out["perplexity"] = {"perplexity": 50.0 + flip}
    return out


def _row(flip, loss, per_item=True, compute=None):
    return {"id": "qalora-int3-g32", "label": "QA-LoRA (merged) INT3 g32", "method": "qalora", "bits": 3,
            "group_size": 32, "results": _results(flip, per_item), "heldout_loss": loss, "compute": compute,
            "val_loss_start": 2.4 + flip / 1000}


def test_changes_are_paired_when_both_rows_kept_their_items_else_unpaired():
    after = _row(6, 2.25, compute={"dtype": "fp32", "base_kernel": "reference"})
    before = _row(0, 2.30)
    ch = changes([after], {"rows": [before]})[0]
    assert ch["heldout_loss"]["diff"] == pytest.approx(-0.05) and ch["ppl"]["diff"] == pytest.approx(6.0)
    a, b = (r["results"]["mmlu_0shot"]["per_item"]["acc"] for r in (after, before))
    d = [x - y for x, y in zip(a, b)]
    m = ch["accuracy"]["mmlu_0shot"]
    assert m["paired"] and m["n"] == 30
    assert m["diff"] == pytest.approx(statistics.mean(d)) and m["stderr"] == pytest.approx(statistics.stdev(d) / math.sqrt(30))
    old = _row(0, 2.30, per_item=False)  # an earlier row without per-item results
    u = changes([after], {"rows": [old]})[0]["accuracy"]["commonsense"]
    cs = after["results"]["commonsense"]["score"]["value"] - old["results"]["commonsense"]["score"]["value"]
    assert not u["paired"] and u["diff"] == pytest.approx(cs) and u["stderr"] == pytest.approx(math.sqrt(2) * 0.03)
    report = rerun_report({"rows": [after]}, {"rows": [old], "machine": {"cpus": 2}}, "qalora reproduce ...", ["qalora"])
    md = rerun_markdown(report)
    assert ("| QA-LoRA (merged) INT3 g32 | not recorded → fp32 / reference | 2.4000 → 2.4060 | 2.300 → 2.250 (-0.050) "
            "| 50.0 → 56.0 |") in md
    assert "unpaired (sqrt(se_a² + se_b²)) where the earlier row kept none" in md and "paired over" not in md
    assert changes([after], None) == [{"id": after["id"], "label": after["label"], "compute": after["compute"]}]
    assert rerun_file(["qalora", "qlora+gptq"]) == "results-rerun-qalora-qlora_gptq.json"


def test_paper_rows_rebuild_only_those_rows(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "fp")
    tiny_tokenizer().save_pretrained(tmp_path / "fp")
    rows = [Row("gptq", 2, 32), Row("qlora+gptq", 2, 32), Row("qalora", 2, 32)]
    s = reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), rows=rows, paper_rows=["qalora"], progress=False)
    assert [r["id"] for r in s["rows"]] == ["qalora-int2-g32"]
    assert s["rows"][0]["compute"] == {"dtype": "fp32", "base_kernel": "reference"}
    assert sorted(p.name for p in (tmp_path / "out" / "rows").iterdir()) == ["qalora-int2-g32.json"]
    assert not (tmp_path / "out" / "results.json").exists()
    assert json.loads((tmp_path / "out" / "results-qalora.json").read_text())["rows"] == s["rows"]


def test_paper_rows_refuse_a_docs_report_of_another_budget_before_work(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.json").write_text('{"budget": "small", "rows": []}')
    r = subprocess.run([sys.executable, "-m", "qalora", "reproduce", "--budget", "smoke", "--paper-rows", "qalora",
                        "--out", "r", "--docs", "docs"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "reports budget 'small'" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]
