"""The command line: bad input gives one line on stderr, exit code 2, no traceback, no output."""

import subprocess
import sys

import pytest

from qalora.cli import build_parser, main


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qalora", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["quantize", "--bits", "5", "--out", "x"], "bits 5 is not supported; use one of 2, 3, 4, 8"),
    (["quantize", "--method", "awq", "--out", "x"], "method 'awq' is unknown"),
    (["quantize", "--model", "no/such/folder", "--out", "x"], "model 'no/such/folder' is not a local folder"),
    (["eval", "--model", "no/such/folder"], "model 'no/such/folder' is not a local folder"),
    (["train", "--out", "a", "--method", "peqa", "--with-qalora"],
     "--with-qalora does not apply to method 'peqa' (its switches: none)"),
    (["train", "--out", "a", "--method", "qalora", "--with-qalora"],
     "--with-qalora does not apply to method 'qalora' (its switches: --train-scales)"),
    (["train", "--out", "a", "--method", "dora"], "method 'dora' is unknown; use one of qalora, peqa, lota, qlora, lora"),
    (["train", "--out", "a", "--method", "lota", "--lota-omega", "0"], "lota_omega 0.0 must be positive"),
    (["train", "--out", "a", "--tsign-start", "0.99", "--tsign-mid", "0.9"], "t-SignSGD quantiles 0.99, 0.9, 0.9999 must rise"),
    (["reproduce", "--cached-only", "--out", "r"], "--cached-only applies to --suite methods and tasks only"),
    (["reproduce", "--suite", "methods", "--grids", "int3", "--out", "r"], "grid 'int3' is not of the form intB-gG"),
    (["reproduce", "--suite", "methods", "--grids", "int5-g32", "--out", "r"], "grid int5-g32 is not one of the methods"),
    (["reproduce", "--tasks", "sst2", "--out", "r"], "--tasks and --task-rows apply to --suite tasks only"),
    (["reproduce", "--docs", "no/such/docs", "--out", "r"], "--docs 'no/such/docs': its parent folder does not exist"),
    (["reproduce", "--suite", "tasks", "--tasks", "nope", "--out", "r"], "task 'nope' is not a tuning task; use: sst2"),
    (["reproduce", "--suite", "tasks", "--task-rows", "dora", "--out", "r"], "task row 'dora' is unknown"),
    (["reproduce", "--paper-rows", "dora", "--out", "r"], "paper row 'dora' is unknown; use: base, lora, qlora"),
    (["reproduce", "--suite", "methods", "--paper-rows", "qalora", "--out", "r"], "--paper-rows applies to --suite paper only"),
    (["reproduce", "--paper-rows", "qalora", "--notes", "n.md", "--out", "r"], "--notes applies to a whole paper report"),
    (["import", "--model", "weights.bin", "--out", "c"], "--model 'weights.bin' is not a .gguf file"),
    (["export", "--model", "c", "--format", "mlx", "--like", "s.gguf", "--out", "o"],
     "--like applies to --format gguf without --fallback"),
    (["merge", "--model", "q", "--adapter", "a", "--out", "m", "--bits", "2"],
     "--bits and --group-size apply with --requantize only"),
    (["merge", "--model", "q", "--adapter", "a", "--out", "m", "--requantize", "gptq", "--tolerance", "1e-3"],
     "--tolerance and --no-noise-floor gate the exact merge"),
])
def test_bad_input_one_line(tmp_path, args, message):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tmp_path):
    (tmp_path / "x").mkdir()
    r = run("quantize", "--method", "rtn", "--out", "x", cwd=tmp_path)
    assert r.returncode == 2 and "output 'x' already exists" in r.stderr and "Traceback" not in r.stderr


def test_reproduce_refuses_a_docs_report_of_another_budget_before_work(tmp_path):
    (tmp_path / "docs").mkdir()
    report = tmp_path / "docs" / "tasks.json"
    report.write_text('{"suite": "tasks", "budget": "smoke", "rows": []}')
    r = run("reproduce", "--suite", "tasks", "--out", "r", "--docs", "docs", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "reports suite 'tasks' at budget 'smoke'" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no work folder, the report untouched
    assert report.read_text() == '{"suite": "tasks", "budget": "smoke", "rows": []}'


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.embedded
def test_import_then_export_like_gives_the_gguf_back_byte_for_byte(tmp_path, capsys):
    from qalora.default_model import gguf_path

    src = gguf_path()
    assert main(["import", "--model", str(src), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert main(["export", "--model", str(tmp_path / "c"), "--like", str(src), "--out", str(tmp_path / "b.gguf")]) == 0
    assert "0 tensors re-encoded" in capsys.readouterr().out
    assert (tmp_path / "b.gguf").read_bytes() == src.read_bytes()
    # never over an existing file
    assert main(["export", "--model", str(tmp_path / "c"), "--like", str(src), "--out", str(tmp_path / "b.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_an_unreadable_model_config_is_refused_in_one_short_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", "hidden_size": ' + "1" * 400)
    assert main(["quantize", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not read a model config from" in err and len(err) < 260, err
    assert not (tmp_path / "q").exists()


def test_cli_defaults_come_from_the_dataclass():
    from qalora.config import QuantConfig

    args = build_parser().parse_args(["quantize", "--out", "x"])
    d = QuantConfig()
    assert (args.bits, args.group_size, args.method, args.calib_samples, tuple(args.skip), args.true_sequential) == \
        (d.bits, d.group_size, d.method, d.calib_samples, d.skip, d.true_sequential)


@pytest.mark.parametrize("command", ["quantize", "train", "merge", "export", "pipeline", "reproduce", "eval", "generate"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0 and f"usage: qalora {command}" in capsys.readouterr().out


def test_help_imports_nothing_heavy():
    """``qalora --help`` and every subcommand's help build their options from the configs without
    importing torch or transformers (one fresh interpreter for all, so nothing is cached)."""
    code = ("import sys, qalora.cli as c\n"
            "for cmd in ([], ['quantize'], ['train'], ['merge'], ['export'], ['pipeline'], ['reproduce'], ['eval'],"
            " ['generate']):\n"
            "    try:\n        c.main([*cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'gguf', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_kernel_names_are_the_registry_kernels():
    from qalora.kernels.names import KERNEL_CHOICES
    from qalora.kernels.registry import KERNELS

    assert KERNEL_CHOICES == ("auto", *(k.name for k in KERNELS))


def test_generated_options_read_their_dataclasses():
    from qalora.config import LoraConfig, PipelineConfig, TrainConfig
    from qalora.eval.evaluate import EvalOptions

    p = build_parser()
    pl = p.parse_args(["pipeline"])
    d = PipelineConfig()
    assert (pl.bits, pl.steps, pl.group_size, pl.quant_method, pl.export, pl.speed_tokens) == \
        (d.bits, d.steps, d.group_size, d.quant_method, d.export, d.speed_tokens)
    assert PipelineConfig().train_config().steps == d.steps and PipelineConfig().lora_config().rank == LoraConfig.rank
    t = p.parse_args(["train", "--out", "a"])
    assert (t.method, t.train_scales, t.with_qalora, t.lota_omega, t.tsign_start) == \
        (TrainConfig.method, False, False, None, TrainConfig.tsign_start)
    ev = p.parse_args(["eval"])
    assert (ev.limit, ev.shots, ev.windows) == (EvalOptions.limit, EvalOptions.shots, EvalOptions.windows)
