"""The benchmark scripts' self-tests: each runs its CPU smoke mode end to end (their figures are
not asserted: speed lives in benchmarks/, never in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import benchmark_module

ROOT = Path(__file__).resolve().parent.parent


def _run(args, tmp_path, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=timeout)


def test_cuda_check_cpu_self_test(tmp_path):
    """``cuda_check.py --device cpu --quick``: every section runs (CUDA-only figures reported as
    skipped, with the reason), no case fails, the JSON lists them; ``--device cuda`` without CUDA
    is refused in one line, exit 2."""
    out = tmp_path / "cuda_check.json"
    res = _run([str(ROOT / "benchmarks" / "cuda_check.py"), "--device", "cpu", "--quick", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " 0 FAILED" in res.stdout
    data = json.loads(out.read_text())
    sections = {r["section"] for r in data["rows"]}
    assert sections == {"kernels", "train", "gptq", "merge", "decode"}
    assert "skipped (no CUDA)" in res.stdout
    import torch

    if not torch.cuda.is_available():
        refused = _run([str(ROOT / "benchmarks" / "cuda_check.py"), "--device", "cuda"], tmp_path)
        assert refused.returncode == 2 and len(refused.stdout.strip().splitlines() + refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_scale_small_shape_runs_every_stage(tmp_path):
    """``scale.py --shape small``: build, quantize (RTN, GPTQ), train (QA-LoRA, QLoRA), merge,
    export (GGUF, MLX), each in its own process, every stage ok."""
    out = tmp_path / "scale.json"
    res = _run([str(ROOT / "benchmarks" / "scale.py"), "--shape", "small", "--work", str(tmp_path / "w"),
                "--out", str(out)], tmp_path, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows), rows


def _fake_checkpoint(folder: Path, sha: str) -> None:
    folder.mkdir()
    (folder / "qalora.json").write_text(json.dumps({"sha256": {"model.safetensors": sha}}))


@pytest.mark.parametrize("same", [True, False])
def test_scale_remeasure_keeps_downstream_only_when_bit_identical(tmp_path, same):
    scale = benchmark_module("scale")
    out, previous = tmp_path / "q4", tmp_path / "q4.previous"
    _fake_checkpoint(previous, "a" * 64)
    _fake_checkpoint(out, "a" * 64 if same else "b" * 64)
    old = {"seconds": 700.0, "peak_rss_bytes": 7, "finished": 123.0, "command": "old"}
    rec, keep = scale.compare_previous({"stage": "quantize-gptq", "status": "ok", "finished": 999.0}, old, out,
                                       previous)
    assert keep is same and rec["identical_to_previous"] is same
    assert rec["finished"] == (123.0 if same else 999.0)
    assert rec["previous"]["seconds"] == 700.0 and not previous.exists() and out.is_dir()


def test_scale_remeasure_failure_restores_previous_output(tmp_path):
    scale = benchmark_module("scale")
    out, previous = tmp_path / "q4", tmp_path / "q4.previous"
    _fake_checkpoint(previous, "a" * 64)
    out.mkdir()  # the failed run's partial output
    rec, keep = scale.compare_previous({"stage": "quantize-rtn", "status": "failed"}, {}, out, previous)
    assert not keep and rec["status"] == "failed"
    assert scale.checkpoint_sha(out) == "a" * 64 and not previous.exists()


def test_scale_model_counts_match_the_built_shapes():
    """The extrapolation's parameter counts are scale.py's (and SmolLM2-135M's 134,515,008)."""
    scale, scale_model = benchmark_module("scale"), benchmark_module("scale_model")
    for key, shape in scale_model.MEASURED.items():
        assert shape.parameters == scale.parameter_count(key, shape.vocab)
    assert scale_model.MEASURED["smollm2"].parameters == 134_515_008
    llama7 = scale_model.TARGETS[0]
    assert llama7.parameters == 6_738_415_616  # Llama-2-7B's published count
    assert scale_model.packed_bytes(llama7, 4, 32) == llama7.weights * 0.75


def test_scale_output_sha_of_an_adapter_folder(tmp_path):
    import hashlib

    scale = benchmark_module("scale")
    (tmp_path / "adapter.safetensors").write_bytes(b"weights")
    assert scale.checkpoint_sha(tmp_path) == hashlib.sha256(b"weights").hexdigest()
    assert scale.checkpoint_sha(tmp_path / "missing") is None


def test_decode_equality_first_difference():
    first_difference = benchmark_module("decode_equality").first_difference
    import torch

    a = torch.tensor([5, 6, 7, 8])
    assert first_difference(a, a.clone()) is None
    assert first_difference(a, torch.tensor([5, 6, 9, 8])) == 2
    assert first_difference(a, torch.tensor([9, 6, 7, 8])) == 0
    assert first_difference(a, a[:3]) == 3            # one stopped early: they part where it stopped


def test_adapter_export_nudges_every_offset_by_one_fp16_ulp(tiny_model, tiny_tok, tmp_path):
    """``nudge_offsets``: every nonzero Q4_1 ``m`` one fp16 ulp away, ``d``, codes, the other
    tensors and the source file unchanged."""
    import gguf
    import numpy as np

    from qalora.checkpoint import save_checkpoint
    from qalora.config import QuantConfig
    from qalora.export.gguf import export_gguf
    from qalora.quant.model import quantize_model

    quantize_model(tiny_model, QuantConfig(bits=3, group_size=32, method="rtn", skip=("lm_head",)), progress=False)
    save_checkpoint(tiny_model, tiny_tok, tmp_path / "ckpt", {"source_model": "tiny"})
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", progress=False)
    before = (tmp_path / "m.gguf").read_bytes()
    moved = benchmark_module("adapter_export_check").nudge_offsets(tmp_path / "m.gguf", tmp_path / "n.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == before
    a = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    b = {t.name: t for t in gguf.GGUFReader(tmp_path / "n.gguf").tensors}
    counted = 0
    for name, t in a.items():
        x, y = np.asarray(t.data), np.asarray(b[name].data)
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            assert np.array_equal(x, y), name
            continue
        x, y = x.reshape(-1, 20), y.reshape(-1, 20)
        assert np.array_equal(x[:, :2], y[:, :2]) and np.array_equal(x[:, 4:], y[:, 4:])   # d and codes
        mx = x[:, 2:4].copy().view(np.uint16)[:, 0].astype(np.int64)
        my = y[:, 2:4].copy().view(np.uint16)[:, 0].astype(np.int64)
        zero = (mx & 0x7FFF) == 0
        assert np.array_equal(mx[zero], my[zero]) and np.all(np.abs(mx - my)[~zero] == 1)
        ratio = y[:, 2:4].copy().view(np.float16)[~zero, 0].astype(np.float64) / x[:, 2:4].copy().view(np.float16)[~zero, 0]
        assert np.all(np.abs(ratio - 1) <= 2.0 ** -10)               # one ulp, same sign
        counted += int((~zero).sum())
    assert moved == counted > 0
