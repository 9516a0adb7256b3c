"""The task suite's plot: held-out accuracy vs bits per method, one panel per task (PNG).

x: the suite's grids in order of bits (INT2 g32, INT3 g32, INT4 g64); y: the task's reported
metric in % with its standard error as an error bar. Rows without a grid (base, LoRA, QLoRA:
16-bit) are horizontal lines, so a method's distance from 16-bit LoRA is what its quantized
merge kept of the tuning.
"""

from __future__ import annotations

import os
from pathlib import Path

from qalora.io import atomic_file
from qalora.reproduce.tasks import TASK_ROWS

# (marker and line, colour) per quantized row: the same in every panel.
STYLES = {"gptq": ("x-.", "tab:gray"), "qlora+rtn": ("^:", "tab:orange"), "qlora+gptq": ("s--", "tab:olive"),
          "qalora": ("o-", "tab:red"), "qalora+scales": ("D-", "tab:purple"), "peqa": ("v-", "tab:brown"),
          "lota": ("P-", "tab:pink"), "lota+qalora": ("X-", "tab:blue")}
FLAT = {"base": "k", "lora": "tab:green", "qlora": "tab:cyan"}


def plot_points(rows: list[dict], task: str, name: str) -> list[tuple[int, float, float]]:
    """``[(bits, value %, stderr %)]`` of ``task``'s row ``name`` at every grid it was scored on, by bits."""
    out = []
    for r in rows:
        if r["task"] == task and r["row"] == name and r.get("bits"):
            est = r[r["reported"]]
            out.append((r["bits"], 100 * est["value"], 100 * (est.get("stderr") or 0.0)))
    return sorted(out)


def draw_tasks(summary: dict):
    """The figure of ``summary`` (a tasks report: ``tasks``, ``rows``): one panel per task on one x
    axis (every grid of the report), one colour and marker per row throughout, and one legend
    beside the panels naming every row drawn in any of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, tasks = summary["rows"], [t for t in summary["tasks"] if any(r["task"] == t for r in summary["rows"])]
    labels = {r.name: r.label for r in TASK_ROWS}
    grids = sorted({(r["bits"], r["group_size"]) for r in rows if r.get("bits")})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4.4), squeeze=False)
    legend: dict = {}
    for ax, task in zip(axes[0], tasks):
        for name, (style, colour) in STYLES.items():
            pts = plot_points(rows, task, name)
            if pts:
                ax.errorbar([b for b, _, _ in pts], [v for _, v, _ in pts], yerr=[e for _, _, e in pts],
                            fmt=style, color=colour, capsize=3, label=labels[name])
        for r in rows:
            if r["task"] == task and r["row"] in FLAT:
                ax.axhline(100 * r[r["reported"]]["value"], color=FLAT[r["row"]], lw=0.8, ls="--",
                           label=labels[r["row"]])
        if grids:
            ax.set_xticks([b for b, _ in grids], [f"INT{b} g{g}" for b, g in grids])
            ax.set_xlim(grids[0][0] - 0.3, grids[-1][0] + 0.3)
        reported = next(r["reported"] for r in rows if r["task"] == task)
        ax.set_ylabel(f"held-out {reported}, %")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        legend.update({label: h for h, label in zip(*ax.get_legend_handles_labels()) if label not in legend})
    order = [labels[n] for n in (*FLAT, *STYLES) if labels[n] in legend]
    axes[0][-1].legend([legend[k] for k in order], order, fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.01, 1.0))  # beside the panels, not over them
    fig.tight_layout()
    return fig


def plot_tasks(summary: dict, path: str | os.PathLike) -> None:
    """Write :func:`draw_tasks` of ``summary`` to ``path`` (PNG) atomically."""
    import matplotlib.pyplot as plt

    fig = draw_tasks(summary)
    try:
        with atomic_file(Path(path)) as tmp:
            fig.savefig(str(tmp), format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
