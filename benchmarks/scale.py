"""Every qalora stage on a random-weight model of TinyLlama-1.1B's shape, each stage in its own
process through the CLI, with its wall time, peak RSS and output size.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --shape small --work /tmp/scale-small --out /tmp/scale-small.json
    python benchmarks/scale.py --shape tinyllama --work /work/runs/scale-tinyllama      # the long job

Stages, in order (``--stages`` picks some; each needs the outputs of the ones it names):

    build          the random-weight HF folder ``fp/`` (this script, in its own process)
    quantize-rtn   qalora quantize --model fp --bits 4 --group-size 32 --method rtn             -> q4-rtn/
    quantize-gptq  qalora quantize --model fp --bits 4 --group-size 32 --method gptq --calib-samples 8 -> q4-gptq/
    train-qalora   qalora train --model q4-gptq --method qalora --steps 3 --batch-size 1 --max-seq-len 128
    train-qlora    qalora train --model fp --method qlora (same options; qalora's own NF4, no bitsandbytes)
    merge          qalora merge --model q4-gptq --adapter adapter-qalora    (exact, verified, default gates)
    export-gguf    qalora export --model merged --format gguf --out model.gguf
    export-mlx     qalora export --model merged --format mlx --out model-mlx

**The model.** ``--shape tinyllama`` is TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632,
32 heads / 4 KV heads, head dim 64, untied embeddings, 2048 positions, rope_theta 10000, RMSNorm
eps 1e-5) with one change: the vocabulary. qalora needs a tokenizer (training data, chat template,
the merge's prompts, the GGUF/MLX vocab) and nothing may be downloaded, so the folder ships the
embedded SmolLM2 tokenizer (copied from the converted default model, ``qalora.default_model``)
and ``vocab_size`` is that tokenizer's length, 49,152, instead of TinyLlama's 32,000: a config
with 32,000 rows would index past its embedding on any SmolLM2 token id above 31,999. That adds
2 x 17,152 x 2048 = 70.3 M parameters (embedding and untied head): 1.170 B instead of 1.100 B.
``--shape smollm2`` is the embedded SmolLM2-135M's shape (hidden 576, 30 layers, MLP 1536, 9 heads /
3 KV heads, tied embeddings; 134.5 M parameters): the 135M row of ``docs/SCALE.md``, measured the
same way. ``--shape small`` is hidden 256, 4 layers, MLP 704 (2048:5632 kept), 4 heads / 2 KV heads (head
dim 64), same vocabulary: a quick run of every stage. Weights are transformers' default random
init (normal, std 0.02; seed 0), saved as **bf16** safetensors: that is how TinyLlama ships
(2.2 GB), it halves the disk and the build's memory, and qalora loads every full-precision folder
in fp32 whatever its dtype (``load_fp_model``), so the stages see what they would see on the
real checkpoint. Random weights make the losses meaningless; only time, memory and size count.

**What is measured.** Each stage runs as ``python -c WRAPPER ...``, where the wrapper imports the
modules the command itself imports (torch, transformers with the Llama model, the command's
qalora modules), records the process's RSS at that point (``VmRSS``: the *baseline*), then runs
``runpy.run_module("qalora", run_name="__main__")`` with the stage's arguments, which is exactly
``python -m qalora ...``. Wall seconds are the parent's clock around the child; peak RSS is
``/usr/bin/time -v``'s "Maximum resident set size" of the child, or, without ``/usr/bin/time``, the
child's own ``getrusage(RUSAGE_SELF).ru_maxrss`` written as it exits (``RUSAGE_CHILDREN`` is a
running maximum over every child so far, so it is used only when the child could not report).
``peak - baseline`` is what the stage itself allocated beyond the interpreter and its libraries:
the column to read against the weight sizes (fp32 weights of the 1.17 B model: 4.68 GB).

**Resuming.** ``--work DIR`` holds every stage's output, its log (``logs/<stage>.log``) and the
measurements (``scale-measurements.json``). A stage whose complete output exists is skipped and
its recorded measurement reused; an incomplete output (a killed run), or one made before an input
stage was run again, is deleted and the stage run again. A work folder built for another shape is refused. Prints one table and writes ``--out``
(default ``benchmarks/results/scale-<shape>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MEASUREMENTS = "scale-measurements.json"
TIME = "/usr/bin/time"

# Only the fields that differ between the shapes; the rest is in ``model_config``.
SHAPES = {
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4),
    "small": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, num_attention_heads=4,
                  num_key_value_heads=2),
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True),
}

TRAIN = ["--steps", "3", "--batch-size", "1", "--max-seq-len", "128"]
LLAMA = "transformers.models.llama.modeling_llama"

# The child: import what the command imports, record RSS, then be ``python -m qalora`` (or run
# this script's build). argv: record file, JSON list of modules, target ("qalora" or a path), args...
WRAPPER = textwrap.dedent("""
    import importlib, json, os, resource, runpy, sys, time
    record, modules, target, args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:]
    def rss_kb(key):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    def write(**kw):
        found = json.load(open(record)) if os.path.exists(record) else {}
        found.update(kw)
        with open(record, "w") as f:
            json.dump(found, f)
    t0 = time.perf_counter()
    from qalora.quiet import import_transformers
    import_transformers()
    for m in modules:
        importlib.import_module(m)
    write(baseline_rss_kb=rss_kb("VmRSS"), import_seconds=time.perf_counter() - t0)
    try:
        if target == "qalora":
            sys.argv = [sys.argv[0]] + args
            runpy.run_module("qalora", run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target] + args
            runpy.run_path(target, run_name="__main__")
    finally:
        write(self_peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm_kb=rss_kb("VmHWM"))
""")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its output (relative to the work folder), the stages whose outputs it reads,
    the modules its command imports (the baseline), and its command line (paths relative too)."""

    name: str
    output: str
    needs: tuple[str, ...]
    modules: tuple[str, ...]
    argv: tuple[str, ...]
    done_file: str | None = None  # inside ``output``: present only when the stage finished

    def command(self, work: Path) -> list[str]:
        return [str(work / a[1:]) if a.startswith("@") else a for a in self.argv]


STAGES = [
    Stage("build", "fp", (), (LLAMA, "qalora.default_model", "safetensors.torch"),
          ("--build-into", "@fp"), "model.safetensors"),
    Stage("quantize-rtn", "q4-rtn", ("build",), (LLAMA, "qalora.api", "qalora.config"),
          ("quantize", "--model", "@fp", "--out", "@q4-rtn", "--bits", "4", "--group-size", "32", "--method", "rtn")),
    Stage("quantize-gptq", "q4-gptq", ("build",), (LLAMA, "qalora.api", "qalora.config", "qalora.data.text"),
          ("quantize", "--model", "@fp", "--out", "@q4-gptq", "--bits", "4", "--group-size", "32", "--method", "gptq",
           "--calib-samples", "8")),
    Stage("train-qalora", "adapter-qalora", ("quantize-gptq",),
          (LLAMA, "qalora.config", "qalora.training.loop", "qalora.training.distributed"),
          ("train", "--model", "@q4-gptq", "--out", "@adapter-qalora", "--method", "qalora", *TRAIN),
          "adapter_config.json"),
    Stage("train-qlora", "adapter-qlora", ("build",),
          (LLAMA, "qalora.config", "qalora.training.loop", "qalora.training.distributed"),
          ("train", "--model", "@fp", "--out", "@adapter-qlora", "--method", "qlora", *TRAIN), "adapter_config.json"),
    Stage("merge", "merged", ("quantize-gptq", "train-qalora"), (LLAMA, "qalora.merging.command"),
          ("merge", "--model", "@q4-gptq", "--adapter", "@adapter-qalora", "--out", "@merged"), "merge_report.json"),
    Stage("export-gguf", "model.gguf", ("merge",), (LLAMA, "qalora.export.command", "qalora.export.gguf"),
          ("export", "--model", "@merged", "--format", "gguf", "--out", "@model.gguf")),
    Stage("export-mlx", "model-mlx", ("merge",), (LLAMA, "qalora.export.command", "qalora.export.mlx"),
          ("export", "--model", "@merged", "--format", "mlx", "--out", "@model-mlx")),
]
BY_NAME = {s.name: s for s in STAGES}


def model_config(shape: str, tokenizer):
    """The ``LlamaConfig`` of ``shape``, its vocabulary the shipped tokenizer's."""
    from transformers import LlamaConfig

    dims = dict(SHAPES[shape])
    tied = dims.pop("tie_word_embeddings", False)
    return LlamaConfig(**dims, head_dim=dims["hidden_size"] // dims["num_attention_heads"], vocab_size=len(tokenizer),
                       tie_word_embeddings=tied, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="silu",
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)


def parameter_count(shape: str, vocab: int) -> int:
    """Weights of the model (no biases in Llama): embeddings, head unless tied, layers, norms."""
    d = SHAPES[shape]
    heads = 1 if d.get("tie_word_embeddings") else 2
    h, i, layers = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    kv = d["num_key_value_heads"] * (h // d["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return heads * vocab * h + layers * per_layer + h


def build_model(folder: Path, shape: str) -> None:
    """Write the random-weight bf16 HF folder of ``shape`` (with the embedded SmolLM2 tokenizer)
    to ``folder``, through a staging folder renamed at the end."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from qalora.default_model import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    config = model_config(shape, tok)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    print(f"built {folder}: {shape} Llama, {n:,} parameters, bf16, vocab {config.vocab_size}, "
          f"{time.perf_counter() - t0:.0f} s")


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def complete(stage: Stage, work: Path) -> bool:
    out = work / stage.output
    return out.exists() and (stage.done_file is None or (out / stage.done_file).is_file())


def parse_time_v(text: str) -> dict:
    """``/usr/bin/time -v``'s peak RSS (kB) and elapsed seconds."""
    found = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        found["time_peak_rss_kb"] = int(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        secs = 0.0
        for part in m.group(1).split(":"):
            secs = secs * 60 + float(part)
        found["time_elapsed_s"] = secs
    return found


def code_version() -> str | None:
    """``git describe --always --dirty`` of the checkout this script runs from (None outside git)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_stage(stage: Stage, work: Path, shape: str) -> dict:
    """Run one stage in its own process; return its measurement record."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    record = logs / f"{stage.name}.record.json"
    record.unlink(missing_ok=True)
    timefile = logs / f"{stage.name}.time"
    if stage.name == "build":
        target, args = str(Path(__file__).resolve()), [*stage.command(work), "--shape", shape]
    else:
        target, args = "qalora", stage.command(work)
    cmd = [sys.executable, "-c", WRAPPER, str(record), json.dumps(list(stage.modules)), target, *args]
    use_time = os.access(TIME, os.X_OK)
    if use_time:
        cmd = [TIME, "-v", "-o", str(timefile), *cmd]
    shown = ("python -m qalora " if target == "qalora" else f"python {target} ") + " ".join(args)
    print(f"[scale] {stage.name}: {shown}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    with open(logs / f"{stage.name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            check=False).returncode
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rec = json.loads(record.read_text()) if record.is_file() else {}
    if use_time and timefile.is_file():
        rec.update(parse_time_v(timefile.read_text()))
    peak_kb, source = rec.get("time_peak_rss_kb"), "/usr/bin/time -v"
    if peak_kb is None and "self_peak_rss_kb" in rec:
        peak_kb, source = rec["self_peak_rss_kb"], "getrusage(RUSAGE_SELF) in the child"
    if peak_kb is None and after > before:
        peak_kb, source = after, "getrusage(RUSAGE_CHILDREN) (running max)"
    out = work / stage.output
    result = {"stage": stage.name, "status": "ok" if rc == 0 and complete(stage, work) else "failed",
              "returncode": rc, "command": shown, "seconds": round(seconds, 2),
              "peak_rss_bytes": None if peak_kb is None else peak_kb * 1024, "peak_rss_source": source,
              "baseline_rss_bytes": rec["baseline_rss_kb"] * 1024 if "baseline_rss_kb" in rec else None,
              "import_seconds": round(rec["import_seconds"], 2) if "import_seconds" in rec else None,
              "output": stage.output, "output_bytes": folder_bytes(out) if out.exists() else None,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": time.time(), "code": code_version()}
    if result["status"] == "failed":
        tail = (logs / f"{stage.name}.log").read_text(errors="replace").splitlines()[-15:]
        result["log_tail"] = tail
        print(f"[scale] {stage.name} FAILED (exit {rc}); last lines of {logs / (stage.name + '.log')}:", flush=True)
        print("\n".join("    " + line for line in tail), flush=True)
    return result


def gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def format_table(rows: list[dict]) -> str:
    head = f"{'stage':<14} {'status':<8} {'seconds':>8} {'peak RSS GB':>11} {'after imports GB':>16} " \
           f"{'peak - imports GB':>17} {'output':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak, base = r.get("peak_rss_bytes"), r.get("baseline_rss_bytes")
        grown = None if peak is None or base is None else peak - base
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        lines.append(f"{r['stage']:<14} {r['status']:<8} {secs:>8} {gb(peak):>11} {gb(base):>16} {gb(grown):>17} "
                     f"{size(r.get('output_bytes')):>10}")
    return "\n".join(lines)


def checkpoint_sha(folder: Path) -> str | None:
    """The SHA-256 of a stage's weights: the one a qalora checkpoint records in ``qalora.json``,
    or that of an adapter folder's ``adapter.safetensors``; None for other outputs."""
    meta = folder / "qalora.json"
    if meta.is_file():
        return (json.loads(meta.read_text()).get("sha256") or {}).get("model.safetensors")
    adapter = folder / "adapter.safetensors"
    if adapter.is_file():
        from qalora.io import sha256_file

        return sha256_file(adapter)
    return None


def compare_previous(rec: dict, old: dict, out: Path, previous: Path) -> tuple[dict, bool]:
    """After a ``--remeasure`` run: ``(record, whether the stages after it stay valid)``. A failed
    run puts the previous output back; a checkpoint bit-identical to the previous one keeps the
    previous finish time (what reads it need not run again) and records the previous figures."""
    if rec["status"] != "ok":
        shutil.rmtree(out, ignore_errors=True)
        os.replace(previous, out)
        return rec, False
    same = checkpoint_sha(out) is not None and checkpoint_sha(out) == checkpoint_sha(previous)
    shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
    rec = {**rec, "identical_to_previous": same,
           "previous": {k: old.get(k) for k in ("command", "seconds", "peak_rss_bytes", "baseline_rss_bytes",
                                                 "measured_at", "code")}}
    if same and "finished" in old:
        rec["finished"] = old["finished"]
    print(f"[scale] {rec['stage']}: the new checkpoint is {'bit-identical to' if same else 'different from'} the "
          "previous one" + ("; the stages after it stay valid" if same else "; the stages after it run again"),
          flush=True)
    return rec, same


def parse_stages(text: str | None) -> list[Stage]:
    if not text:
        return list(STAGES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(unknown)}; use some of {', '.join(BY_NAME)}")
    return [s for s in STAGES if s.name in names]  # always in pipeline order


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    p.add_argument("--work", default=None, help="folder for every stage's output, logs and measurements (resumable; "
                                                "default: /tmp/qalora-scale-<shape>)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of: {','.join(BY_NAME)} (default: all)")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/scale-<shape>.json)")
    p.add_argument("--remeasure", default=None,
                   help="comma-separated stages to run again although their output exists (e.g. after a change to "
                        "that stage's code); when the new checkpoint is bit-identical, the stages after it stay valid")
    p.add_argument("--build-into", default=None, help=argparse.SUPPRESS)  # the build stage's own process
    args = p.parse_args()
    if args.build_into:
        build_model(Path(args.build_into), args.shape)
        return

    work = Path(args.work or f"/tmp/qalora-scale-{args.shape}").expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else ROOT / "results" / f"scale-{args.shape}.json"
    mpath = work / MEASUREMENTS
    state = json.loads(mpath.read_text()) if mpath.is_file() else {"shape": args.shape, "stages": {}}
    if state["shape"] != args.shape:
        raise SystemExit(f"--work {work} holds a {state['shape']!r} run; use another --work for --shape {args.shape}")

    selected = parse_stages(args.stages)
    remeasure = {s.name for s in parse_stages(args.remeasure)} if args.remeasure else set()
    failed: set[str] = set()
    ran: set[str] = set()  # stages run by this invocation: what reads their outputs is stale
    rows = []

    def finished(name: str) -> float:
        return (state["stages"].get(name) or {}).get("finished", 0.0)

    for stage in selected:
        missing = [n for n in stage.needs if not complete(BY_NAME[n], work)]
        stale = [n for n in stage.needs if n in ran or finished(n) > finished(stage.name)]
        previous = None
        if stage.name in remeasure and complete(stage, work) and not stale:
            previous = work / (stage.output + ".previous")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(work / stage.output, previous)
            print(f"[scale] {stage.name}: measuring again (previous output kept until the new one is compared)",
                  flush=True)
        if complete(stage, work) and not stale:
            rec = state["stages"].get(stage.name)
            if rec and rec.get("status") == "ok":
                rows.append({**rec, "status": "reused"})
            else:
                rows.append({"stage": stage.name, "status": "exists", "output": stage.output,
                             "output_bytes": folder_bytes(work / stage.output)})
            print(f"[scale] {stage.name}: {work / stage.output} exists, reused", flush=True)
            continue
        if missing:
            why = [n for n in missing if n in failed]
            reason = f"{', '.join(why)} failed" if why else f"needs {', '.join(missing)} (add it to --stages)"
            print(f"[scale] {stage.name}: skipped, {reason}", flush=True)
            rows.append({"stage": stage.name, "status": "skipped", "reason": reason})
            failed.add(stage.name)
            continue
        partial = work / stage.output
        if partial.exists():  # an interrupted run of this stage, or one made from inputs rebuilt since
            why = f"made before {', '.join(stale)} was rebuilt" if complete(stage, work) else "incomplete"
            print(f"[scale] {stage.name}: removing {partial} ({why})", flush=True)
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
        rec = run_stage(stage, work, args.shape)
        if previous is not None:
            rec, keep_downstream = compare_previous(rec, state["stages"].get(stage.name) or {}, work / stage.output,
                                                    previous)
            if keep_downstream:
                rows.append(rec)
                state["stages"][stage.name] = rec
                mpath.write_text(json.dumps(state, indent=2) + "\n")
                continue
        rows.append(rec)
        ran.add(stage.name)
        if rec["status"] == "ok":
            state["stages"][stage.name] = rec
            mpath.write_text(json.dumps(state, indent=2) + "\n")
        else:
            failed.add(stage.name)

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(work / "fp")) if complete(BY_NAME["build"], work) else None
    vocab = cfg.vocab_size if cfg else None
    params = parameter_count(args.shape, vocab) if vocab else None
    tying = "tied" if SHAPES[args.shape].get("tie_word_embeddings") else "untied"
    header = (f"shape {args.shape}: {SHAPES[args.shape]}, vocab {vocab}, {tying}"
              + (f"; {params:,} parameters (fp32 {params * 4 / 1e9:.2f} GB, bf16 on disk {params * 2 / 1e9:.2f} GB)"
                 if params else ""))
    print(header)
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, work {work}")
    print(format_table(rows))
    result = {"shape": args.shape, "dims": SHAPES[args.shape], "vocab_size": vocab, "parameters": params,
              "weights_dtype_on_disk": "bfloat16", "work": str(work), "rows": rows,
              "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
              "env": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                      "python": platform.python_version(), "machine": platform.machine(),
                      "time_v": os.access(TIME, os.X_OK)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
