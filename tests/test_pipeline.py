"""qalora pipeline on a tiny Llama: every stage lands, the table is real, reruns resume."""

import json

import pytest

from conftest import tiny_llama, tiny_tokenizer
from qalora.cli import main
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.merging.command import REPORT_FILE
from qalora.stages.pipeline import format_table, pipeline

QA = [("What is two plus two?", "Four."), ("Name a colour.", "Blue."), ("Say hello.", "Hello!")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tiny_llama(0).save_pretrained(root / "fp")
    tiny_tokenizer().save_pretrained(root / "fp")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{q} (#{i})", "input": "", "output": a}) + "\n"
                            for i, (q, a) in enumerate(QA * 4)))
    return root, data


def _configs(data, steps=4, bits=4):
    return dict(quant=QuantConfig(bits=bits, group_size=32, method="rtn"), lora=LoraConfig(rank=4, alpha=8.0),
                train_cfg=TrainConfig(steps=steps, data=str(data), batch_size=4, lr=1e-2, max_seq_len=64,
                                      eval_every=2, save_every=2, eval_batches=1))


def test_pipeline_runs_every_stage_and_resumes(setup, capsys):
    root, data = setup
    out = root / "run"
    s = pipeline(root / "fp", out, **_configs(data), speed_tokens=4, progress=False)
    for sub in ("quantized/qalora.json", "adapter/adapter_config.json", f"merged/{REPORT_FILE}", "model.gguf",
                "pipeline.json"):
        assert (out / sub).is_file(), sub
    assert json.loads((out / "pipeline.json").read_text()) == json.loads(json.dumps(s))
    assert s["bits"] == 4 and s["train_steps"] == 4 and s["gguf_bytes"] == (out / "model.gguf").stat().st_size
    assert s["val_loss_after"] < s["val_loss_before"]                 # lr 1e-2 on 12 repeated examples
    assert s["merge"]["fp64_max_abs_logit_diff"] <= 1e-4
    assert s["merge"]["weights"]["max_weight_err_ulps"] <= 0.5 + 1e-6
    assert s["speed"]["merged_tokens_per_s"] > 0 and s["speed"]["unmerged_tokens_per_s"] > 0
    table = format_table(s)
    assert "INT4 g32 RTN" in table and f"{s['val_loss_before']:.4f}" in table

    mtime = (out / "merged" / "model.safetensors").stat().st_mtime_ns
    again = pipeline(root / "fp", out, **_configs(data), speed_tokens=4, progress=True)
    assert "reusing" in capsys.readouterr().out
    assert (out / "merged" / "model.safetensors").stat().st_mtime_ns == mtime
    assert again["merge"] == s["merge"] and again["val_loss_after"] == s["val_loss_after"]


def test_pipeline_refuses_a_stage_with_another_config(setup):
    root, data = setup
    out = root / "conflict"
    pipeline(root / "fp", out, **_configs(data, steps=2), export=False, speed_tokens=2, progress=False)
    with pytest.raises(QaloraError, match="quantized with"):
        pipeline(root / "fp", out, **_configs(data, steps=2, bits=3), export=False, speed_tokens=2, progress=False)
    with pytest.raises(QaloraError, match="another configuration"):
        pipeline(root / "fp", out, **_configs(data, steps=3), export=False, speed_tokens=2, progress=False)


def test_pipeline_resumes_an_interrupted_training(setup):
    root, data = setup
    out = root / "interrupted"
    cfg = _configs(data, steps=4)
    pipeline(root / "fp", out, **{**cfg, "train_cfg": TrainConfig(**{**cfg["train_cfg"].to_dict(), "steps": 2})},
             export=False, speed_tokens=2, progress=False)
    # simulate a run killed after its step-2 checkpoint: the adapter is not finished yet
    (out / "adapter" / "adapter_config.json").unlink()
    import shutil
    shutil.rmtree(out / "merged")
    run = json.loads((out / "adapter" / "run.json").read_text())
    run["steps"] = 4
    (out / "adapter" / "run.json").write_text(json.dumps(run))
    s = pipeline(root / "fp", out, **cfg, export=False, speed_tokens=2, progress=False)
    metrics = [json.loads(x) for x in (out / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4] and s["train_steps"] == 4


def test_pipeline_bad_input(setup, tmp_path):
    root, data = setup
    with pytest.raises(QaloraError, match="QA-LoRA"):
        pipeline(root / "fp", tmp_path / "x", train_cfg=TrainConfig(method="lora"), progress=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(QaloraError, match="not a folder"):
        pipeline(root / "fp", f, progress=False)
    with pytest.raises(QaloraError, match="parent folder"):
        pipeline(root / "fp", tmp_path / "no" / "such", progress=False)
    assert main(["pipeline", "--model", str(root / "fp"), "--out", str(tmp_path / "y"), "--bits", "5"]) == 2
    assert not (tmp_path / "y" / "quantized").exists()


def test_pipeline_cli(setup, tmp_path, capsys):
    root, data = setup
    rc = main(["pipeline", "--model", str(root / "fp"), "--out", str(tmp_path / "cli"), "--quant-method", "rtn",
               "--bits", "2", "--steps", "2", "--rank", "4", "--data", str(data), "--max-seq-len", "64",
               "--speed-tokens", "2", "--no-export", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "INT2 g32 RTN" in text and "validation loss" in text and "merge error fp64" in text
    assert not (tmp_path / "cli" / "model.gguf").exists()
