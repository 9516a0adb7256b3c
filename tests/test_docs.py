"""The figures in README.md and docs/ against the committed JSON they come from.

Pure file parsing, no model: each README table with a JSON source is found by its header line,
its rows are parsed, and every figure is compared with the JSON's value *rounded as printed*:
a printed ``1.5e-5`` passes for values in [1.45e-5, 1.55e-5], a printed ``91.7 %`` for
[91.65, 91.75] % (half a unit of the last printed digit, no other slack). ``docs/RESULTS.md`` must
be exactly what ``qalora.reproduce.report.results_markdown`` writes from ``docs/results.json`` and
``docs/NOTES.md``, and ``docs/results.json`` must hold the fields ``qalora reproduce`` writes.
A README table without a JSON must say so beside it (``UNCHECKED``), and every check is run once
more on a README with one figure of its table changed by one unit of the last digit, which it
must refuse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NOT_BACKED = "Nothing committed backs these figures"


def load(rel: str):
    return json.loads((ROOT / rel).read_text())


# ------------------------------------------------------------------------------- parsing helpers

def _cells(line: str) -> list[str]:
    """The cells of one Markdown table line (``\\|`` inside a cell is not a separator)."""
    body = line.strip()
    body = body[1:-1] if body.endswith("|") else body[1:]
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def table_at(md: str, header_start: str) -> tuple[int, list[str], list[list[str]]]:
    """``(line index, header cells, body rows)`` of the one table whose header line starts with
    ``header_start`` (leading spaces ignored: tables inside list items count too)."""
    lines = md.splitlines()
    hits = [i for i, line in enumerate(lines) if line.strip().startswith(header_start)]
    assert len(hits) == 1, f"{len(hits)} tables start with {header_start!r}"
    i = hits[0]
    assert set(lines[i + 1].strip()) <= set("|-: "), f"no separator line under {header_start!r}"
    rows, j = [], i + 2
    while j < len(lines) and lines[j].strip().startswith("|"):
        rows.append(_cells(lines[j]))
        j += 1
    return i, _cells(lines[i]), rows


NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def printed(text: str) -> tuple[float, float]:
    """``(value, half a unit of its last digit)`` of the one number in ``text``."""
    found = NUMBER.findall(text)
    assert len(found) == 1, f"expected one number in {text!r}, found {found}"
    number = found[0].replace(",", "")
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return float(number), 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def agrees(text: str, value: float, scale: float = 1.0) -> bool:
    """Whether ``value * scale`` rounds to the number printed in ``text``."""
    x, half = printed(text)
    return abs(value * scale - x) <= half * (1 + 1e-9)


def check(text: str, value, where: str, scale: float = 1.0) -> None:
    assert value is not None and agrees(text, value, scale), \
        f"{where}: the README prints {text!r}, the JSON holds {value!r}" + (f" (x {scale:g})" if scale != 1 else "")


def named_beside(md: str, line: int, source: str, before: int = 14) -> None:
    """The table at ``line`` names its JSON in the lines just above it."""
    above = "\n".join(md.splitlines()[max(0, line - before):line])
    assert source in above, f"the table at README line {line + 1} does not name {source}"


def test_printed_rounding():
    assert agrees("1.5e-5", 1.549440570691729e-05) and not agrees("1.6e-5", 1.549440570691729e-05)
    assert agrees("3.3e-4", 3.2512e-4) and not agrees("3.2e-4", 3.2512e-4)
    assert agrees("82 %", 0.824999988, 100) and not agrees("83 %", 0.824999988, 100)
    assert agrees("10,252,800", 10252800) and not agrees("10,252,801", 10252800)
    assert agrees("10.25 M", 10252800, 1e-6) and agrees("0 s", 0.49) and not agrees("0 s", 0.51)


# ----------------------------------------------------------------------------------- the checks

def check_quantize_ppl(md: str) -> None:
    line, _, rows = table_at(md, "| model | method | perplexity |")
    named_beside(md, line, "benchmarks/results/quantize_ppl.json")
    js = load("benchmarks/results/quantize_ppl.json")["rows"]
    assert len(rows) == len(js), "README and quantize_ppl.json have different rows"
    for cells, r in zip(rows, js):
        model, method, ppl, bpw, seconds = cells
        where = f"quantize_ppl {r['model']}"
        assert model == ("fp32" if r["group_size"] is None else f"INT{r['bits']} g{r['group_size']}"), where
        assert method == ("—" if r["method"] == "-" else r["method"]), where
        check(ppl, r["ppl"], where)
        check(bpw, r["bits_per_weight"], where)
        check(seconds, r["quantize_s"], where)


def check_kernels(md: str) -> None:
    line, _, rows = table_at(md, "| weight (out×in) | rows M |")
    named_beside(md, line, "benchmarks/results/kernels.json")
    js = load("benchmarks/results/kernels.json")["rows"]
    assert len(rows) == len(js), "README and kernels.json have different rows"
    for cells, r in zip(rows, js):
        shape, m, int4, ref, fp32, bf16, sqnr = cells
        where = f"kernels {r['shape']} M={r['rows']}"
        assert shape == r["shape"] and int(m) == r["rows"], where
        for text, key in ((int4, "int4_ms"), (ref, "reference_ms"), (fp32, "fp32_ms"), (bf16, "bf16_ms"),
                          (sqnr, "int4_sqnr_db")):
            check(text, r[key], f"{where} {key}")
    # the kernel bullet's count of cells where int4 beats the reference kernel, and the exceptions
    claim = re.search(r"in (\d+) of the (\d+) shape × row-count cells", md)
    assert claim, "the kernel bullet's count is gone"
    slower = [r for r in js if r["int4_ms"] >= r["reference_ms"]]
    assert (int(claim[1]), int(claim[2])) == (len(js) - len(slower), len(js)), "int4-beats-reference count"
    said = re.findall(r"(\d+x\d+) at M = (\d+) \(([\d.]+) vs ([\d.]+) ms\)", md)
    assert len(said) == len(slower), "the exceptions listed are not the JSON's"
    for (shape, m, a, b), r in zip(said, slower):
        assert (shape, int(m)) == (r["shape"], r["rows"]), "an exception listed is not the JSON's"
        check(a, r["int4_ms"], f"exception {shape} M={m}")
        check(b, r["reference_ms"], f"exception {shape} M={m}")


def check_training(md: str) -> None:
    line, head, rows = table_at(md, "| method | frozen base | trainable parameters |")
    named_beside(md, line, "benchmarks/results/train_methods.json")
    js = load("benchmarks/results/train_methods.json")["rows"]
    steps = [int(re.search(r"@(\d+)", h)[1]) for h in head[5:]]
    assert len(rows) == len(js), "README and train_methods.json have different rows"
    for cells, r in zip(rows, js):
        where = f"train_methods {r['method']}"
        assert cells[0] == r["method"], where
        check(cells[2], r["trainable_parameters"], where)
        check(cells[3], r["median_s_per_step"], where)
        check(cells[4], r["peak_rss_gb"], where)
        curve = dict(r["val_curve"])
        for text, step in zip(cells[5:], steps):
            check(text, curve[step], f"{where} val loss @{step}")


def check_merge_reports(md: str) -> None:
    line, _, rows = table_at(md, "| model | weights, max err | fp64 merge error |")
    named_beside(md, line, "benchmarks/results/merge_reports.json")
    js = load("benchmarks/results/merge_reports.json")
    assert len(rows) == len(js), "README and merge_reports.json have different rows"
    for cells, r in zip(rows, js):
        label, ulps, fp64, storage, fp32, noise, int4 = cells
        where = f"merge_reports {r['model']}"
        assert label.startswith(f"INT{r['bits']} g{r['group_size']}"), where
        method = re.search(r"\((\w+)\)", label)
        assert method is None or method[1].lower() == r["method"], where
        check(ulps, r["max_weight_err_ulps"], where)
        check(fp64, r["fp64_max_abs_logit_diff"], f"{where} fp64")
        check(storage, r["fp32_storage_floor"], f"{where} storage floor")
        check(fp32, r["fp32_max_abs_logit_diff"], f"{where} fp32")
        check(noise, r["fp32_noise_floor"], f"{where} noise floor")
        i4_max, i4_top1 = (t.strip() for t in int4.split("/"))
        check(i4_max, r["int4_max_abs_logit_diff"], f"{where} int4 max")
        check(i4_top1, r["int4_top1"], f"{where} int4 top-1", scale=100)


def check_gguf_llamacpp(md: str) -> None:
    line, _, rows = table_at(md, "| passage | positions | qalora kernel |")
    named_beside(md, line, "benchmarks/results/gguf_llamacpp.json")
    js = load("benchmarks/results/gguf_llamacpp.json")
    kernels = list(dict.fromkeys(r["kernel"] for r in js["rows"]))
    assert len(rows) == len(js["rows"]), "README and gguf_llamacpp.json have different rows"
    for i, (cells, r) in enumerate(zip(rows, js["rows"])):
        passage, positions, kernel, top1, mean, worst, last = cells
        where = f"gguf_llamacpp row {i + 1}"
        assert int(passage) == 1 + i // len(kernels) and int(positions) == r["positions"], where
        assert kernel.split()[0] == r["kernel"], where
        check(top1, r["top1"], f"{where} top-1", scale=100)
        check(mean, r["mean_abs_diff"], f"{where} mean")
        check(worst, r["max_abs_diff"], f"{where} max")
        assert last == ("yes" if r["last_top1_equal"] else "no"), where
    assert js["same_tokens"] is True and "tokenizes exactly like the HF tokenizer" in md
    assert js["llama_cpp_answer"] == js["qalora_answer"] and f'("{js["qalora_answer"]}")' in md


def methods_rows() -> dict:
    js = load("docs/methods.json")["rows"]
    return {(r["label"], r["bits"], r["group_size"]): r for r in js}


def check_methods_measured(md: str) -> None:
    """The measured methods table: rows are ``docs/methods.json``'s (by label), the held-out loss per
    grid with 3 decimals, ``-`` where the JSON has no row."""
    line, head, rows = table_at(md, "| method | INT")
    named_beside(md, line, "docs/methods.json")
    assert head[-2:] == ["codes moved (INT3 g32)", "trainable"], head
    grids = [tuple(map(int, re.fullmatch(r"INT(\d+) g(\d+)", h).groups())) for h in head[1:-2]]
    by = methods_rows()
    labels = [cells[0] for cells in rows]
    missing = {label for label, _, _ in by} - set(labels)
    assert not missing, f"docs/methods.json rows missing from the README table: {sorted(missing)}"
    for cells in rows:
        label = cells[0]
        for text, (bits, group) in zip(cells[1:-2], grids):
            r = by.get((label, bits, group))
            if r is None:
                assert text == "-", f"methods {label} INT{bits} g{group}: no JSON row, README prints {text!r}"
            else:
                assert re.fullmatch(r"\d+\.\d{3}( †)?", text), f"methods {label}: {text!r} is not 3 decimals"
                check(text.removesuffix(" †"), r["heldout_loss"], f"methods {label} INT{bits} g{group}")
        r3 = by.get((label, 3, 32)) or next((r for (lb, _, _), r in by.items() if lb == label), None)
        moved, params = cells[-2], cells[-1]
        fraction = ((r3 or {}).get("merge") or {}).get("codes_changed_fraction")
        if fraction is None:
            assert moved == "-", f"methods {label}: codes moved {moved!r} without a JSON figure"
        else:
            check(moved, fraction, f"methods {label} codes moved", scale=100)
        if r3 is None or "trainable_parameters" not in r3:
            assert params == "-", f"methods {label}: trainable {params!r} without a JSON figure"
        else:
            check(params, r3["trainable_parameters"], f"methods {label} trainable", scale=1e-6)


def _grid_of(head: str) -> tuple:
    """``"INT3 g32"`` -> ``(3, 32)``, ``"16-bit"`` -> ``(None, None)``."""
    if head == "16-bit":
        return (None, None)
    bits, group = head.split()
    return (int(bits.removeprefix("INT")), int(group.removeprefix("g")))


# the task suite's first report, every method at one rate (2e-4), kept beside the re-run
SINGLE_RATE_TASKS = "docs/single-rate/tasks.json"


def check_task_table(md: str, header: str, task: str) -> None:
    """A task's table: per row and width the held-out accuracy ± its standard error (%), and for
    the exact rows their paired difference from QLoRA w/ GPTQ ± standard error with the verdict,
    as ``docs/tasks.json`` holds them; "-" only where the JSON has no such row."""
    line, head, rows = table_at(md, header)
    named_beside(md, line, SINGLE_RATE_TASKS, before=40)
    js = load(SINGLE_RATE_TASKS)
    by = {(r["label"], r["bits"], r["group_size"]): r for r in js["rows"] if r["task"] == task}
    pairs = {(c["a"], c["b"]): c for c in js["comparisons"]}
    grids = [_grid_of(h) for h in head[1:]]
    assert len(rows) >= 6, f"the {task} table lost rows"
    for label, *cells in rows:
        for (bits, group), cell in zip(grids, cells):
            r = by.get((label, bits, group))
            if cell == "-":
                assert r is None, f"tasks: the README leaves {label!r} INT{bits} g{group} of {task} empty"
                continue
            assert r is not None, f"tasks: no {task} row {label!r} at INT{bits} g{group} in {SINGLE_RATE_TASKS}"
            acc, _, vs = cell.partition(" (")
            value, se = acc.split(" ± ")
            check(value, r["acc"]["value"], f"tasks {task} {label} acc", scale=100)
            check(se, r["acc"]["stderr"], f"tasks {task} {label} stderr", scale=100)
            c = pairs.get((r["id"], f"{task}-qlora+gptq-int{bits}-g{group}"))
            if c is None:
                assert not vs, f"tasks {task} {label}: the README prints a comparison the JSON lacks"
                continue
            assert vs, f"tasks {task} {label} INT{bits} g{group}: the paired comparison is missing"
            diff, rest = vs.rstrip(")").replace("−", "-").split(" ± ")
            se_text, word = rest.split(", ")
            check(diff, c["diff"], f"tasks {task} {label} paired difference", scale=100)
            check(se_text, c["stderr"], f"tasks {task} {label} paired stderr", scale=100)
            expected = {"beat": "beat", "lost to": "lost"}.get(c["verdict"], "n.s.")
            assert word == expected, f"tasks {task} {label}: README says {word!r}, the JSON's verdict is {c['verdict']!r}"


# the "what each trains" table's method cell -> docs/methods.json's label
METHOD_LABELS = {"`qalora`": "QA-LoRA", "`qalora --train-scales`": "QA-LoRA + scales", "`peqa`": "PEQA (scales)",
                 "`lota`": "LoTA-QAF", "`lota --with-qalora`": "LoTA-QAF + QA-LoRA",
                 "`qlora` / `lora` (baselines)": "QLoRA w/ GPTQ (lossy)"}


def check_methods_trainable(md: str) -> None:
    """The descriptive methods table's trainable column, for every method docs/methods.json has at
    INT3 g32 (the others are not measured yet)."""
    _, head, rows = table_at(md, "| method | trains (per layer")
    column = next(i for i, h in enumerate(head) if h.startswith("trainable"))
    by = methods_rows()
    assert {cells[0] for cells in rows} == set(METHOD_LABELS), "the methods table's rows changed"
    for cells in rows:
        r = by.get((METHOD_LABELS[cells[0]], 3, 32))
        if r is not None and r.get("trainable_parameters"):
            check(cells[column].split("(")[0], r["trainable_parameters"], f"trainable {cells[0]}", scale=1e-6)


EXPORT_ROWS = {"qalora checkpoint": "qalora checkpoint", "`gguf`": "gguf", "`mlx` (float16)": "mlx float16",
               "`torchao`": "torchao unpacked", "`torchao --layout packed`": "torchao packed",
               "`peft` (adapter)": "peft adapter", "`gguf-lora` (adapter)": "gguf-lora adapter"}


def check_export_sizes(md: str) -> None:
    """The export table: every row's size (MB) and bits per parameter are export_sizes.json's."""
    line, head, rows = table_at(md, "| format | runtime | widths, groups |")
    named_beside(md, line, "benchmarks/results/export_sizes.json")
    js = {r["format"]: r for r in load("benchmarks/results/export_sizes.json")["rows"]}
    assert [r[0] for r in rows] == list(EXPORT_ROWS)
    for r in rows:
        rec = js[EXPORT_ROWS[r[0]]]
        check(r[-2], rec["bytes"], f"export {r[0]} size", 1e-6)
        if r[-1] != "—":
            check(r[-1], rec["bits_per_parameter"], f"export {r[0]} bits per parameter")


RERUN_JSON = "docs/results-rerun-qalora.json"


def check_rerun_table(md: str) -> None:
    """The paper rows re-run on the fp32 path: the README's table is exactly what
    ``qalora.reproduce.rerun.rerun_markdown`` prints from their JSON."""
    from qalora.reproduce.rerun import rerun_markdown

    line, _, _ = table_at(md, "| row | compute (before → after) |")
    named_beside(md, line, RERUN_JSON)
    expected = [x for x in rerun_markdown(load(RERUN_JSON)).splitlines() if x.startswith("|")]
    lines = md.splitlines()
    assert lines[line:line + len(expected)] == expected, f"the re-run table is not what rerun_markdown prints from {RERUN_JSON}"
    assert not lines[line + len(expected)].startswith("|"), "the re-run table has rows its JSON lacks"


CHECKS = {
    "| model | method | perplexity |": check_quantize_ppl,
    "| weight (out×in) | rows M |": check_kernels,
    "| method | frozen base | trainable parameters |": check_training,
    "| model | weights, max err | fp64 merge error |": check_merge_reports,
    "| passage | positions | qalora kernel |": check_gguf_llamacpp,
    "| method | INT": check_methods_measured,
    "| method | trains (per layer": check_methods_trainable,
    "| format | runtime | widths, groups |": check_export_sizes,
    "| SST-2 row |": lambda md: check_task_table(md, "| SST-2 row |", "sst2"),
    "| arithmetic row |": lambda md: check_task_table(md, "| arithmetic row |", "arithmetic"),
    "| row | compute (before → after) |": check_rerun_table,
}
# tables no committed JSON backs: the README must say so beside them
UNCHECKED = {"| task | n | acc | acc_norm | wall |": "qalora eval / lm-eval figures of 2026-11-24"}


@pytest.mark.parametrize("header", list(CHECKS))
def test_readme_table_agrees_with_its_json(header):
    CHECKS[header](README)


def _perturbed(md: str, header: str) -> str:
    """``md`` with the last digit of the first body row of the table under ``header`` moved by one."""
    lines = md.splitlines(keepends=True)
    i = next(k for k, line in enumerate(lines) if line.strip().startswith(header)) + 2
    digits = [m.start() for m in re.finditer(r"\d", lines[i])]
    assert digits, f"no figure in the first row under {header!r}"
    at = digits[-1]
    lines[i] = lines[i][:at] + str((int(lines[i][at]) + 1) % 10) + lines[i][at + 1:]
    return "".join(lines)


@pytest.mark.parametrize("header", list(CHECKS))
def test_each_check_refuses_a_changed_figure(header):
    with pytest.raises(AssertionError):
        CHECKS[header](_perturbed(README, header))


def test_every_readme_table_is_checked_or_marked():
    lines = README.splitlines()
    headers = [i for i, line in enumerate(lines)
               if line.strip().startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: ")
               and "-" in lines[i + 1] and not (i > 0 and lines[i - 1].strip().startswith("|"))]
    for i in headers:
        header = lines[i].strip()
        checked = [h for h in CHECKS if header.startswith(h)]
        marked = [h for h in UNCHECKED if header.startswith(h)]
        assert checked or marked, f"README line {i + 1}: a table no test checks and no JSON backs: {header[:60]!r}"
        if marked and not checked:
            assert NOT_BACKED in "\n".join(lines[max(0, i - 25):i]), \
                f"README line {i + 1}: the table is not backed by a JSON and does not say so"


def _pipeline_block(md: str) -> tuple[str, str]:
    """``(section text, the block of format_table output)`` of the README's Pipeline section."""
    section = md[md.index("## Pipeline"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```\n(weights .*?)\n```", section, re.S)
    assert len(blocks) == 1, "the Pipeline section has no (or several) pasted pipeline tables"
    return section, blocks[0]


def test_pipeline_block_is_the_committed_runs_or_marked():
    section, block = _pipeline_block(README)
    record = ROOT / "benchmarks" / "results" / "pipeline.json"
    if record.is_file():
        from qalora.stages.pipeline import format_table

        assert block == format_table(json.loads(record.read_text())), \
            "the README's pipeline table is not what format_table prints from benchmarks/results/pipeline.json"
        assert NOT_BACKED not in section, "the Pipeline section still says nothing backs its table"
        earlier = load("benchmarks/results/pipeline-lr2e-4.json")       # the same job at the old rate
        quoted = f"{earlier['val_loss_before']:.4f} → {earlier['val_loss_after']:.4f}"
        assert quoted in section and "pipeline-lr2e-4.json" in section, f"the old-rate run's {quoted} is not quoted"
    else:
        assert NOT_BACKED in section and "2026-11-24" in section, \
            "the pipeline table has no committed pipeline.json and is not marked with its date and command"


# ----------------------------------------------------------------------------- docs/RESULTS.md

# what qalora.reproduce.run.reproduce writes for the paper suite ({**plan, machine, rows, timings});
# a plan may also record the source model's fingerprint
RUN_FIELDS = {"budget", "model", "budget_settings", "machine", "rows", "seconds_this_call", "seconds_total"}
OPTIONAL_RUN_FIELDS = {"source_sha256"}


def test_results_json_holds_what_reproduce_writes():
    from qalora.reproduce.plan import budget

    s = load("docs/results.json")
    assert RUN_FIELDS <= set(s) <= RUN_FIELDS | OPTIONAL_RUN_FIELDS, sorted(set(s) ^ RUN_FIELDS)
    assert s["budget_settings"] == vars(budget(s["budget"]))
    assert isinstance(s["seconds_this_call"], (int, float)) and not isinstance(s["seconds_this_call"], bool)
    from qalora.reproduce.report import timing

    assert s["seconds_total"] == timing(s["rows"])["total"]  # what reproduce writes: every training counted


def _results_md(results_md: str) -> str:
    from qalora.reproduce.report import results_markdown

    command = re.search(r"^Command: `(.+)`$", results_md, re.M)
    assert command, "docs/RESULTS.md names no command"
    return results_markdown(load("docs/results.json"), command[1], (ROOT / "docs" / "NOTES.md").read_text())


def test_results_md_is_what_the_code_writes():
    md = (ROOT / "docs" / "RESULTS.md").read_text()
    assert md == _results_md(md), ("docs/RESULTS.md differs from what qalora.reproduce.report writes from "
                                   "docs/results.json and docs/NOTES.md: regenerate it with write_docs")
    changed = md.replace("| 1.724 |", "| 1.725 |", 1)
    assert changed != md and changed != _results_md(changed)


def test_wall_time_counts_every_adapters_training_once():
    from qalora.reproduce.report import results_markdown, timing

    rows = [{"id": "base", "method": "base", "build_seconds": 2.0, "eval_seconds": 100.0},
            # trained before the call that built the row: its build is a reload
            {"id": "lora", "method": "lora", "train_seconds": 300.0, "build_seconds": 1.0, "eval_seconds": 100.0},
            # trained in part before a resume, in part in the build
            {"id": "qlora", "method": "qlora", "train_seconds": 600.0, "build_seconds": 350.0, "eval_seconds": 100.0},
            # the same adapter, reused: not counted again
            {"id": "qlora+gptq-int3-g32", "method": "qlora+gptq", "train_seconds": 600.0, "build_seconds": 70.0,
             "eval_seconds": 100.0},
            # trained inside its build
            {"id": "qalora-int3-g32", "method": "qalora", "train_seconds": 320.0, "build_seconds": 360.0,
             "eval_seconds": 100.0}]
    t = timing(rows)
    assert t == {"evaluate": 500.0, "build": 783.0, "earlier_training": 299.0 + 250.0, "total": 1832.0}
    summary = load("docs/results.json")
    s = timing(summary["rows"])
    builds_and_evals = sum(r["build_seconds"] + r["eval_seconds"] for r in summary["rows"])
    assert s["total"] > builds_and_evals + 300  # LoRA's training (366 s) ran before the recorded call
    assert f"Build + evaluation time of all rows: {s['total'] / 3600:.1f} h" in results_markdown(summary, "cmd")


def test_scale_md_is_what_scale_doc_writes():
    """docs/SCALE.md is rendered from the two committed scale runs; a changed figure in either
    JSON changes the text."""
    from conftest import benchmark_module

    doc = benchmark_module("scale_doc")
    runs = doc.load_runs()
    prose = (ROOT / "benchmarks" / "scale_doc.md").read_text()
    md = (ROOT / "docs" / "SCALE.md").read_text()
    assert md == doc.render(runs, prose), "docs/SCALE.md is stale: run python benchmarks/scale_doc.py"
    for key in ("smollm2", "tinyllama"):
        assert all(r["status"] in ("ok", "reused") for r in runs[key]["data"]["rows"]), f"{key}: a stage did not finish"
        assert all(r["peak_rss_bytes"] < 24 * 2**30 for r in runs[key]["data"]["rows"]), f"{key}: over 24 GiB"
    runs["tinyllama"]["rows"]["merge"]["peak_rss_bytes"] += 10**7
    assert doc.render(runs, prose) != md


def test_speed_block_is_speed_json_table():
    """The README's speed block is what ``benchmarks/speed.py``'s ``format_table`` prints from the
    rows and settings of its JSON (not a string the script stored beside them)."""
    section = README[README.index("### Speed:"):]
    section = section[:section.index("\n## ")]
    assert "benchmarks/results/speed.json" in section
    blocks = re.findall(r"```\n(system .*?)\n```", section, re.S)
    from conftest import benchmark_module

    speed, common = benchmark_module("speed"), benchmark_module("speed_common")
    js = load("benchmarks/results/speed.json")
    settings = common.Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in js["settings"].items()})
    assert blocks == [speed.format_table(js["rows"], settings)], \
        "README speed block differs from what benchmarks/speed.py's format_table prints from speed.json's rows"



# ----------------------------------------------------------------------------- docs/LEARNING_RATES.md

def test_learning_rates_doc_quotes_its_measurements():
    """The rate-vs-parametrization table is the one ``benchmarks/rate_parametrization.py`` wrote,
    every run on one base; the SST-2 figure is the default-rate check's, as is the README's."""
    doc = (ROOT / "docs" / "LEARNING_RATES.md").read_text()
    runs = load("benchmarks/results/rate_parametrization.json")
    assert runs["table"] in doc and len({r["base_sha256"] for r in runs["rows"]}) == 1
    sst2 = load("benchmarks/results/default_rate-sst2-qalora-int4-g64.json")
    assert not sst2["lr_given"] and sst2["merge_lossy"] is False
    from qalora.adapters.methods import METHODS

    assert sst2["lr"] == METHODS["qalora"].lr, "the SST-2 check ran at another rate than today's default"
    figure = f"{100 * sst2['acc']['value']:.1f} ± {100 * sst2['acc']['stderr']:.1f}"
    for text, where in ((doc, "docs/LEARNING_RATES.md"), (README, "README")):
        assert figure in text and "default_rate-sst2-qalora-int4-g64.json" in text, f"{where} lacks {figure}"


# ----------------------------------------------------------------------------- docs/RESULTS_TASKS.md

def test_results_tasks_is_what_the_report_renders_from_tasks_json():
    """The task suite's report (rates chosen on validation) is exactly what ``write_task_docs``
    renders from the committed ``docs/tasks.json``: no figure in it is typed by hand."""
    from qalora.reproduce.tasks_report import PLOT_FILE, tasks_markdown

    js = load("docs/tasks.json")
    md = (ROOT / "docs" / "RESULTS_TASKS.md").read_text()
    assert md == tasks_markdown(js, js["command"], plot=PLOT_FILE) + "\n"
    assert js.get("selection"), "docs/tasks.json holds no rate-selection points"
    tuned = [r for r in js["rows"] if r.get("method") and not (r["row"] == "lota")]
    assert tuned and all(r.get("lr") for r in tuned), "a tuned row of docs/tasks.json records no rate"


def test_learning_rates_doc_quotes_the_sst2_sweep():
    """The SST-2 validation curve and the chosen row quoted in docs/LEARNING_RATES.md are
    docs/tasks.json's."""
    doc = (ROOT / "docs" / "LEARNING_RATES.md").read_text()
    js = load("docs/tasks.json")
    points = sorted((p for p in js["selection"] if p["task"] == "sst2" and p["row"] == "qalora"), key=lambda p: p["lr"])
    curve = " / ".join(f"{100 * p['acc']['value']:.1f}" for p in points)
    rates = " / ".join(f"{p['lr']:.0e}".replace("e-0", "e-") for p in points)     # 0.003 -> 3e-3
    assert f"{curve} % at {rates}" in doc.replace("\n", " "), (curve, rates)
    row = next(r for r in js["rows"] if r["id"] == "sst2-qalora-int4-g64")
    assert f"{100 * row['acc']['value']:.1f} ± {100 * row['acc']['stderr']:.1f}" in doc
    from qalora.reproduce.rates import choose

    peqa = [p for p in js["selection"] if p["task"] == "sst2" and p["row"] == "peqa"]
    assert "PEQA chose 3e-4" in doc and len(peqa) == 5 and choose(peqa) == 3e-4
    lora = [p for p in js["selection"] if p["task"] == "sst2" and p["row"] == "lora"]
    assert "LoRA chose 3e-4" in doc and len(lora) == 5 and choose(lora) == 3e-4


def test_readme_quotes_the_rerun_rows_as_tasks_json_holds_them():
    js = {r["id"]: r for r in load("docs/tasks.json")["rows"]}
    head = README[:README.index("## Two commands")]
    for rid, rate in (("sst2-lora", "3e-4"), ("sst2-peqa-int4-g64", "3e-4"), ("sst2-qalora-int4-g64", "3e-3")):
        r = js[rid]
        assert f"{r['lr']:.0e}".replace("e-0", "e-") == rate, rid
        assert f"{100 * r['acc']['value']:.1f} ± {100 * r['acc']['stderr']:.1f} (at {rate})" in head.replace(
            "\n", " ") or f"{100 * r['acc']['value']:.1f} ± {100 * r['acc']['stderr']:.1f} ({rate})" in \
            head.replace("\n", " "), rid
