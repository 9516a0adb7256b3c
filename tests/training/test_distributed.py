"""Data-parallel training under torchrun (gloo, CPU): the batch plan splits disjointly, a
2-process run equals a 1-process run with the same global batch, and a 2-process run resumes
in 1 process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qalora.checkpoint import save_checkpoint
from qalora.config import QuantConfig
from qalora.quant.model import quantize_model
from qalora.training.distributed import Ranks, micro_seed

QA = [("What is two plus two?", "Four."), ("Name a colour.", "Blue."), ("Say hello.", "Hello there!"),
      ("What do bees make?", "Honey."), ("Opposite of hot?", "Cold."), ("A fruit?", "An apple.")]

# A 2-process step sums the same per-token gradients as one process, in another order (two
# partial sums, then DDP's all-reduce and a ×2/2), so the adapters agree to fp32 rounding
# amplified by a few AdamW steps (Adam divides by sqrt(v), so relative gradient differences of
# ~1e-7 become parameter differences of ~lr·1e-6 per step).
RTOL, ATOL = 1e-4, 1e-5
# One process computes the head + cross entropy in row chunks (training.head_loss); under DDP the
# loss goes through the wrapper's forward, whole logits. Another summation order again: measured
# 2.2e-5 on adapter entries near zero (values up to 0.7) after 2 and 4 steps.
ATOL_ACROSS_LOSS_PATHS = 5e-5
# Steps of the kill-and-resume runs: checkpoints every 2 steps, and room for the kill to land late.
STEPS = 12


@pytest.mark.parametrize("world, accum", [(1, 3), (2, 1), (2, 3), (4, 2)])
def test_each_step_splits_its_micro_batches_disjointly(world, accum):
    for step in range(5):
        parts = [Ranks(r, world).micro_batches(step, accum) for r in range(world)]
        together = sorted(k for p in parts for k in p)
        assert together == list(range(step * world * accum, (step + 1) * world * accum))  # disjoint, complete
        assert together == Ranks().micro_batches(step, world * accum)                   # = one process, W·A


def test_micro_batch_seeds_are_distinct_and_fixed():
    seeds = [micro_seed(0, k) for k in range(1000)] + [micro_seed(1, k) for k in range(1000)]
    assert len(set(seeds)) == len(seeds) and micro_seed(3, 17) == micro_seed(3, 17)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("ddp")
    model, tok = tiny_llama(0), tiny_tokenizer()
    quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(model, tok, root / "q4", {"bits": 4, "group_size": 32, "method": "rtn"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{q} (#{i})", "input": "", "output": a}) + "\n"
                            for i, (q, a) in enumerate(QA * 6)))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(base, out, steps, accum, *extra):
    return ["train", "--model", str(base / "q4"), "--data", str(base / "data.jsonl"), "--out", str(out),
            "--steps", str(steps), "--batch-size", "2", "--grad-accum", str(accum), "--lr", "1e-2",
            "--max-seq-len", "64", "--eval-every", "2", "--save-every", "2", "--eval-batches", "1",
            "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--quiet", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _one(args):
    return subprocess.run([sys.executable, "-m", "qalora", *args], capture_output=True, text=True, env=_env())


def _torchrun(n, args, popen=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "qalora", *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=_env())


def _kill_run(proc, marker: str) -> None:
    """SIGKILL every process of the run: first those with ``marker`` (the run's --out) in their
    command line (the workers, which may sit in their own session, and torchrun), then torchrun's
    process group."""
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _kill_after_first_checkpoint(proc, out, steps: int) -> int:
    """Wait for the run writing ``out`` to finish a checkpoint, kill it, and return the step of
    its latest checkpoint. How many steps a fast machine takes between seeing the checkpoint and
    the kill varies (2 or 4 seen), so any checkpoint before the last step will do; the run must
    not have finished."""
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    _kill_run(proc, str(out))
    time.sleep(1)
    step = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert 2 <= step < steps and not (out / "adapter.safetensors").exists(), step
    return step


def _assert_same_adapter(a_dir, b_dir, atol: float = ATOL):
    a, b = load_file(str(a_dir / "adapter.safetensors")), load_file(str(b_dir / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=atol, msg=k)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)  # it trained


def test_two_processes_equal_one_with_the_same_global_batch(base, tmp_path):
    """2 processes × grad_accum 1 (global 2 micro-batches of 2) vs 1 process × grad_accum 2, with
    dropout on: the same adapter, the same logged losses; files come from process 0 only."""
    one = _one(_args(base, tmp_path / "one", 4, 2))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, _args(base, tmp_path / "two", 4, 1))
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1 and "2 processes" in two.stdout  # one report, from process 0
    _assert_same_adapter(tmp_path / "one", tmp_path / "two", atol=ATOL_ACROSS_LOSS_PATHS)
    losses = [[json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [r["step"] for r in losses[0]] == [r["step"] for r in losses[1]]
    for r1, r2 in zip(*losses):
        for key in ("loss", "val_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4), (r1, r2)
        if "tokens" in r1:
            assert (r1["tokens"], r1["input_tokens"]) == (r2["tokens"], r2["input_tokens"])
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["grad_accum"] == 2 and run["processes"] == 2


def test_two_processes_killed_resume_in_one(base, tmp_path):
    """Kill a 2-process run after its first checkpoint; resume it with 1 process and
    --grad-accum 2 (same global batch): the adapter equals an uninterrupted 1-process run's. A
    resume with another global batch is refused in one line."""
    full = _one(_args(base, tmp_path / "full", STEPS, 2))
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = _torchrun(2, _args(base, killed, STEPS, 1), popen=True)
    _kill_after_first_checkpoint(proc, killed, STEPS)
    wrong = _one(_args(base, killed, STEPS, 1, "--resume"))
    assert wrong.returncode == 2 and "number of micro-batches per step over all processes" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    again = _one(_args(base, killed, STEPS, 2, "--resume"))
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_same_adapter(tmp_path / "full", killed, atol=ATOL_ACROSS_LOSS_PATHS)  # some steps distributed, the rest in one


@pytest.mark.parametrize("method", [["qalora"], ["lota", "--lota-omega", "1"]], ids=["qalora", "lota"])
def test_fsdp2_gives_the_ddp_adapter(base, tmp_path, method):
    """FSDP2 (every parameter sharded over 2 processes, t-SignSGD's quantile over the whole
    gradient) and DDP, same global batch: the same adapter (AdamW parameters within the tolerance
    above; ternary ones equal, as their updates are signs of nearly equal gradients)."""
    runs = {}
    for parallel in ("ddp", "fsdp2"):
        out = tmp_path / parallel
        res = _torchrun(2, _args(base, out, 4, 1, "--parallel", parallel, "--method", *method))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[parallel] = load_file(str(out / "adapter.safetensors"))
    a, b = runs["ddp"], runs["fsdp2"]
    assert a.keys() == b.keys()
    for k in a:
        if "lota_" in k:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k or "lota_B" in k)


def test_fsdp2_checkpoint_resumes_in_one_process(base, tmp_path):
    """An FSDP2 run's checkpoints hold whole tensors: killed after its first checkpoint, it resumes
    in one process (no sharding) and ends equal to an uninterrupted one-process run."""
    full = _one(_args(base, tmp_path / "full", STEPS, 2))
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = _torchrun(2, _args(base, killed, STEPS, 1, "--parallel", "fsdp2"), popen=True)
    _kill_after_first_checkpoint(proc, killed, STEPS)
    again = _one(_args(base, killed, STEPS, 2, "--resume"))
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_same_adapter(tmp_path / "full", killed, atol=ATOL_ACROSS_LOSS_PATHS)  # 2 steps distributed, 4 in one
