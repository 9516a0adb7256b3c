"""qalora reproduce on a tiny Llama with the smoke budget: every kind of row is built,
evaluated on the packaged tasks, cached for resume, and written up."""

import json

import pytest

from conftest import tiny_llama, tiny_tokenizer
from qalora.errors import QaloraError
from qalora.reproduce import Row, plan_rows, reproduce, write_docs
from qalora.reproduce.plan import budget
from qalora.reproduce.report import compare, results_markdown, same_as_base, table, verdicts

ROWS = [Row("base"), Row("lora"), Row("qlora"), Row("rtn", 2, 32), Row("gptq", 2, 32), Row("qlora+rtn", 2, 32),
        Row("qlora+gptq", 2, 32), Row("qalora", 2, 32)]


def test_plan_has_every_row_of_the_paper_table():
    ids = [r.id for r in plan_rows()]
    for expected in ("base", "lora", "qlora", "rtn-int4-g32", "gptq-int2-g32", "qlora+gptq-int3-g32",
                     "qlora+rtn-int2-g32", "qalora-int4-g32", "qalora-int3-g64", "gptq-int3-g64", "qlora+gptq-int3-g64"):
        assert expected in ids
    assert len(ids) == len(set(ids)) and "rtn-int3-g64" not in ids
    with pytest.raises(QaloraError, match="budget 'huge' is unknown"):
        budget("huge")


def test_compare_verdicts():
    assert compare({"value": 0.6, "stderr": 0.01}, {"value": 0.5, "stderr": 0.01})[2] == "beat"
    assert compare({"value": 0.5, "stderr": 0.05}, {"value": 0.52, "stderr": 0.05})[2].startswith("showed no")
    diff, se, v = compare({"value": 0.3, "stderr": 0.03}, {"value": 0.5, "stderr": 0.04})
    assert v == "lost to" and abs(diff + 0.2) < 1e-12 and abs(se - 0.05) < 1e-12


def test_rows_equal_to_the_base_are_marked():
    res = {"x": {"acc": {"value": 0.5}, "seconds": 3.0}}
    rows = [{"id": "base", "method": "base", "results": res},
            {"id": "rtn-int4-g32", "method": "rtn", "results": {"x": {"acc": {"value": 0.5}, "seconds": 2.0}}},
            {"id": "rtn-int3-g32", "method": "rtn", "results": {"x": {"acc": {"value": 0.4}}}},
            {"id": "qalora-int4-g32", "method": "qalora", "results": dict(res)}]
    assert same_as_base(rows) == {"rtn-int4-g32"}
    assert same_as_base(rows[1:]) == set()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    tiny_llama(0).save_pretrained(root / "fp")
    tiny_tokenizer().save_pretrained(root / "fp")
    summary = reproduce(root / "out", "smoke", str(root / "fp"), rows=ROWS, progress=False)
    return root, summary


def test_every_row_is_built_and_evaluated(run):
    root, summary = run
    rows = {r["id"]: r for r in summary["rows"]}
    assert list(rows) == [r.id for r in ROWS]
    for r in rows.values():
        res = r["results"]
        for task in ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "siqa"):
            assert res[task]["n"] == 4
        assert res["mmlu_0shot"]["acc"]["n"] == 4 and res["mmlu_5shot"]["acc"]["n"] == 2
        assert res["perplexity"]["n_windows"] == 1 and r["size_bytes"] > 0
        assert 0.0 < r["heldout_loss"] < 20.0
    assert rows["qalora-int2-g32"]["merge"]["fp64_max_abs_logit_diff"] <= 1e-4
    assert rows["qlora+gptq-int2-g32"]["merge"]["lossy"] is True
    assert rows["lora"]["trainable_parameters"] == rows["qlora"]["trainable_parameters"]
    assert rows["qalora-int2-g32"]["trainable_parameters"] < rows["qlora"]["trainable_parameters"]
    assert rows["rtn-int2-g32"]["size_bytes"] < rows["base"]["size_bytes"]
    assert json.loads((root / "out" / "results.json").read_text())["rows"] == summary["rows"]


def test_rerun_resumes_and_refuses_another_budget(run):
    root, summary = run
    row_file = root / "out" / "rows" / "gptq-int2-g32.json"
    before = row_file.stat().st_mtime_ns
    again = reproduce(root / "out", "smoke", str(root / "fp"), rows=ROWS, progress=False)
    assert row_file.stat().st_mtime_ns == before and again["rows"] == summary["rows"]
    rec = json.loads(row_file.read_text())
    loss = rec.pop("heldout_loss")
    row_file.write_text(json.dumps(rec))  # a record from before the held-out loss existed
    third = reproduce(root / "out", "smoke", str(root / "fp"), rows=ROWS, progress=False)
    assert third["rows"][4]["id"] == "gptq-int2-g32"
    assert third["rows"][4]["heldout_loss"] == pytest.approx(loss, rel=1e-6)
    with pytest.raises(QaloraError, match="budget 'smoke'"):
        reproduce(root / "out", "small", str(root / "fp"), rows=ROWS, progress=False)


def test_rerun_refuses_rows_and_stages_of_other_inputs(run, tmp_path):
    """A cached row, base, adapter or merge whose recorded inputs are not this run's is refused
    (one line naming what differs), never reused; another model in the same --out is refused."""
    import shutil

    root, summary = run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    rows = [Row("gptq", 2, 32), Row("qalora", 2, 32), Row("lora")]

    def edit(path, **changes):
        rec = json.loads(path.read_text())
        path.write_text(json.dumps({**rec, **changes}))
        return rec

    def refused(match, model=root / "fp"):
        with pytest.raises(QaloraError, match=match):
            reproduce(out, "smoke", str(model), rows=rows, progress=False)

    rec = edit(out / "rows" / "gptq-int2-g32.json", inputs={"checkpoint_sha256": "2" * 64})
    refused("gptq-int2-g32.json' holds a row result made with another checkpoint: 222222222222…, this run:")
    edit(out / "rows" / "gptq-int2-g32.json", inputs=None)
    refused("gptq-int2-g32.json' holds a row result without a record of its inputs")
    edit(out / "rows" / "gptq-int2-g32.json", inputs=rec["inputs"])
    report = edit(out / "models" / "qalora-int2-g32" / "merge_report.json", adapter_sha256="3" * 64)
    refused("qalora-int2-g32' holds a merged model made with another adapter: 333333333333…")
    edit(out / "models" / "qalora-int2-g32" / "merge_report.json", **report)
    acfg = edit(out / "adapters" / "lora" / "adapter_config.json", base_sha256="4" * 64)
    refused("adapters/lora' holds a adapter made with another base checkpoint: 444444444444…")
    edit(out / "adapters" / "lora" / "adapter_config.json", **acfg)
    meta = edit(out / "bases" / "gptq-int2-g32" / "qalora.json", quant_config={**json.loads(
        (out / "bases" / "gptq-int2-g32" / "qalora.json").read_text())["quant_config"], "calib_samples": 99})
    refused(r"gptq-int2-g32' holds a quantized base made with another quant_config \(calib_samples\): 99, this run: 4")
    edit(out / "bases" / "gptq-int2-g32" / "qalora.json", **meta)
    again = reproduce(out, "smoke", str(root / "fp"), rows=rows, progress=False)
    assert [r["id"] for r in again["rows"]] == ["gptq-int2-g32", "qalora-int2-g32", "lora"]
    assert again["rows"][0] == rec and len(rec["inputs"]["checkpoint_sha256"]) == 64  # reused as recorded
    other = tmp_path / "fp-moved"  # the plan names this folder, which now holds another model
    tiny_llama(1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    plan = json.loads((out / "plan.json").read_text())
    (out / "plan.json").write_text(json.dumps({**plan, "model": str(tmp_path / "fp-moved")}))
    refused("plan.json' holds a reproduce plan made with another source model", tmp_path / "fp-moved")


def test_docs_are_written(run, tmp_path):
    _, summary = run
    paths = write_docs(summary, tmp_path / "docs", "qalora reproduce --budget smoke", notes="Smoke run.")
    md = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert [p.name for p in paths] == ["RESULTS.md", "results.json", "results.png"]
    assert (tmp_path / "docs" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "QA-LoRA (merged) INT2 g32" in md and "Budget **smoke**" in md and "Smoke run." in md
    assert len(verdicts(summary["rows"])) == 3 and table(summary["rows"]).count("\n") == len(ROWS) + 1
    assert results_markdown(summary, "cmd").count("| ") > len(ROWS)
    twin = {**summary, "model": "default", "rows": summary["rows"] + [
        {**summary["rows"][0], "id": "rtn-int4-g32", "method": "rtn", "bits": 4, "group_size": 32,
         "label": "RTN, no tuning INT4 g32", "results": {**summary["rows"][0]["results"], "seconds": -1.0}}]}
    md = results_markdown(twin, "cmd")
    assert "| RTN, no tuning INT4 g32 (= base) |" in md and "(= base): every figure equals the unquantized base's (" \
        "rtn-int4-g32): each reproduces" in md and "ships as Q4_1" in md
    assert "(= base)" not in results_markdown(summary, "cmd")


def test_methods_suite_smoke(tmp_path):
    from qalora.reproduce.methods import METHOD_ROWS, methods_table

    tiny_llama(0).save_pretrained(tmp_path / "fp")
    tiny_tokenizer().save_pretrained(tmp_path / "fp")
    s = reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), suite="methods", grids=[(2, 32)], progress=False)
    rows = {r["row"]: r for r in s["rows"]}
    assert list(rows) == [r.name for r in METHOD_ROWS if r.runs_on(2, 32)] and s["grids"] == ["int2-g32"]
    assert "lota-omega32" not in rows and "lota" in rows  # the ω = 32 row runs on INT3 g32 only
    assert (tmp_path / "out" / "methods-int2g32.json").is_file()
    for name, r in rows.items():
        assert r["heldout_loss"] > 0 and r["bits"] == 2
        if name != "gptq":
            assert r["train_steps"] == 2 and r["merge"]["lossy"] == (name == "qlora+gptq")
            assert r["compute"] == {"dtype": "fp32", "base_kernel": "reference"}
        if r.get("merge") and not r["merge"]["lossy"]:  # the gate the merge passed, kept beside its error
            m = r["merge"]
            assert 0 < m["fp32_storage_floor"] and m["fp64_max_abs_logit_diff"] <= m["fp64_tolerance"]
    assert rows["peqa"]["kinds"] == ["scales"] and rows["lota+qalora"]["kinds"] == ["lota", "qalora"]
    assert rows["peqa"]["merge"]["codes_changed_fraction"] == 0 and rows["peqa"]["merge"]["scales_changed_fraction"] > 0
    table = methods_table(s["rows"])
    assert "| LoTA-QAF + QA-LoRA |" in table and "INT2 g32" in table
    again = reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), suite="methods", grids=[(2, 32)], progress=False)
    assert again["rows"] == s["rows"]  # cached
    with pytest.raises(QaloraError, match="grid int5-g32 is not one of the methods suite's"):
        reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), suite="methods", grids=[(5, 32)], progress=False)


def test_verdicts_are_paired_over_shared_items():
    """Rows with per-item results are compared item by item (a naive reference: mean and sample
    stdev of the per-item differences); rows without them fall back to the unpaired figure."""
    import math
    import statistics

    from qalora.reproduce.plan import COMMONSENSE
    from qalora.reproduce.report import paired_compare

    def res(seed, flip):
        out = {}
        for k, t in enumerate([*COMMONSENSE, "mmlu_0shot", "mmlu_5shot"]):
            bits = [(i * 7 + k + seed) % 3 == 0 for i in range(40)]
            bits = [not b if i < flip else b for i, b in enumerate(bits)]
            metric = "acc" if t.startswith("mmlu") else "acc_norm"
            est = {"value": sum(bits) / 40, "stderr": 0.07, "n": 40}
            out[t] = {"reported": metric, metric: est, "acc": est,
                      "per_item": {"index": [str(i) for i in range(40)], metric: [int(b) for b in bits]}}
        out["commonsense"] = {"score": {"value": statistics.mean(out[t][out[t]["reported"]]["value"] for t in COMMONSENSE),
                                        "stderr": 0.03, "n": 280}}
        return out

    a = {"id": "qalora-int3-g32", "method": "qalora", "bits": 3, "group_size": 32, "results": res(0, 6)}
    b = {"id": "qlora+gptq-int3-g32", "method": "qlora+gptq", "bits": 3, "group_size": 32, "results": res(0, 0)}
    diff, se, n = paired_compare(a, b, "mmlu_0shot")
    d = [x - y for x, y in zip(a["results"]["mmlu_0shot"]["per_item"]["acc"], b["results"]["mmlu_0shot"]["per_item"]["acc"])]
    assert n == 40 and diff == pytest.approx(statistics.mean(d)) and se == pytest.approx(statistics.stdev(d) / math.sqrt(40))
    cs = paired_compare(a, b, "commonsense")
    assert cs[2] == 40 * len(COMMONSENSE) and cs[1] == pytest.approx(se / math.sqrt(len(COMMONSENSE)))
    lines = verdicts([a, b])
    assert len(lines) == 3 and all("paired over" in line for line in lines)
    for r in (a, b):
        for t in r["results"].values():
            t.pop("per_item", None)
    assert all("unpaired: the rows kept no per-item results" in line for line in verdicts([a, b]))


def test_tasks_suite_smoke(tmp_path):
    """Every row of the task suite on a tiny model: split written once, rows trained on the
    training part, scored on the held-out part with per-item outcomes, compared paired; cached."""
    from qalora.reproduce.tasks import EXACT, TASK_ROWS
    from qalora.reproduce.tasks_report import tasks_markdown, write_task_docs

    tiny_llama(0).save_pretrained(tmp_path / "fp")
    tiny_tokenizer().save_pretrained(tmp_path / "fp")
    kw = dict(suite="tasks", tasks=["sst2"], grids=[(2, 32)], limit=40, progress=False)
    s = reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), **kw)
    rows = {r["row"]: r for r in s["rows"]}
    assert list(rows) == [r.name for r in TASK_ROWS]
    split = json.loads((tmp_path / "out" / "tasks" / "sst2" / "split.json").read_text())
    assert split["sizes"]["heldout"] >= 8 and split["sizes"]["train"] + split["sizes"]["heldout"] == 40
    train = (tmp_path / "out" / "tasks" / "sst2" / "train.jsonl").read_text().splitlines()
    assert len(train) == split["sizes"]["train"] and json.loads(train[0])["completion"] in (" negative", " positive")
    for name, r in rows.items():
        assert len(r["per_item"]["index"]) == split["sizes"]["heldout"] and r["reported"] == "acc"
        assert r["acc"]["value"] == pytest.approx(sum(r["per_item"]["acc"]) / split["sizes"]["heldout"])
        assert (r["bits"] is None) == (name in ("base", "lora", "qlora"))
    assert len({rows[n]["base_sha256"] for n in (*EXACT, "gptq")}) == 1       # one GPTQ base, recorded
    assert rows["gptq"]["method"] is None and rows["gptq"]["steps"] == 0 and rows["gptq"]["bits"] == 2
    assert not any("base_sha256" in rows[n] for n in ("base", "lora", "qlora", "qlora+rtn", "qlora+gptq"))
    kinds = [(c["kind"], c["a"]) for c in s["comparisons"]]
    assert ("tuning gain", "sst2-lora") in kinds
    assert sum(k == "exact vs requantized" for k, _ in kinds) == len(EXACT)
    # every row with a rate chose it on validation points of its own (INT4 g64 for grid rows)
    from qalora.reproduce.rates import choose

    for name, r in rows.items():
        mine = [p for p in s["selection"] if p["row"] == name]
        if name in ("base", "gptq", "lota"):
            assert r["lr"] is None and not mine and r["rate_chosen_on"] == []
            continue
        assert sorted(p["lr"] for p in mine) == [1e-3, 1e-2] and r["lr"] == choose(mine)
        assert r["rate_chosen_on"] == [p["id"] for p in mine]
        assert all(p["split"] == "validation" and p["bits"] == (4 if r["bits"] else None) for p in mine)
        assert all(p["acc"]["n"] == len(json.loads(
            (tmp_path / "out" / "tasks" / "sst2" / "select.json").read_text())["validation_keys"]) for p in mine)
    md = tasks_markdown(s, "qalora reproduce --suite tasks")
    assert "## sst2 (acc," in md and "| QA-LoRA + scales |" in md and "McNemar p" in md
    assert "Rate selection (acc on" in md
    written = write_task_docs(s, tmp_path / "docs", "qalora reproduce --suite tasks")
    assert [p.name for p in written] == ["tasks.json", "results_tasks.png", "RESULTS_TASKS.md"]
    assert json.loads(written[0].read_text())["rows"] == s["rows"] and written[1].read_bytes()[:4] == b"\x89PNG"
    assert "(results_tasks.png)" in written[2].read_text()
    again = reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), **kw)
    assert again["rows"] == s["rows"]
    # a run still going is reported from what is computed, nothing built (here: everything, and a
    # grid never built gives no row)
    seen = reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), **{**kw, "grids": [(2, 32), (3, 32)]},
                     cached_only=True)
    assert seen["rows"] == s["rows"] and seen["selection"] == s["selection"]
    with pytest.raises(QaloraError, match="task 'nope' is not a tuning task"):
        reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), **{**kw, "tasks": ["nope"]})
    with pytest.raises(QaloraError, match="task row 'x' is unknown"):
        reproduce(tmp_path / "out", "smoke", str(tmp_path / "fp"), **{**kw, "task_rows": ["x"]})


def _methods_summary(grids, rows, **kw):
    return {"suite": "methods", "budget": "small", "source_sha256": "abc", "budget_settings": {"steps": 100},
            "grids": grids, "machine": {"cpu": "x"}, "cached_only": True, "seconds_this_call": 1.0,
            "rows": [{"id": f"{name}-int{b}-g{g}", "row": name, "bits": b, "group_size": g, "heldout_loss": loss}
                     for name, b, g, loss in rows], **kw}


def test_methods_report_grows_row_by_row():
    from qalora.reproduce.methods import merge_summaries

    first = _methods_summary(["int3-g32"], [("gptq", 3, 32, 2.9), ("qalora", 3, 32, 2.3)])
    second = _methods_summary(["int4-g64"], [("gptq", 4, 64, 1.8)])
    merged = merge_summaries(first, second)
    assert merged["grids"] == ["int3-g32", "int4-g64"]                      # GRIDS order
    assert [(r["row"], r["bits"]) for r in merged["rows"]] == [("gptq", 3), ("qalora", 3), ("gptq", 4)]
    assert [e["rows"] for e in merged["earlier"]] == [["gptq-int3-g32", "qalora-int3-g32"], ["gptq-int4-g64"]]
    redo = merge_summaries(merged, _methods_summary(["int3-g32"], [("gptq", 3, 32, 2.8), ("peqa", 3, 32, 1.4)]))
    assert [(r["row"], r["bits"], r["heldout_loss"]) for r in redo["rows"]] == \
        [("gptq", 3, 2.8), ("qalora", 3, 2.3), ("peqa", 3, 1.4), ("gptq", 4, 1.8)]  # replaced, kept, added
    assert merge_summaries(None, second) is second
    with pytest.raises(QaloraError, match="budget"):
        merge_summaries(first, {**second, "budget": "smoke"})


def test_rows_on_another_base_are_flagged():
    from qalora.reproduce.methods import merge_summaries, methods_table, mixed_bases

    first = _methods_summary(["int3-g32"], [("gptq", 3, 32, 2.9), ("qalora", 3, 32, 2.3)])
    for r in first["rows"]:
        r["base_sha256"] = "a" * 64
    second = _methods_summary(["int3-g32"], [("peqa", 3, 32, 1.4)])
    second["rows"][0]["base_sha256"] = "b" * 64
    merged = merge_summaries(first, second)
    assert merged["mixed_bases"] == {"int3-g32": ["gptq-int3-g32", "peqa-int3-g32", "qalora-int3-g32"]}
    table = methods_table(merged["rows"])
    assert "| 1.400 † |" in table and "| 2.300 |" in table and "† on another GPTQ base" in table
    assert mixed_bases(first["rows"]) == {} and "†" not in methods_table(first["rows"])
    del first["rows"][1]["base_sha256"]                      # unrecorded counts as another base
    assert mixed_bases(first["rows"]) == {"int3-g32": ["gptq-int3-g32", "qalora-int3-g32"]}


def _task_row(task, name, bits, acc, base=None):
    grid = f"-int{bits}-g32" if bits else ""
    r = {"id": f"{task}-{name}{grid}", "task": task, "row": name, "label": name, "bits": bits,
         "group_size": 32 if bits else None, "reported": "acc",
         "acc": {"value": sum(acc) / len(acc), "stderr": 0.1}, "per_item": {"index": list(range(len(acc))), "acc": acc}}
    return {**r, "base_sha256": base} if base else r


def _tasks_summary(tasks, rows):
    return {"suite": "tasks", "budget": "small", "source_sha256": "abc", "budget_settings": {"steps": 200},
            "tasks": tasks, "grids": ["int3-g32"], "machine": {"processor": "x", "cpus": 2, "torch": "t"},
            "seconds_this_call": 10.0, "rows": rows, "comparisons": []}


def test_tasks_report_grows_over_calls_and_flags_mixed_bases():
    """A second call's rows join the first call's (replacing a row of the same id), the
    comparisons are those of all the rows, and exact rows on two GPTQ bases are listed."""
    from qalora.reproduce.tasks_report import merge_task_summaries, tasks_markdown

    first = _tasks_summary(["sst2"], [_task_row("sst2", "base", None, [0, 0, 1, 0]),
                                      _task_row("sst2", "qlora+gptq", 3, [0, 1, 1, 0]),
                                      _task_row("sst2", "qalora", 3, [1, 1, 1, 0], base="a" * 64)])
    second = _tasks_summary(["sst2", "arithmetic"], [_task_row("sst2", "lora", None, [1, 1, 1, 1]),
                                                     _task_row("sst2", "peqa", 3, [1, 1, 0, 1], base="b" * 64),
                                                     _task_row("arithmetic", "base", None, [1, 0])])
    merged = merge_task_summaries(first, second)
    assert [r["id"] for r in merged["rows"]] == ["sst2-base", "sst2-lora", "sst2-qlora+gptq-int3-g32",
                                                 "sst2-qalora-int3-g32", "sst2-peqa-int3-g32", "arithmetic-base"]
    assert merged["tasks"] == ["sst2", "arithmetic"] and merged["grids"] == ["int3-g32"]
    pairs = {(c["a"], c["b"]): c["diff"] for c in merged["comparisons"]}
    assert pairs == {("sst2-lora", "sst2-base"): 0.75, ("sst2-qalora-int3-g32", "sst2-qlora+gptq-int3-g32"): 0.25,
                     ("sst2-peqa-int3-g32", "sst2-qlora+gptq-int3-g32"): 0.25}
    assert merged["mixed_bases"] == {"sst2 int3-g32": ["sst2-peqa-int3-g32", "sst2-qalora-int3-g32"]}
    assert [e["rows"] for e in merged["earlier"]] == [sorted(r["id"] for r in first["rows"]),
                                                      sorted(r["id"] for r in second["rows"])]
    md = tasks_markdown(merged, "qalora reproduce --suite tasks")
    assert "from 2 calls" in md and "more than one GPTQ base" in md and "## arithmetic" in md
    assert "GPTQ base (SHA-256 of its checkpoint): INT3 g32 `bbbbbbbbbbbb…`" in md
    redo = merge_task_summaries(merged, _tasks_summary(["sst2"], [_task_row("sst2", "qalora", 3, [0, 0, 0, 0], "b" * 64)]))
    assert next(r for r in redo["rows"] if r["id"] == "sst2-qalora-int3-g32")["acc"]["value"] == 0.0
    assert redo["mixed_bases"] == {} and len(redo["rows"]) == 6
    other_task = merge_task_summaries(redo, _tasks_summary(["arithmetic"], [_task_row("arithmetic", "qalora", 3, [1, 0],
                                                                                      "c" * 64)]))
    assert other_task["mixed_bases"] == {}   # another task's rows on another base: nothing is compared across them
    assert merge_task_summaries(None, second) == {**second, "selection": []}
    # rate-selection points accumulate by id like rows: a call's own replace, the others stay
    def pt(lr, v):
        return {"id": f"sst2-select-qalora-int4-g64-lr{lr:g}", "task": "sst2", "row": "qalora", "lr": lr, "v": v}

    with_points = merge_task_summaries({**second, "selection": [pt(1e-3, 1), pt(1e-2, 1)]},
                                       {**second, "selection": [pt(1e-2, 2), pt(1e-4, 2)]})
    assert [(p["lr"], p["v"]) for p in with_points["selection"]] == [(1e-4, 2), (1e-3, 1), (1e-2, 2)]
    with pytest.raises(QaloraError, match="budget_settings"):
        merge_task_summaries(first, {**second, "budget_settings": {"steps": 100}})


def test_a_call_merges_into_the_report_as_it_stands_when_it_writes(tmp_path, monkeypatch):
    """Two calls side by side on one --docs folder: the report another call wrote while this one
    ran is read again (under the lock) when this call writes, so no call's rows are lost."""
    import qalora.reproduce as rep
    from qalora.cli import main
    from qalora.io import write_json

    docs = tmp_path / "docs"
    docs.mkdir()
    write_json(docs / "tasks.json", _tasks_summary(["sst2"], [_task_row("sst2", "base", None, [0, 0, 1, 0])]))
    meanwhile = _tasks_summary(["sst2"], [_task_row("sst2", "base", None, [0, 0, 1, 0]),
                                          _task_row("sst2", "qlora+gptq", 3, [0, 1, 1, 0])])

    def fake_reproduce(out, budget, model, **kw):
        write_json(docs / "tasks.json", meanwhile)  # the other call finishes first
        return _tasks_summary(["sst2"], [_task_row("sst2", "qalora", 3, [1, 1, 1, 0])])

    monkeypatch.setattr(rep, "reproduce", fake_reproduce)
    assert main(["reproduce", "--suite", "tasks", "--budget", "small", "--out", str(tmp_path / "w"),
                 "--docs", str(docs), "--quiet"]) == 0
    report = json.loads((docs / "tasks.json").read_text())
    assert [r["id"] for r in report["rows"]] == ["sst2-base", "sst2-qlora+gptq-int3-g32", "sst2-qalora-int3-g32"]
    assert [c["a"] for c in report["comparisons"]] == ["sst2-qalora-int3-g32"]
    assert (docs / ".tasks.json.lock").exists() and "sst2-qalora-int3-g32" in (docs / "RESULTS_TASKS.md").read_text()
    assert report["earlier"][-1]["command"].startswith("qalora reproduce --suite tasks --budget small")


def test_tasks_report_states_the_task_choice_and_a_verdict_per_grid():
    """Kept: LoRA beats the base by >= 10 points beyond two paired SEs; dropped otherwise. One
    plain sentence per grid groups the exact methods by their verdict against QLoRA w/ GPTQ."""
    from qalora.reproduce.tasks_report import comparisons, tasks_markdown

    rows = [_task_row("sst2", "base", None, [0, 0, 1, 0]), _task_row("sst2", "lora", None, [1, 1, 1, 1]),
            _task_row("sst2", "qlora+gptq", 3, [0, 0, 0, 0, 1, 1, 1, 1]),
            _task_row("sst2", "qalora", 3, [1, 1, 1, 1, 1, 1, 1, 1]),   # +0.5, se 0.19: beat
            _task_row("sst2", "peqa", 3, [0, 0, 0, 0, 0, 1, 1, 1]),     # -0.125, se 0.125: no clear difference
            _task_row("sst2", "lota", 3, [0, 0, 0, 0, 0, 0, 0, 0]),     # -0.5: lost
            _task_row("arithmetic", "base", None, [0, 1, 0, 1]), _task_row("arithmetic", "lora", None, [1, 0, 0, 1])]
    summary = {**_tasks_summary(["sst2", "arithmetic"], rows), "comparisons": comparisons(rows)}
    md = tasks_markdown(summary, "qalora reproduce --suite tasks")
    assert "| sst2 | +75.0 ± 25.0 | kept |" in md and "| arithmetic | +0.0 ± 40.8 | dropped |" in md
    assert "Not measured in these rows: sciq, csqa, boolq" in md
    assert ("- **INT3 g32**, against QLoRA w/ GPTQ — qalora: beat it; lota: lost to it; peqa: no clear difference."
            in md)
    assert md.index("## Task choice") < md.index("## sst2") < md.index("Verdicts:") < md.index("## arithmetic")


def test_training_time_counts_each_adapter_once():
    """QLoRA's adapter serves the QLoRA row and both re-quantized rows of its task: its seconds
    count once; exact rows at two grids, and the same method on two tasks, count apiece."""
    from qalora.reproduce.tasks_report import training_seconds

    def r(task, row, method, bits, secs):
        return {"task": task, "row": row, "method": method, "bits": bits, "group_size": 32 if bits else None,
                "train_seconds": secs}

    rows = [r("sst2", "qlora", "qlora", None, 100.0), r("sst2", "qlora+rtn", "qlora", 3, 100.0),
            r("sst2", "qlora+gptq", "qlora", 2, 100.0), r("sst2", "qalora", "qalora", 3, 10.0),
            r("sst2", "qalora", "qalora", 2, 20.0), r("sst2", "qalora+scales", "qalora", 2, 30.0),
            r("arithmetic", "qlora", "qlora", None, 50.0), {"task": "sst2", "row": "base", "method": None,
                                                            "bits": None, "group_size": None}]
    assert training_seconds(rows) == 100.0 + 10.0 + 20.0 + 30.0 + 50.0


def test_rate_selection_time_counts_each_adapter_once():
    """The QLoRA rows' validation points at one rate share one adapter; each exact row's are its own."""
    from qalora.reproduce.tasks_report import selection_seconds

    def p(row, lr, secs, task="sst2"):
        return {"task": task, "row": row, "lr": lr, "train_seconds": secs}

    points = [p("qlora", 1e-3, 100.0), p("qlora+rtn", 1e-3, 100.0), p("qlora+gptq", 1e-3, 100.0),
              p("qlora", 1e-2, 90.0), p("qalora", 1e-3, 10.0), p("qalora+scales", 1e-3, 30.0),
              p("qalora", 1e-3, 40.0, task="arithmetic"), {"task": "sst2", "row": "peqa", "lr": 1e-3}]
    assert selection_seconds(points) == 100.0 + 90.0 + 10.0 + 30.0 + 40.0
