"""qalora pipeline on a tiny Llama: every stage lands, the table is real, reruns resume."""

import json

import pytest

from conftest import tiny_llama, tiny_tokenizer
from qalora.cli import main
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.io import sha256_file
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
    s = pipeline(root / "fp", out, **_configs(data), export="gguf,mlx", speed_tokens=4, progress=False)
    for sub in ("quantized/qalora.json", "adapter/adapter_config.json", f"merged/{REPORT_FILE}", "model.gguf",
                "model-mlx/config.json", "model-mlx/model.safetensors", "model-mlx.json", "pipeline.json"):
        assert (out / sub).is_file(), sub
    assert json.loads((out / "pipeline.json").read_text()) == json.loads(json.dumps(s))
    assert s["bits"] == 4 and s["train_steps"] == 4 and s["gguf_bytes"] == (out / "model.gguf").stat().st_size
    mlx_files = sorted(p for p in (out / "model-mlx").rglob("*") if p.is_file())
    assert s["mlx_bytes"] == sum(p.stat().st_size for p in mlx_files)
    record = json.loads((out / "model-mlx.json").read_text())
    assert record["options"] == {"dtype": "float16"} and record["files"] == {
        str(p.relative_to(out / "model-mlx")): sha256_file(p) for p in mlx_files}
    assert s["val_loss_after"] < s["val_loss_before"]                 # lr 1e-2 on 12 repeated examples
    assert s["merge"]["fp64_max_abs_logit_diff"] <= 1e-4
    assert s["merge"]["weights"]["max_weight_err_ulps"] <= 0.5 + 1e-6
    assert s["speed"]["merged_tokens_per_s"] > 0 and s["speed"]["unmerged_tokens_per_s"] > 0
    table = format_table(s)
    assert "INT4 g32 RTN" in table and f"{s['val_loss_before']:.4f}" in table

    mtime = (out / "merged" / "model.safetensors").stat().st_mtime_ns
    again = pipeline(root / "fp", out, **_configs(data), export="gguf,mlx", speed_tokens=4, progress=True)
    assert "reusing" in capsys.readouterr().out
    assert (out / "merged" / "model.safetensors").stat().st_mtime_ns == mtime
    assert again["merge"] == s["merge"] and again["val_loss_after"] == s["val_loss_after"]
    assert again["mlx_bytes"] == s["mlx_bytes"] and again["exports"] == s["exports"]

    cfg = out / "model-mlx" / "config.json"
    kept = cfg.read_bytes()
    cfg.write_bytes(kept + b" ")
    with pytest.raises(QaloraError, match=r"model-mlx' differs from the files that were exported \(sha256 in "
                                          r"model-mlx.json\); it was edited or truncated"):
        pipeline(root / "fp", out, **_configs(data), export="mlx", speed_tokens=4, progress=False)
    cfg.write_bytes(kept)


@pytest.mark.parametrize("value, formats", [("gguf", ("gguf",)), ("gguf,mlx", ("gguf", "mlx")), (" mlx , gguf", ("mlx", "gguf")),
                                            ("none", ()), ("", ()), (False, ()), (True, ("gguf",)), (("mlx",), ("mlx",))])
def test_export_formats_parse(value, formats):
    from qalora.stages.export import parse_formats

    assert parse_formats(value) == formats


def test_pipeline_refuses_an_unknown_export_before_any_work(setup, tmp_path, capsys):
    root, data = setup
    out = tmp_path / "never"
    with pytest.raises(QaloraError, match=r"export format 'onnx' is unknown; use a comma-separated list of gguf, mlx, or none"):
        pipeline(root / "fp", out, **_configs(data, steps=2), export="gguf,onnx", progress=False)
    assert main(["pipeline", "--model", str(root / "fp"), "--out", str(out), "--export", "tflite"]) == 2
    assert "export format 'tflite' is unknown" in capsys.readouterr().err
    assert not out.exists()


def test_pipeline_refuses_a_stage_with_another_config(setup):
    root, data = setup
    out = root / "conflict"
    pipeline(root / "fp", out, **_configs(data, steps=2), export=False, speed_tokens=2, progress=False)
    with pytest.raises(QaloraError, match=r"quantized model made with another quant_config \(bits\): 4, this run: 3"):
        pipeline(root / "fp", out, **_configs(data, steps=2, bits=3), export=False, speed_tokens=2, progress=False)
    with pytest.raises(QaloraError, match=r"adapter made with another train_config \(steps\): 2, this run: 3"):
        pipeline(root / "fp", out, **_configs(data, steps=3), export=False, speed_tokens=2, progress=False)


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pipeline_refuses_another_model_or_a_changed_export(setup, tmp_path):
    """A rerun into the same --out with another --model, a GGUF file edited after export, a GGUF
    without its record or recorded from another merge, or a merge of another adapter: each is
    refused with one line, and nothing under --out changes."""
    root, data = setup
    out = root / "identity"
    pipeline(root / "fp", out, **_configs(data, steps=2), speed_tokens=2, progress=False)
    record = json.loads((out / "model.gguf.json").read_text())
    assert record["gguf_sha256"] == sha256_file(out / "model.gguf") and record["options"] == {"float_type": "f16",
                                                                                             "fallback": None}
    assert record["checkpoint_sha256"] == json.loads((out / "merged" / "qalora.json").read_text())["sha256"][
        "model.safetensors"]
    other = tmp_path / "fp-other"
    tiny_llama(1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    before = _tree(out)

    def refused(match, model=root / "fp"):
        with pytest.raises(QaloraError, match=match):
            pipeline(model, out, **_configs(data, steps=2), speed_tokens=2, progress=False)

    refused(r"quantized model made with another source model: [0-9a-f]{12}…, this run: [0-9a-f]{12}…; choose", other)
    assert main(["pipeline", "--model", str(other), "--out", str(out), "--steps", "2"]) == 2
    assert _tree(out) == before

    gguf = out / "model.gguf"
    gguf.write_bytes(before["model.gguf"][:-1] + bytes([before["model.gguf"][-1] ^ 1]))
    refused("differs from the file that was exported .*; it was edited or truncated; delete it")
    gguf.write_bytes(before["model.gguf"])
    (out / "model.gguf.json").write_text(json.dumps({**record, "checkpoint_sha256": "0" * 64}))
    refused("GGUF export made with another checkpoint: 000000000000…")
    (out / "model.gguf.json").unlink()
    refused("GGUF export without a record of its inputs; delete it or choose another --out")
    (out / "model.gguf.json").write_bytes(before["model.gguf.json"])

    report = json.loads((out / "merged" / REPORT_FILE).read_text())
    (out / "merged" / REPORT_FILE).write_text(json.dumps({**report, "adapter_sha256": "1" * 64}))
    refused("merged model made with another adapter: 111111111111…")
    (out / "merged" / REPORT_FILE).write_text(json.dumps({k: v for k, v in report.items() if k != "base_sha256"}))
    refused("merged model with no recorded base checkpoint; it cannot be checked")
    (out / "merged" / REPORT_FILE).write_bytes(before[f"merged/{REPORT_FILE}"])
    assert _tree(out) == before
    again = pipeline(root / "fp", out, **_configs(data, steps=2), speed_tokens=2, progress=False)
    assert again["adapter_sha256"] == report["adapter_sha256"] and again["base_sha256"] == report["base_sha256"]


def test_train_resume_refuses_another_base(setup, tmp_path):
    """``qalora train --resume`` of a run begun on one base, pointed at another, is refused."""
    from qalora.api import quantize
    from qalora.training.loop import train

    root, data = setup
    cfg = _configs(data, steps=2)
    for bits in (4, 3):
        quantize(root / "fp", tmp_path / f"q{bits}", QuantConfig(bits=bits, group_size=32, method="rtn"), progress=False)
    train(tmp_path / "q4", tmp_path / "a", cfg["train_cfg"], cfg["lora"], progress=False)
    (tmp_path / "a" / "adapter_config.json").unlink()
    more = TrainConfig(**{**cfg["train_cfg"].to_dict(), "steps": 4})
    with pytest.raises(QaloraError, match="that run used a different base checkpoint"):
        train(tmp_path / "q3", tmp_path / "a", more, cfg["lora"], resume=True, progress=False)


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
               "--speed-tokens", "2", "--export", "none", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "INT2 g32 RTN" in text and "validation loss" in text and "merge error fp64" in text
    assert not (tmp_path / "cli" / "model.gguf").exists()


def test_pipeline_hashes_and_reads_each_file_once(setup, monkeypatch):
    """One run: every file hashed once (when written, or when first read), each checkpoint and
    adapter file read from disk once, and the tokenizer loaded for the source model and once for
    the checkpoints (quantized and merged hold the same tokenizer files)."""
    import re

    import safetensors.torch
    import transformers

    import qalora.adapters.format as fmt
    import qalora.checkpoint as ck
    import qalora.io as qio
    import qalora.stages.export as st_export

    root, data = setup
    hashed, read, tokenizers = [], [], []

    def final(p):  # the path a staged file is renamed to
        return re.sub(r"\.([\w-]+)\.tmp-[^/]+", r"\1", str(p)).replace(".adapter.safetensors.tmp", "adapter.safetensors")

    real_sha, real_load = qio.sha256_file, safetensors.torch.load_file
    for mod in (qio, ck, fmt, st_export):
        monkeypatch.setattr(mod, "sha256_file", lambda p, *a: hashed.append(final(p)) or real_sha(p, *a))
    for mod in (ck, fmt):
        monkeypatch.setattr(mod, "load_file", lambda p, *a, **k: read.append(str(p)) or real_load(p, *a, **k))
    real_tok = transformers.AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, p, *a, **k: tokenizers.append(str(p)) or real_tok(cls, p, *a, **k)))
    out = root / "once"
    pipeline(root / "fp", out, **_configs(data, steps=2), export="gguf", speed_tokens=2, progress=False)
    assert len(hashed) == len(set(hashed)), sorted(p for p in hashed if hashed.count(p) > 1)
    for f in ("quantized/model.safetensors", "merged/model.safetensors", "adapter/adapter.safetensors", "model.gguf"):
        assert str(out / f) in hashed, f
    assert sorted(read) == sorted(str(out / f) for f in ("quantized/model.safetensors", "merged/model.safetensors",
                                                          "adapter/adapter.safetensors"))
    assert sorted(tokenizers) == sorted([str(root / "fp"), str(out / "quantized")])
