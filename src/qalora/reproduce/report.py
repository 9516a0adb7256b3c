"""Turn ``qalora reproduce`` results into ``RESULTS.md`` (table + verdicts), JSON and a plot.

Verdicts compare QA-LoRA with "QLoRA w/ GPTQ" at each bit width on the commonsense average
and on MMLU (0-shot), with the difference's standard error ``sqrt(se_a^2 + se_b^2)`` (the two
rows are scored on the same items, so this is conservative)::

    beat        diff >  2 se
    lost        diff < -2 se
    no clear difference otherwise
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from qalora.eval.paired import align, paired, verdict
from qalora.reproduce.plan import COMMONSENSE, EXTRA_CHOICE

SHORT = {"hellaswag": "HellaS", "piqa": "PIQA", "winogrande": "WinoG", "arc_easy": "ARC-e", "arc_challenge": "ARC-c",
         "boolq": "BoolQ", "openbookqa": "OBQA", "siqa": "SIQA"}


def reported(result: dict) -> dict:
    """``{value, stderr, n}`` of a task result's customary metric."""
    return result[result.get("reported", "acc")]


def _pct(e: dict | None) -> str:
    if not e:
        return "-"
    se = e.get("stderr")
    return f"{100 * e['value']:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def _size(n: int | None) -> str:
    return "-" if not n else f"{n / 1e6:.0f} MB"


def _bits(row: dict) -> str:
    return "16" if row["bits"] is None else f"{row['bits']} (g{row['group_size']})"


def score(row: dict, key: str) -> dict:
    res = row["results"]
    if key == "commonsense":
        return res["commonsense"]["score"]
    if key.startswith("mmlu"):
        return res[key]["acc"]
    return reported(res[key])


def _figures(results):
    """``results`` without its timings (``seconds`` keys, at any depth): what the table reports."""
    if isinstance(results, dict):
        return {k: _figures(v) for k, v in results.items() if k != "seconds"}
    return results


def same_as_base(rows: list[dict]) -> set[str]:
    """Ids of quantized rows whose every figure equals the base row's: the model already sits on
    that grid (the embedded model ships as Q4_1, so untuned INT4 g32 RTN reproduces it)."""
    base = next((r for r in rows if r["method"] == "base"), None)
    if base is None:
        return set()
    figures = _figures(base["results"])
    return {r["id"] for r in rows if r["method"] in ("rtn", "gptq") and _figures(r["results"]) == figures}


def table(rows: list[dict], equal: set[str] = frozenset()) -> str:
    """Markdown table, one line per row: accuracies in % ± standard error. Rows in ``equal``
    (see :func:`same_as_base`) are marked "(= base)"."""
    head = ["row", "bits", "MMLU 0-shot", "MMLU 5-shot", *(SHORT[t] for t in COMMONSENSE), "CS avg (7)",
            *(SHORT[t] for t in EXTRA_CHOICE), "ppl", "held-out loss", "trainable", "train s", "size"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r["results"]
        cells = [r["label"] + (" (= base)" if r["id"] in equal else ""), _bits(r), _pct(score(r, "mmlu_0shot")), _pct(score(r, "mmlu_5shot")),
                 *(_pct(reported(res[t])) for t in COMMONSENSE), f"**{_pct(score(r, 'commonsense'))}**",
                 *(_pct(reported(res[t])) for t in EXTRA_CHOICE), f"{res['perplexity']['perplexity']:.1f}",
                 f"{r['heldout_loss']:.3f}" if r.get("heldout_loss") is not None else "-",
                 f"{r['trainable_parameters'] / 1e6:.1f} M" if r.get("trainable_parameters") else "-",
                 f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "-", _size(r.get("size_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(a: dict, b: dict) -> tuple[float, float, str]:
    """``(diff, se, verdict)`` of ``a - b`` for two ``{value, stderr}`` estimates treated as
    independent (``se = sqrt(se_a² + se_b²)``): the fallback for rows without per-item results."""
    diff = a["value"] - b["value"]
    se = math.sqrt((a.get("stderr") or 0.0) ** 2 + (b.get("stderr") or 0.0) ** 2)
    return diff, se, verdict(diff, se)


def paired_compare(a: dict, b: dict, key: str) -> tuple[float, float, int] | None:
    """``(diff, se, n)`` of row ``a`` minus row ``b`` on ``key``, paired over the items both
    scored (:mod:`qalora.eval.paired`); ``None`` when either row lacks per-item results.

    A task compares its reported metric item by item; MMLU its pooled ``acc``; the commonsense
    average the mean of its members' paired differences, ``se = sqrt(Σ se_k²) / K`` (tasks are
    disjoint item sets)."""
    ra, rb = a["results"], b["results"]
    members = list(COMMONSENSE) if key == "commonsense" else [key]
    parts = []
    for t in members:
        pa, pb = (ra.get(t) or {}).get("per_item"), (rb.get(t) or {}).get("per_item")
        if pa is None or pb is None:
            return None
        metric = "acc" if t.startswith("mmlu") else ra[t]["reported"]
        p = paired(*align(pa, pb, metric))
        if p.stderr is None:
            return None
        parts.append(p)
    k = len(parts)
    return (sum(p.diff for p in parts) / k, math.sqrt(sum(p.stderr ** 2 for p in parts)) / k,
            sum(p.n for p in parts))


def difference(a: dict, b: dict, key: str) -> tuple[float, float, str, int | None]:
    """``(diff, se, verdict, n)`` of row ``a`` minus row ``b`` on ``key``: paired over the shared
    items (:func:`paired_compare`, ``n`` items) where both rows kept them, else unpaired
    (:func:`compare`, ``n`` is ``None``)."""
    pc = paired_compare(a, b, key)
    if pc is None:
        return (*compare(score(a, key), score(b, key)), None)
    diff, se, n = pc
    return diff, se, verdict(diff, se), n


def verdicts(rows: list[dict]) -> list[str]:
    """One sentence per (bit width, group size, metric): QA-LoRA vs QLoRA w/ GPTQ, paired over
    the shared items where both rows kept per-item results, called beyond two standard errors."""
    by_id = {r["id"]: r for r in rows}
    out = []
    for r in rows:
        if r["method"] != "qalora":
            continue
        other = by_id.get(r["id"].replace("qalora", "qlora+gptq", 1))
        if other is None:
            continue
        for key, name in (("commonsense", "the commonsense average"), ("mmlu_0shot", "MMLU 0-shot"),
                          ("mmlu_5shot", "MMLU 5-shot")):
            diff, se, word, n = difference(r, other, key)
            how = "unpaired: the rows kept no per-item results" if n is None else f"paired over {n} items"
            out.append(f"- INT{r['bits']} g{r['group_size']}, {name}: QA-LoRA {word} QLoRA w/ GPTQ "
                       f"({100 * diff:+.1f} ± {100 * se:.1f} points, {how}; {_pct(score(r, key))} vs "
                       f"{_pct(score(other, key))}).")
    return out


def plot(rows: list[dict], path: str | os.PathLike, group_size: int = 32) -> None:
    """Commonsense average and MMLU 0-shot vs bits per method (PNG); 16-bit rows as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"qalora": ("QA-LoRA", "o-"), "qlora+gptq": ("QLoRA w/ GPTQ", "s--"), "qlora+rtn": ("QLoRA w/ RTN", "^:"),
              "gptq": ("GPTQ, no tuning", "x-."), "rtn": ("RTN, no tuning", "+:")}
    flat = {"base": ("base fp32", "k"), "lora": ("LoRA 16-bit", "tab:green"), "qlora": ("QLoRA 4+16", "tab:purple")}
    for ax, key, title in ((axes[0], "commonsense", "commonsense average (7 tasks)"),
                           (axes[1], "mmlu_0shot", "MMLU 0-shot")):
        for method, (label, style) in styles.items():
            pts = sorted((r["bits"], score(r, key)) for r in rows
                         if r["method"] == method and r["group_size"] == group_size)
            if pts:
                ax.errorbar([b for b, _ in pts], [100 * e["value"] for _, e in pts],
                            yerr=[100 * (e.get("stderr") or 0) for _, e in pts], fmt=style, capsize=3, label=label)
        for r in rows:
            if r["method"] in flat:
                label, color = flat[r["method"]]
                ax.axhline(100 * score(r, key)["value"], color=color, lw=0.8, ls="--", label=label)
        ax.set_xticks([2, 3, 4])
        ax.set_xlabel(f"bits per weight code (group size {group_size})")
        ax.set_ylabel("accuracy, %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def adapter_of(row: dict) -> str | None:
    """The adapter a row's model was tuned with, named as ``qalora reproduce`` names it under
    ``adapters/``: ``lora``; ``qlora``, shared by the QLoRA row and every QLoRA w/ RTN / GPTQ row;
    the row's own id for a QA-LoRA row. ``None`` for a row without training."""
    if not row.get("train_seconds"):
        return None
    method = str(row.get("method"))
    return "qlora" if method.startswith("qlora") else "lora" if method == "lora" else row["id"]


def timing(rows: list[dict]) -> dict:
    """Seconds the rows took, every adapter's training counted once::

        evaluate          sum of the rows' eval_seconds (tasks, perplexity, held-out loss)
        build             sum of the rows' build_seconds (quantize, train, merge in that call)
        earlier_training  training no row's build_seconds holds (an adapter trained, wholly or in
                          part, before the call that built its first row: a resumed run)
        total             the three together

    A row's ``build_seconds`` hold its adapter's training only when the training ran in the same
    call, and only for the first row that uses the adapter (the others reuse it). So for each
    adapter the recorded training time (``train_seconds``: seconds per step x steps) is compared
    with the build time of the first row that uses it, and the shortfall
    ``max(0, train_seconds - build_seconds)`` is added once."""
    evaluate = sum(r.get("eval_seconds") or 0.0 for r in rows)
    build = sum(r.get("build_seconds") or 0.0 for r in rows)
    earlier, seen = 0.0, set()
    for r in rows:
        name = adapter_of(r)
        if name is None or name in seen:
            continue
        seen.add(name)
        earlier += max(0.0, r["train_seconds"] - (r.get("build_seconds") or 0.0))
    return {"evaluate": round(evaluate, 1), "build": round(build, 1), "earlier_training": round(earlier, 1),
            "total": round(evaluate + build + earlier, 1)}


def _time_line(t: dict) -> str:
    h = {k: v / 3600 for k, v in t.items()}
    earlier = (f", and {h['earlier_training']:.1f} h of training that ran before the call that built its row"
               if t["earlier_training"] else "")
    return (f"Build + evaluation time of all rows: {h['total']:.1f} h (evaluation {h['evaluate']:.1f} h, builds "
            f"{h['build']:.1f} h{earlier}; every adapter's training counted once).")


def results_markdown(summary: dict, command: str, notes: str = "") -> str:
    """The whole ``RESULTS.md``: setting, command, machine, time, table, verdicts, notes."""
    rows, b, m = summary["rows"], summary["budget_settings"], summary["machine"]
    equal = sorted(same_as_base(rows))
    shipped = " (the embedded SmolLM2 ships as Q4_1, i.e. on the INT4 g32 grid)" if summary["model"] == "default" else ""
    parts = [
        "# Results: the paper's Table 1 on the embedded model",
        "",
        f"Budget **{summary['budget']}**: {b['steps']} training steps per tuned row (batch {b['batch_size']} × "
        f"{b['max_seq_len']} tokens, rank {b['rank']}, alpha {b['alpha']}, lr {b['lr']}, seed {b['seed']}, same "
        f"data for all), GPTQ with {b['calib_samples']} calibration sequences, "
        f"{b['choice_limit'] or 'all'} items per commonsense task, MMLU {b['mmlu_limit'] or 'all'} items 0-shot "
        f"and {b['mmlu5_limit'] or 'all'} 5-shot (spread over the 57 subjects), perplexity on "
        f"{b['ppl_windows']} × 512 tokens of LAMBADA passages. Model: {summary['model']}.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, GPU: {m['cuda'] or 'none'}. {_time_line(timing(rows))}",
        "",
        "Accuracy in % ± standard error (binomial, over the items scored); the customary metric per task "
        "(acc_norm for HellaSwag, ARC, PIQA, OpenBookQA; acc for WinoGrande, BoolQ, SIQA). Every row computes "
        "in fp32 (quantized rows on the dense kernel: fp32 dequantized weights, identical to the reference kernel). \"size\" is the 16-bit size for unquantized rows and "
        "the qalora checkpoint file otherwise (embeddings and lm_head stay fp32 in it). \"held-out loss\" is the "
        "final model's mean cross entropy on the response tokens of every held-out example of the training data "
        "(the objective all tuned rows optimised; lower is better); \"ppl\" is perplexity on LAMBADA passages.",
        "",
        table(rows, set(equal)),
        *(["", f"(= base): every figure equals the unquantized base's ({', '.join(equal)}): each reproduces the model's "
               f"weights exactly, because the model already sits on that grid{shipped}."] if equal else []),
        "",
        "## QA-LoRA vs QLoRA w/ GPTQ",
        "",
        *verdicts(rows),
        "",
        "![accuracy vs bits](results.png)",
    ]
    if notes:
        parts += ["", "## What these numbers do and do not show", "", notes.strip()]
    return "\n".join(parts) + "\n"


def write_docs(summary: dict, folder: str | os.PathLike, command: str, notes: str = "") -> list[Path]:
    """``RESULTS.md``, ``results.json`` and ``results.png`` into ``folder`` (each written atomically)."""
    from qalora.io import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, js, png = folder / "RESULTS.md", folder / "results.json", folder / "results.png"
    tmp = folder / ".results.png.tmp.png"
    plot(summary["rows"], tmp)
    os.replace(tmp, png)
    write_json(js, summary)
    tmp_md = folder / ".RESULTS.md.tmp"
    tmp_md.write_text(results_markdown(summary, command, notes))
    os.replace(tmp_md, md)
    return [md, js, png]
