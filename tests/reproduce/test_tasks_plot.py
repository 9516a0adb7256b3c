from qalora.reproduce.tasks_plot import plot_points, plot_tasks
from qalora.reproduce.tasks_report import tasks_markdown


def _row(row, bits=None, group=None, value=0.5, task="sst2"):
    return {"id": f"{task}-{row}", "task": task, "row": row, "label": row, "method": None if row == "base" else row,
            "bits": bits, "group_size": group, "reported": "acc", "acc": {"value": value, "stderr": 0.025, "n": 400},
            "per_item": {"index": list(range(4)), "acc": [1, 0, 1, 0]}}


def _summary():
    rows = [_row("base", value=0.585), _row("lora", value=0.87),
            _row("qalora", 4, 64, 0.84), _row("qalora", 2, 32, 0.61), _row("qalora", 3, 32, 0.79),
            _row("qlora+gptq", 3, 32, 0.75), _row("qalora", 3, 32, 0.4, task="arithmetic")]
    return {"tasks": ["sst2", "arithmetic", "boolq"], "rows": rows, "comparisons": [], "seconds_this_call": 0.0,
            "machine": {"processor": "x86_64", "cpus": 2, "torch": "2.13.0+cpu"}}


def test_plot_points_are_the_rows_in_percent_by_bits():
    rows = _summary()["rows"]
    assert plot_points(rows, "sst2", "qalora") == [(2, 61.0, 2.5), (3, 79.0, 2.5), (4, 84.0, 2.5)]
    assert plot_points(rows, "arithmetic", "qalora") == [(3, 40.0, 2.5)]
    assert plot_points(rows, "sst2", "lora") == []          # 16-bit rows are lines, not points
    assert plot_points(rows, "sst2", "peqa") == []


def test_plot_is_a_png_written_in_place(tmp_path):
    path = tmp_path / "results_tasks.png"
    path.write_bytes(b"old")
    plot_tasks(_summary(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(path.read_bytes()) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results_tasks.png"]   # no temporary left


def test_markdown_shows_the_plot_only_when_written():
    s = _summary()
    assert "![held-out accuracy vs bits per method](results_tasks.png)" in tasks_markdown(s, "c", plot="results_tasks.png")
    assert "![" not in tasks_markdown(s, "c")


def test_one_legend_names_every_row_of_every_panel_with_one_colour_each():
    """The legend sits by the last panel but names the rows of all panels (the last task may have
    only its 16-bit rows so far); a row keeps its colour across panels; panels share the x range."""
    import matplotlib.pyplot as plt

    from qalora.reproduce.tasks_plot import draw_tasks

    s = _summary()
    s["rows"] = [r for r in s["rows"] if r["task"] == "sst2"] + [_row("base", value=0.3, task="arithmetic"),
                                                                 _row("qalora", 3, 32, 0.4, task="arithmetic")]
    fig = draw_tasks(s)
    try:
        sst2, arith = fig.axes[:2]
        texts = [t.get_text() for t in arith.get_legend().get_texts()]
        assert texts == ["base (16-bit, untuned)", "LoRA (16-bit)", "QLoRA w/ GPTQ (lossy)", "QA-LoRA"]
        colour = {ax: {c.get_label(): c.lines[0].get_color() for c in ax.containers} for ax in (sst2, arith)}
        assert colour[sst2]["QA-LoRA"] == colour[arith]["QA-LoRA"] != colour[sst2]["QLoRA w/ GPTQ (lossy)"]
        assert sst2.get_xlim() == arith.get_xlim() == (1.7, 4.3)
    finally:
        plt.close(fig)
