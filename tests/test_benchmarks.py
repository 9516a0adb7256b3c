"""The benchmark scripts' self-tests: each runs its CPU smoke mode end to end (their figures are
not asserted: speed lives in benchmarks/, never in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
