"""One command that exercises every CUDA path of qalora and prints one table.

Needs nothing but the package: a random-weight Llama with the embedded SmolLM2-135M's shapes
(hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152; 30 layers, or 4 where a section
trains) is built from a ``transformers.LlamaConfig``, a byte-level BPE tokenizer is trained in
memory on the script's own instruction JSONL, and every file goes to a temporary folder.

Sections (each case catches its own failure and is reported FAILED with a one-line reason):

1. ``kernels``: every registered kernel that supports the layer (``int4`` tinygemm, ``reference``,
   ``dense``) on the model's projection shapes (576x576, 192x576, 1536x576, 576x1536) at
   M = 1, 16, 256, 2048 rows, INT4 g32/g64, INT3 g32, INT2 g32 (int4 runs 2/3-bit codes too) and
   INT8 g32 (no int4): max |y - y64| against an fp64 dequantize + matmul, and the median time
   per call (CUDA events after a warm-up). Gated on the error relative to max |y64|: 2e-2 for
   the bf16 int4 kernel, 1e-4 for the fp32 paths.
2. ``train``: one bf16 training step of qalora, qalora --train-scales, peqa, lota and qlora on
   a 4-layer model, twice: through ``qalora.train`` (the Python API: median seconds per step from
   its ``metrics.jsonl``, and where it ran; the trainer moves the model to CUDA when there is
   one, and a run that allocated no CUDA memory is reported FAILED) and on the device
   itself with the library's pieces (``load_base`` → ``add_adapters`` → ``.to(device)`` →
   ``Optimizers``, random token ids, autocast bf16): seconds per step, peak
   ``torch.cuda.max_memory_allocated``.
3. ``gptq``: GPTQ INT4 g32 of one decoder layer on the device (calibration on random ids): time.
4. ``merge``: ``qalora.merge`` of section 2's qalora adapter: the gate, the fp64 logit error
   against its limit, the fp32 figure.
5. ``decode``: greedy tokens/s at batch 1, int4 kernel vs reference, for the merged 4-layer model
   and for a 30-layer INT4 g32 (RTN) model on the device.

Writes ``benchmarks/results/cuda_check.json``; exits 1 if any case FAILED, 2 (one line) if
``--device cuda`` is asked for and CUDA is not available. Under 5 minutes on one H200.

    python benchmarks/cuda_check.py [--out benchmarks/results/cuda_check.json]
    OMP_NUM_THREADS=1 python benchmarks/cuda_check.py --device cpu --quick --out /tmp/cuda_check.json   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS = (1, 16, 256, 2048)
GRIDS = ((4, 32), (4, 64), (3, 32), (2, 32), (8, 32))          # (bits, group size)
REL_LIMIT = {"int4": 2e-2, "reference": 1e-4, "dense": 1e-4}   # bf16 activations vs fp32 GEMM
TRAIN_METHODS = (("qalora", {}), ("qalora --train-scales", {"train_scales": True}), ("peqa", {}),
                 ("lota", {}), ("qlora", {}))
WORDS = ("quantized models keep weights in few bits while low rank adapters learn a small update "
         "group wise scales and offsets describe every block the merge writes new offsets exactly "
         "so the tuned model runs on the same kernels as before training").split()


@dataclass(frozen=True)
class Sizes:
    """How big each section runs: the real shapes on CUDA, tiny ones for ``--quick``."""

    hidden: int = 576
    inter: int = 1536
    heads: int = 9
    kv_heads: int = 3
    vocab: int = 49152
    layers: int = 30
    train_layers: int = 4
    rows: tuple[int, ...] = ROWS
    reps: int = 20
    rank: int = 64
    api_steps: int = 4
    device_steps: int = 3
    batch: tuple[int, int] = (4, 256)
    calib: tuple[int, int] = (128, 256)
    decode_tokens: int = 64


QUICK = Sizes(hidden=128, inter=256, heads=4, kv_heads=2, vocab=1024, layers=2, train_layers=2, rows=(1, 16),
              reps=2, rank=8, api_steps=2, device_steps=1, batch=(2, 32), calib=(8, 32), decode_tokens=4)


@dataclass
class Row:
    section: str
    case: str
    status: str          # ok | FAILED
    figures: str         # what the table prints (units included)
    data: dict = field(default_factory=dict)


@dataclass
class Check:
    """What the sections share: the device, the sizes, and the files earlier sections wrote."""

    device: torch.device
    sizes: Sizes
    work: Path
    files: dict = field(default_factory=dict)   # "fp", "q4", "data", "adapter", "merged" -> Path


def reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def log(msg: str) -> None:
    print(f"[cuda_check] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on CUDA, ``perf_counter`` on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> int:
    """Start a new peak; returns the bytes allocated now (what earlier cases left)."""
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def mem_text(mb: float | None) -> str:
    return "peak CUDA mem: skipped (no CUDA)" if mb is None else f"peak CUDA {mb:,.0f} MB"


# ----------------------------------------------------------------------------- model and data

def llama_config(s: Sizes, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.inter, num_hidden_layers=layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def random_llama(s: Sizes, layers: int, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(s, layers)).eval()


def projection_shapes(s: Sizes) -> list[tuple[int, int]]:
    """``(out, in)`` of q/o, k/v, gate/up and down."""
    kv = s.hidden // s.heads * s.kv_heads
    return [(s.hidden, s.hidden), (kv, s.hidden), (s.inter, s.hidden), (s.hidden, s.inter)]


def instruction_rows(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"({i}) " + " ".join(rng.choices(WORDS, k=24)), "input": "",
             "output": " ".join(rng.choices(WORDS, k=24))} for i in range(n)]


def tiny_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE trained in memory (no download); ``<eos>`` (id 0) is eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 1024), special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def prepare_files(ck: Check) -> None:
    """JSONL data, a 4-layer fp folder (for qlora) and its INT4 g32 RTN qalora checkpoint."""
    from qalora.checkpoint import save_checkpoint
    from qalora.config import QuantConfig
    from qalora.quant.model import quantize_model

    rows = instruction_rows()
    data = ck.work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tiny_tokenizer([r["instruction"] + " " + r["output"] for r in rows] * 4, ck.sizes.vocab)
    model = random_llama(ck.sizes, ck.sizes.train_layers)
    model.save_pretrained(ck.work / "fp")
    tok.save_pretrained(ck.work / "fp")
    quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(model, tok, ck.work / "q4", {"bits": 4, "group_size": 32, "method": "rtn"})
    ck.files.update(data=data, fp=ck.work / "fp", q4=ck.work / "q4")


# ----------------------------------------------------------------------------- 1. kernels

def quant_layer(bits: int, group: int, out_f: int, in_f: int, device: torch.device):
    from qalora.nn.quant_linear import QuantLinear
    from qalora.quant.rtn import rtn_quantize
    from qalora.quant.weight import QuantizedWeight

    codes, s, o = rtn_quantize(torch.randn(out_f, in_f) * 0.02, bits, group)
    return QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, s, o, bits, group)).to(device)


@torch.inference_mode()
def kernel_figures(layer, m: int, ck: Check) -> tuple[dict, list[str]]:
    """``{kernel: {ms, max_abs, rel}}`` for every kernel that runs ``layer`` at ``m`` rows, and
    the gate failures (relative error over ``REL_LIMIT``)."""
    from qalora.kernels.registry import KERNELS

    x = torch.randn(m, layer.in_features, device=ck.device)
    y64 = x.double() @ layer.dequantized_weight(torch.float64).t()          # [m, out], the fp64 truth
    scale = float(y64.abs().max())
    out, bad = {}, []
    for k in KERNELS:
        if not k.supports(layer, ck.device):
            continue
        layer.kernel = k.name
        err = float((layer(x).double() - y64).abs().max())
        out[k.name] = {"ms": median_ms(lambda: layer(x), ck.device, ck.sizes.reps), "max_abs": err,
                       "rel": err / max(scale, 1e-30)}
        if not out[k.name]["rel"] <= REL_LIMIT[k.name]:
            bad.append(f"{k.name} rel err {out[k.name]['rel']:.2g} > {REL_LIMIT[k.name]:g}")
    return out, bad


def kernel_rows(bits: int, group: int, out_f: int, in_f: int, ck: Check) -> list[Row]:
    case = f"INT{bits} g{group} {out_f}x{in_f}"
    try:
        layer = quant_layer(bits, group, out_f, in_f, ck.device)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return [Row("kernels", case, "FAILED", reason(e))]
    rows = []
    for m in ck.sizes.rows:
        try:
            figs, bad = kernel_figures(layer, m, ck)
        except Exception as e:  # noqa: BLE001
            rows.append(Row("kernels", f"{case} M={m}", "FAILED", reason(e)))
            continue
        text = " | ".join(f"{k} {v['ms']:.3f} ms err {v['max_abs']:.1e}" for k, v in figs.items())
        rows.append(Row("kernels", f"{case} M={m}", "FAILED" if bad else "ok",
                        "; ".join(bad) + (" -- " if bad else "") + text,
                        {"bits": bits, "group_size": group, "shape": f"{out_f}x{in_f}", "rows": m, "kernels": figs}))
    return rows


def section_kernels(ck: Check) -> list[Row]:
    return [r for bits, group in GRIDS for out_f, in_f in projection_shapes(ck.sizes)
            for r in kernel_rows(bits, group, out_f, in_f, ck)]


# ----------------------------------------------------------------------------- 2. train

def method_configs(label: str, flags: dict, ck: Check, steps: int):
    from qalora.config import LoraConfig, TrainConfig

    method = label.split()[0]
    s = ck.sizes
    cfg = TrainConfig(method=method, data=str(ck.files["data"]), steps=steps, batch_size=s.batch[0], max_seq_len=256,
                      compute_dtype="bf16", eval_every=steps, eval_batches=1, save_every=steps)
    return cfg, LoraConfig(rank=s.rank, alpha=16, **flags)


def base_path(method: str, ck: Check) -> Path:
    return ck.files["fp"] if method == "qlora" else ck.files["q4"]


def api_row(label: str, flags: dict, ck: Check) -> Row:
    """``qalora.train`` for a few steps: median step seconds (``metrics.jsonl``, first step left out)."""
    import qalora

    cfg, lora = method_configs(label, flags, ck, ck.sizes.api_steps)
    out = ck.work / f"adapter-{label.replace(' ', '').replace('-', '_')}"
    before = reset_peak(ck.device)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = qalora.train(str(base_path(cfg.method, ck)), str(out), cfg, lora, progress=False)
    mb = peak_mb(ck.device)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    secs = [r["seconds"] for r in steps if "seconds" in r]
    sec = statistics.median(secs[1:] or secs)
    ran_on = "cuda" if mb is not None and mb * 2**20 > before else "cpu"  # no CUDA allocation: the CPU
    if label == "qalora":
        ck.files["adapter"] = out
    # on a CUDA run, a train() that never touched the GPU is the finding this row exists for
    status, note = ("FAILED", "ran on the CPU, not CUDA: ") if ck.device.type == "cuda" and ran_on == "cpu" else ("ok", "")
    return Row("train", f"{label} (qalora.train)", status,
               f"{note}{sec:.3f} s/step, ran on {ran_on}, {mem_text(mb)}, {summary['trainable_parameters']:,} trainable, "
               f"val loss {summary['val_loss_start']:.2f} -> {summary['val_loss_end']:.2f}",
               {"seconds_per_step": sec, "ran_on": ran_on, "peak_cuda_mb": mb, "peak_rss_mb": summary["peak_rss_mb"],
                "trainable_parameters": summary["trainable_parameters"], "compute": summary["compute"]})


def device_model(label: str, flags: dict, ck: Check):
    """The method's base with its adapters, on the device, and its optimizers."""
    from qalora.adapters.attach import add_adapters, trainable_parameters
    from qalora.adapters.base import load_base
    from qalora.training.optim import Optimizers

    cfg, lora = method_configs(label, flags, ck, ck.sizes.device_steps + 1)
    base = load_base(cfg.method, str(base_path(cfg.method, ck)), cfg.compute_dtype)
    net = base.model
    add_adapters(net, cfg.method, lora)
    n = trainable_parameters(net)
    net.to(ck.device).train()
    return net, Optimizers(net, cfg), n


def train_step(net, optim, ids: torch.Tensor, device: torch.device) -> float:
    """One optimizer step on ``ids [B, T]`` (next-token loss on every position), autocast bf16."""
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = net(input_ids=ids).logits                                  # [B, T, V]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    optim.clip(0.3)
    optim.step()
    return float(loss.detach())


def device_row(label: str, flags: dict, ck: Check) -> Row:
    net, optim, n = device_model(label, flags, ck)
    ids = torch.randint(0, ck.sizes.vocab, ck.sizes.batch, device=ck.device)
    train_step(net, optim, ids, ck.device)                                   # warm-up (kernel packing, allocator)
    reset_peak(ck.device)
    secs, loss = [], float("nan")
    for _ in range(ck.sizes.device_steps):
        sync(ck.device)
        t = time.perf_counter()
        loss = train_step(net, optim, ids, ck.device)
        sync(ck.device)
        secs.append(time.perf_counter() - t)
    mb, sec = peak_mb(ck.device), statistics.median(secs)
    b, t = ck.sizes.batch
    return Row("train", f"{label} (on {ck.device.type})", "ok" if loss == loss else "FAILED",
               f"{sec:.3f} s/step ({b}x{t} tokens), {mem_text(mb)}, {n:,} trainable, loss {loss:.2f}",
               {"seconds_per_step": sec, "peak_cuda_mb": mb, "batch": [b, t], "trainable_parameters": n, "loss": loss})


def section_train(ck: Check) -> list[Row]:
    rows = []
    for label, flags in TRAIN_METHODS:
        for how, fn in (("qalora.train", api_row), (f"on {ck.device.type}", device_row)):
            try:
                rows.append(fn(label, flags, ck))
            except Exception as e:  # noqa: BLE001
                rows.append(Row("train", f"{label} ({how})", "FAILED", reason(e)))
    return rows


# ----------------------------------------------------------------------------- 3. gptq

def section_gptq(ck: Check) -> list[Row]:
    from qalora.config import QuantConfig
    from qalora.quant.model import quantize_model

    n, t = ck.sizes.calib
    model = random_llama(ck.sizes, 1).to(ck.device)
    calib = torch.randint(0, ck.sizes.vocab, (n, t), device=ck.device)
    sync(ck.device)
    start = time.perf_counter()
    report = quantize_model(model, QuantConfig(bits=4, group_size=32, method="gptq", calib_samples=n,
                                               calib_seq_len=t), calib, progress=False)
    sync(ck.device)
    sec = time.perf_counter() - start
    errs = list(report["layer_errors"].values())
    where = {str(m.qweight.device) for m in model.modules() if hasattr(m, "qweight")}
    return [Row("gptq", f"INT4 g32, 1 decoder layer, calib {n}x{t}", "ok",
                f"{sec:.2f} s for {len(errs)} linears, mean rel output err {statistics.mean(errs):.2e}, "
                f"codes on {','.join(sorted(where))}",
                {"seconds": sec, "linears": len(errs), "mean_rel_error": statistics.mean(errs), "calib": [n, t]})]


# ----------------------------------------------------------------------------- 4. merge

def section_merge(ck: Check) -> list[Row]:
    import qalora

    if "adapter" not in ck.files:
        return [Row("merge", "qalora adapter", "FAILED", "no qalora adapter: section 2's qalora.train run failed")]
    out = ck.work / "merged"
    start = time.perf_counter()
    rep = qalora.merge(str(ck.files["q4"]), str(ck.files["adapter"]), str(out), progress=False)
    sec = time.perf_counter() - start
    ck.files["merged"] = out
    i4 = rep.get("int4") or {}
    top1 = f", int4 top-1 {i4['top1_agreement']:.0%}" if i4 else ""
    return [Row("merge", f"qalora adapter, {rep['layers_merged']} layers", "ok",
                f"gate passed; fp64 max|dlogit| {rep['fp64_max_abs_logit_diff']:.1e} (limit {rep['fp64_tolerance']:.1e}), "
                f"fp32 {rep['reference']['max_abs_logit_diff']:.1e} (limit {rep['fp32_tolerance']:.1e}){top1}; "
                f"{sec:.1f} s",
                {"seconds": sec, "fp64_max_abs_logit_diff": rep["fp64_max_abs_logit_diff"],
                 "fp64_tolerance": rep["fp64_tolerance"], "fp32_max_abs_logit_diff": rep["reference"]["max_abs_logit_diff"],
                 "fp32_tolerance": rep["fp32_tolerance"], "int4": i4 or None, "weights": rep["weights"]})]


# ----------------------------------------------------------------------------- 5. decode

@torch.inference_mode()
def tokens_per_s(model, ck: Check) -> float:
    n = ck.sizes.decode_tokens
    ids = torch.randint(1, ck.sizes.vocab, (1, 16), device=ck.device)

    def run(k: int):
        return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)

    run(4)                                                                   # warm-up: packing, cache
    sync(ck.device)
    start = time.perf_counter()
    out = run(n)
    sync(ck.device)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def decode_models(ck: Check):
    """``(label, loader)`` pairs; each loader returns the model on the device."""
    from qalora.checkpoint import load
    from qalora.config import QuantConfig
    from qalora.quant.model import quantize_model

    def deep():
        model = random_llama(ck.sizes, ck.sizes.layers, seed=1)
        quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
        return model.to(ck.device)

    merged = ck.files.get("merged")
    return [(f"merged {ck.sizes.train_layers}-layer INT4 g32",
             (lambda: load(merged, device=ck.device)) if merged else None),
            (f"{ck.sizes.layers}-layer INT4 g32 (RTN)", deep)]


def decode_rows(label: str, loader, ck: Check) -> list[Row]:
    from qalora.patch import set_kernel

    if loader is None:
        return [Row("decode", label, "FAILED", "no merged model: section 4 failed")]
    try:
        model = loader()
    except Exception as e:  # noqa: BLE001
        return [Row("decode", label, "FAILED", reason(e))]
    rows = []
    for kernel in ("int4", "reference"):
        try:
            set_kernel(model, kernel)
            tps = tokens_per_s(model, ck)
            rows.append(Row("decode", f"{label}, {kernel}", "ok", f"{tps:.1f} tokens/s (batch 1, "
                            f"{ck.sizes.decode_tokens} greedy tokens)", {"kernel": kernel, "tokens_per_s": tps}))
        except Exception as e:  # noqa: BLE001
            rows.append(Row("decode", f"{label}, {kernel}", "FAILED", reason(e)))
    return rows


def section_decode(ck: Check) -> list[Row]:
    return [r for label, loader in decode_models(ck) for r in decode_rows(label, loader, ck)]


# ----------------------------------------------------------------------------- driver

SECTIONS = (("kernels", section_kernels), ("train", section_train), ("gptq", section_gptq),
            ("merge", section_merge), ("decode", section_decode))


def run_sections(ck: Check) -> list[Row]:
    rows = []
    try:
        prepare_files(ck)
    except Exception as e:  # noqa: BLE001 - sections that need the files fail on their own
        rows.append(Row("setup", "4-layer checkpoint + data", "FAILED", reason(e)))
    for name, fn in SECTIONS:
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            rows.extend(fn(ck))
        except Exception as e:  # noqa: BLE001
            rows.append(Row(name, "-", "FAILED", reason(e)))
        log(f"{name} done in {time.perf_counter() - start:.1f} s")
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(r.case) for r in rows)
    print(f"{'section':<8} {'case':<{width}} {'status':<7} figures")
    for r in rows:
        print(f"{r.section:<8} {r.case:<{width}} {r.status:<7} {r.figures}")


def environment(device: torch.device, quick: bool) -> dict:
    import transformers

    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "quick": quick,
            "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 1-2 steps (a smoke run of the logic)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cuda_check.json"))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_check: --device cuda but torch.cuda.is_available() is False; use --device cpu --quick "
              "for a smoke run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sizes = QUICK if args.quick else Sizes()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qalora-cuda-check-") as tmp:
        rows = run_sections(Check(device, sizes, Path(tmp)))
    print_table(rows)
    result = {**environment(device, args.quick), "sizes": asdict(sizes),
              "seconds_total": round(time.perf_counter() - start, 1), "rows": [asdict(r) for r in rows]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    failed = sum(r.status == "FAILED" for r in rows)
    print(f"{len(rows)} cases, {failed} FAILED, {result['seconds_total']:.0f} s; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
