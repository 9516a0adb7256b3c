"""Training-step time, decode / prefill speed and GPTQ time of qalora against PEFT, bitsandbytes,
transformers and llama.cpp: one command, every system in its own process, the same settings.

    python benchmarks/speed.py [--quick] [--work DIR] [--pipeline DIR] [--only NAME ...] [--out FILE]

Files: this one (rows, parent, table), ``speed_common.py`` (settings), ``speed_hf.py`` (training,
transformers-style decode, GPTQ, builds), ``speed_llamacpp.py`` (llama.cpp rows). Each row runs as
``python benchmarks/speed.py _worker NAME SPEC`` (a child of ``sys.executable``):
the child loads its system, measures, reads its own peak RSS with
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and prints one JSON line, so the memory is that
system's alone. Every child runs with 2 threads (``torch.set_num_threads``, ``OMP_NUM_THREADS``,
llama.cpp ``n_threads``/``n_threads_batch``). Ratios are taken only between rows of the same run
(machines of this kind differ, and the CPU may be shared: the load average before and after each
row is recorded beside it).

**Training rows** (``train-*``): one optimizer step on one fixed batch of 4 x 256 random token ids
(``torch.randint`` with seed 0, every position a target), rank 64 on all seven projections, alpha
16, dropout 0, AdamW (lr 2e-4, no weight decay), gradient-norm clip 0.3, fp32 (the defaults of
``qalora.config.LoraConfig`` / ``TrainConfig``). Reported: the median of ``steps`` timed steps after
``warmup`` untimed ones, and the child's peak RSS. A step is, for every row alike: the loss of
``qalora.training.loop._token_loss_sum`` (the trainer's own function: logits only at the 255
scored positions, summed cross entropy) divided by the 1,020 target tokens, ``backward()``, clip,
AdamW step, gradients cleared. For the qalora rows the base, the adapters and the optimizer are the
trainer's own (``load_base``, ``add_adapters``, ``Optimizers.clip`` / ``.step``), so the timed work
is the body of ``qalora.training.loop.train``'s step loop without its data loading (the batch is
already built), per-micro-batch RNG forking and logging: the same forward + backward + optimizer
step on the same tokens as the PEFT rows, which use ``torch.optim.AdamW`` +
``clip_grad_norm_`` on PEFT's trainable parameters. (Timing ``qalora.train`` and reading
``metrics.jsonl`` would time instruction batches whose loss covers only the responses, a smaller
head matmul than the PEFT loop's: not the same work.)

- ``train-qalora``: qalora QA-LoRA on an INT4 g32 RTN checkpoint of the embedded SmolLM2 (fp32
  compute: one layer dequantized just in time + fp32 GEMM, as ``qalora train`` does).
- ``train-qalora-gc``: the same with gradient checkpointing of the decoder layers (as
  ``qalora train --grad-checkpointing``).
- ``train-qalora-qlora``: qalora's QLoRA baseline (``--method qlora``: its own NF4, block 64).
- ``train-peft-lora``: PEFT LoRA on the fp32 model.
- ``train-peft-bnb``: PEFT + bitsandbytes NF4 QLoRA (block 64, fp32 compute; no double
  quantization; no ``prepare_model_for_kbit_training``, whose casts are no-ops in fp32 and which
  would switch gradient checkpointing on): **the reference of the training ratios**.
- ``train-peft-bnb-gc``: the same with gradient checkpointing (non-reentrant, as qalora's).

**Decode rows** (``decode-*``): prefill tokens/s (one forward over a 512-token prompt of random ids,
building the KV cache, last position's logits only; median of ``reps``), and greedy decode tokens/s
at batch 1 and batch 8 (``new_tokens`` generated per sequence / wall time of the whole generation,
the chat-templated ``qalora.stages.pipeline.SPEED_PROMPT`` as prompt, replicated 8 times at batch
8; a short warm-up generation first, as ``pipeline.decode_tokens_per_s``; median of ``reps``). The
HF rows call ``model.generate(do_sample=False, min_new_tokens=max_new_tokens=N)``; llama.cpp runs
the same token ids through its C API (``llama_decode`` on one batch holding every sequence, argmax
of the logits: the same greedy loop, no sampler). **Ratios are tokens/s against the llama.cpp row
of the same bits** (INT4 for the rows without qalora bits).

- ``decode-qalora-int4`` / ``-int3``: ``qalora.load(path, kernel="auto")`` on the merged INT4 /
  INT3 g32 model, decoded by ``qalora.decode.decode`` (what ``qalora generate`` runs: the kernels
  bound, eager steps): the ``--pipeline`` folder's ``merged/`` for the bits it holds, otherwise
  an RTN checkpoint of the embedded model (a merged QA-LoRA model is a checkpoint of the same
  format and shapes, so it computes the same way at the same speed).
- ``decode-qalora-int4-hf``: the same INT4 model through transformers' ``model.generate`` (the
  path ``qalora generate`` took before ``qalora.decode``).
- ``decode-qalora-int4-compiled``: ``qalora.decode`` with ``compile=True`` (``torch.compile`` of
  the one-token step over a preallocated cache); ``warmup_b1_s`` holds the one-time compilation.
- ``decode-qalora-int4-compiled-head4`` / ``decode-qalora-int3-compiled-head4``: the same with the
  output head quantized in memory to INT4 g32 (``--head-bits 4``: a different, smaller head, so
  its greedy tokens may differ from the other rows').
- ``decode-qalora-unmerged``: ``qalora.adapters.format.load_adapted`` (the pipeline's quantized
  base + adapter, or the INT4 RTN base + a QA-LoRA adapter trained for one step), kernel auto,
  the adapters computed beside the base in every layer.
- ``decode-peft-bnb``: PEFT + bitsandbytes NF4 (fp32 compute) with a rank-64 LoRA on all seven
  projections, unmerged (QLoRA's deployment without a merge).
- ``decode-hf-bf16``: transformers on the unquantized model in bf16.
- ``decode-llamacpp-int4`` / ``-int3``: llama.cpp (llama-cpp-python) on the GGUF that
  ``qalora.export.gguf.export_gguf`` writes from the same INT4 / INT3 model (the pipeline's
  ``model.gguf`` when it is of that model).

**GPTQ row** (``gptq-layer``): seconds per decoder layer of ``qalora.quant.model.quantize_gptq``
(INT4 g32, true-sequential, the ``QuantConfig`` defaults) on the embedded model cut to its first
``gptq_layers`` decoder layers: the whole call is timed, the capture of the calibration
activations entering layer 0 (timed separately, once) is subtracted, and the rest is divided by
the layers. Calibration: ``QuantConfig.calib_samples`` x ``calib_seq_len`` tokens (fewer samples
under ``--quick``; the row records how many).

A row whose library cannot be imported (bitsandbytes, PEFT, llama-cpp-python) is reported
``skipped: <library> not installed``, never dropped; a row that fails is reported with its error.
``--quick`` (a few minutes): 2 timed training steps, 32 new tokens, 1 repetition, no batch 8,
1 GPTQ layer on 16 calibration sequences. Models built for the rows (INT4 / INT3 RTN checkpoints,
the one-step adapter, GGUF files) are cached in ``--work`` and reused. Prints one table and writes
``benchmarks/results/speed.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path


from speed_common import RESULT_TAG, RESULTS, ROOT, Settings, Skip, peak_rss_mb, rtn_checkpoint_path


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    group: str          # train | decode | gptq
    label: str
    bits: int | None = None  # decode: the llama.cpp row of these bits is the reference


ROWS = [
    Row("train-qalora", "train", "qalora QA-LoRA, INT4 g32"),
    Row("train-qalora-gc", "train", "qalora QA-LoRA + grad ckpt"),
    Row("train-qalora-qlora", "train", "qalora QLoRA (own NF4)"),
    Row("train-peft-lora", "train", "PEFT LoRA, fp32"),
    Row("train-peft-bnb", "train", "PEFT + bnb NF4 QLoRA"),
    Row("train-peft-bnb-gc", "train", "PEFT + bnb NF4 QLoRA + grad ckpt"),
    Row("decode-qalora-int4-hf", "decode", "qalora INT4, transformers generate", 4),
    Row("decode-qalora-int4", "decode", "qalora merged INT4", 4),
    Row("decode-qalora-int4-compiled", "decode", "qalora INT4, compiled", 4),
    Row("decode-qalora-int4-compiled-head4", "decode", "qalora INT4, compiled, INT4 head", 4),
    Row("decode-qalora-int3", "decode", "qalora merged INT3", 3),
    Row("decode-qalora-int3-compiled-head4", "decode", "qalora INT3, compiled, INT4 head", 3),
    Row("decode-qalora-unmerged", "decode", "qalora unmerged (base + adapter)"),
    Row("decode-peft-bnb", "decode", "PEFT + bnb NF4, unmerged", 4),
    Row("decode-hf-bf16", "decode", "transformers bf16", 4),
    Row("decode-llamacpp-int4", "decode", "llama.cpp INT4 GGUF", 4),
    Row("decode-llamacpp-int3", "decode", "llama.cpp INT3 GGUF", 3),
    Row("gptq-layer", "gptq", "qalora GPTQ INT4 g32"),
]
BY_NAME = {r.name: r for r in ROWS}
TRAIN_REFERENCE = "train-peft-bnb"


def worker(name: str, spec: dict) -> None:
    """The child: run row (or build) ``name`` and print its result as one JSON line."""
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.pop("settings").items()})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(s.threads)
    sys.path.insert(0, str(ROOT.parent / "src"))
    import speed_hf

    try:
        if name.startswith("build-"):
            out = speed_hf.build(name[len("build-"):], spec)
        elif name.startswith("train-qalora"):
            out = speed_hf.train_qalora("qlora" if name == "train-qalora-qlora" else "qalora",
                                        spec.get("model", "default"), s, grad_ckpt=name.endswith("-gc"))
        elif name.startswith("train-peft"):
            out = speed_hf.train_peft(bnb="bnb" in name, grad_ckpt=name.endswith("-gc"), s=s)
        elif name.startswith("decode-llamacpp"):
            from speed_llamacpp import decode_llamacpp

            out = decode_llamacpp(spec, s)
        elif name.startswith("decode-"):
            out = speed_hf.decode_hf(name, spec, s)
        elif name == "gptq-layer":
            out = speed_hf.gptq_layer(s)
        else:
            raise ValueError(f"unknown row {name!r}")
        out = {"status": "ok", **out}
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    out.update(peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads())
    print(RESULT_TAG + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------ parent

def run_child(name: str, spec: dict, settings: Settings, timeout: float) -> dict:
    """Run ``name`` in a fresh ``sys.executable``; its JSON line, or the error it died with."""
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    payload = json.dumps({**spec, "settings": dataclasses.asdict(settings)})
    load0, t0 = os.getloadavg()[0], time.time()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_worker", name, payload], env=env,
                           capture_output=True, text=True, timeout=timeout, check=False)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if p.returncode == 0 and lines:
            out = json.loads(lines[-1][len(RESULT_TAG):])
        else:
            tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-3:]
            out = {"status": "failed", "reason": f"exit {p.returncode}: " + " | ".join(tail)}
    except subprocess.TimeoutExpired:
        out = {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    out.update(wall_s=round(time.time() - t0, 1), load_avg_before=load0, load_avg_after=os.getloadavg()[0])
    return out


class Inputs:
    """The models the rows run on, built once into ``work`` (each in its own child) and reused."""

    def __init__(self, work: Path, pipeline: Path | None, settings: Settings, timeout: float):
        self.work, self.pipeline, self.settings, self.timeout = work, pipeline, settings, timeout
        self.builds: dict[str, dict] = {}
        self.pipeline_bits = None
        if pipeline is not None:
            from qalora.checkpoint import read_meta

            for sub in ("quantized", "adapter", "merged"):
                if not (pipeline / sub).is_dir():
                    raise SystemExit(f"--pipeline {str(pipeline)!r} has no {sub}/ folder; pass a qalora pipeline folder")
            self.pipeline_bits = next(iter(read_meta(pipeline / "merged")["layers"].values()))["bits"]

    def _make(self, name: str, path: Path, spec: dict, done) -> Path:
        """``path`` built by the child ``build-<name>`` unless ``done(path)`` already holds."""
        if done(path):
            return path
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        print(f"[speed] building {path} ...", flush=True)
        out = run_child(f"build-{name}", {**spec, "tmp": str(tmp)}, self.settings, self.timeout)
        if out["status"] != "ok":
            raise RuntimeError(f"building {path} failed: {out['reason']}")
        if path.is_dir():
            shutil.rmtree(path)  # an incomplete earlier build
        os.replace(tmp, path)
        self.builds[str(path)] = out
        return path

    def rtn(self, bits: int) -> Path:
        return self._make("quantize", rtn_checkpoint_path(self.work, bits), {"bits": bits},
                          lambda p: (p / "qalora.json").is_file())

    def merged(self, bits: int) -> tuple[Path, str]:
        if self.pipeline_bits == bits:
            return self.pipeline / "merged", f"merged QA-LoRA model of {self.pipeline}"
        return self.rtn(bits), "RTN checkpoint of the embedded model (computes as a merged one)"

    def unmerged(self) -> tuple[Path, Path, str]:
        if self.pipeline is not None:
            return self.pipeline / "quantized", self.pipeline / "adapter", f"quantized base + adapter of {self.pipeline}"
        base = self.rtn(4)
        adapter = self._make("adapter", self.work / "int4-g32-rtn-adapter", {"model": str(base)},
                             lambda p: (p / "adapter_config.json").is_file())
        return base, adapter, "INT4 g32 RTN base + a one-step QA-LoRA adapter"

    def gguf(self, bits: int) -> tuple[Path, str]:
        from qalora.checkpoint import read_meta, weights_sha256

        model, source = self.merged(bits)
        shipped = self.pipeline / "model.gguf" if self.pipeline_bits == bits else None
        if shipped is not None and shipped.is_file():
            return shipped, f"the pipeline's GGUF of {source}"
        sha = weights_sha256(read_meta(model))[:12]
        path = self._make("gguf", self.work / f"int{bits}-{sha}.gguf", {"model": str(model)}, Path.is_file)
        return path, f"export_gguf of {source}"

    def spec(self, row: Row) -> dict:
        if row.name in ("train-qalora", "train-qalora-gc"):
            return {"model": str(self.rtn(4))}
        if row.name.startswith(("decode-qalora-int4", "decode-qalora-int3")):
            model, source = self.merged(row.bits)
            return {"model": str(model), "source": source}
        if row.name == "decode-qalora-unmerged":
            base, adapter, source = self.unmerged()
            return {"model": str(base), "adapter": str(adapter), "source": source}
        if row.name.startswith("decode-llamacpp"):
            path, source = self.gguf(row.bits)
            return {"gguf": str(path), "tokenizer": str(self.merged(row.bits)[0]), "source": source}
        return {}


def _row_bits(row: Row, inputs: Inputs) -> int | None:
    if row.name == "decode-qalora-unmerged":
        return inputs.pipeline_bits or 4
    return row.bits


def add_ratios(results: dict[str, dict], inputs: Inputs) -> None:
    """Training: time and peak RSS / the PEFT + bnb QLoRA row's. Decode: tokens/s / the llama.cpp
    row's of the same bits. Only rows of this run."""
    ref = results.get(TRAIN_REFERENCE, {})
    for name, r in results.items():
        row = BY_NAME[name]
        if r.get("status") != "ok":
            continue
        if row.group == "train" and ref.get("status") == "ok":
            r["reference"] = TRAIN_REFERENCE
            r["time_vs_reference"] = r["s_per_step"] / ref["s_per_step"]
            r["rss_vs_reference"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        elif row.group == "decode":
            rname = f"decode-llamacpp-int{_row_bits(row, inputs)}"
            d = results.get(rname, {})
            if d.get("status") != "ok":
                continue
            r["reference"] = rname
            for k in [k for k in r if k.endswith("_tok_s")]:
                if d.get(k):
                    r[k.replace("_tok_s", "_vs_reference")] = r[k] / d[k]
            if r.get("tokens") and d.get("tokens"):
                same = next((i for i, (a, b) in enumerate(zip(r["tokens"], d["tokens"])) if a != b), len(r["tokens"]))
                r["greedy_tokens_equal_to_reference"] = same


def format_table(results: dict[str, dict], settings: Settings) -> str:
    """One table: a line per measurement (x ref: time ratio for training — lower is faster —,
    tokens/s ratio for decode — higher is faster)."""
    head = f"{'system':<34} {'measure':<22} {'value':>13} {'x ref':>6}  {'peak RSS':>8}  note"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        row = BY_NAME[name]
        rss = f"{r['peak_rss_mb'] / 1024:.2f} GB" if r.get("peak_rss_mb") and r.get("status") == "ok" else ""
        if r.get("status") != "ok":
            lines.append(f"{row.label:<34} {name:<22} {'-':>13} {'-':>6}  {'':>8}  {r['status']}: {r.get('reason')}")
            continue

        def ratio(key, r=r):
            return f"{r[key]:.2f}" if r.get(key) is not None else "-"

        if row.group == "train":
            note = f"loss {r['losses'][0]:.3f}; {r['trainable_parameters'] / 1e6:.2f} M trainable"
            if r.get("rss_vs_reference") is not None:
                note += f"; RSS x{r['rss_vs_reference']:.2f}"
            lines.append(f"{row.label:<34} {'train step':<22} {r['s_per_step']:>11.2f} s {ratio('time_vs_reference'):>6}  "
                         f"{rss:>8}  {note}")
        elif row.group == "decode":
            measures = [("prefill_tok_s", f"prefill {settings.prefill_tokens}")] + [
                (f"decode_b{b}_tok_s", f"decode batch {b}") for b in settings.decode_batches]
            for i, (key, label) in enumerate(measures):
                if key not in r:
                    continue
                note = ""
                if key == "decode_b1_tok_s" and "greedy_tokens_equal_to_reference" in r:
                    note = f"first {r['greedy_tokens_equal_to_reference']}/{len(r['tokens'])} greedy tokens = ref"
                lines.append(f"{row.label if i == 0 else '':<34} {label:<22} {r[key]:>7.1f} tok/s "
                             f"{ratio(key.replace('_tok_s', '_vs_reference')):>6}  {rss if i == 0 else '':>8}  {note}")
        else:
            lines.append(f"{row.label:<34} {'per decoder layer':<22} {r['s_per_layer']:>11.2f} s {'-':>6}  {rss:>8}  "
                         f"{r['layers']} layer(s), {r['calib_samples']} x {r['calib_seq_len']} calibration tokens")
    lines.append(f"x ref: training vs {BY_NAME[TRAIN_REFERENCE].label} (time ratio, lower is faster); "
                 "decode vs the llama.cpp row of the same bits (tokens/s ratio, higher is faster)")
    return "\n".join(lines)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp_python", "qalora"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return f"{name} ({', '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags)})"


def select(only: list[str] | None) -> list[Row]:
    if not only:
        return list(ROWS)
    groups = {r.group for r in ROWS}
    unknown = [n for n in only if n not in BY_NAME and n not in groups]
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: unknown; use row names ({', '.join(BY_NAME)}) "
                         f"or groups ({', '.join(sorted(groups))})")
    return [r for r in ROWS if r.name in only or r.group in only]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer steps and tokens, no batch 8")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "qalora-speed"),
                   help="cache of the checkpoints, adapter and GGUF files the rows run on")
    p.add_argument("--pipeline", default=None, help="a qalora pipeline folder: its merged model, base and adapter")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="rows (or groups: train, decode, gptq)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each child")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT.parent / "src"))
    settings = Settings.quick() if args.quick else Settings()
    rows = select(args.only)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(work, Path(args.pipeline).expanduser() if args.pipeline else None, settings, args.timeout)
    meta = {"command": " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]]), "quick": args.quick,
            "settings": dataclasses.asdict(settings), "cpu": _cpu(), "cores": os.cpu_count(), "versions": _versions(),
            "work": str(work), "pipeline": args.pipeline}
    print(f"{meta['cpu']}, {settings.threads} threads; {len(rows)} rows, each in its own process", flush=True)
    results: dict[str, dict] = {}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        try:
            spec = inputs.spec(row)
        except Exception as e:  # noqa: BLE001 -- reported in the row, never dropped
            results[row.name] = {"status": "failed", "reason": f"its input could not be built: {e}"}
            print(f"[speed] {row.name}: failed: {results[row.name]['reason']}", flush=True)
            continue
        print(f"[speed] {row.name} ...", flush=True)
        results[row.name] = {**run_child(row.name, spec, settings, args.timeout), **spec}
        r = results[row.name]
        print(f"[speed] {row.name}: {r['status']}{'' if r['status'] == 'ok' else ': ' + r['reason']} "
              f"({r['wall_s']:.0f} s)", flush=True)
        out_path.write_text(json.dumps({**meta, "rows": results, "builds": inputs.builds}, indent=2) + "\n")
    add_ratios(results, inputs)
    table = format_table(results, settings)
    print("\n" + table)
    out_path.write_text(json.dumps({**meta, "rows": results, "builds": inputs.builds, "table": table}, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()