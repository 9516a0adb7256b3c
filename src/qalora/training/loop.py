"""The training loop shared by QA-LoRA and its baselines (``qalora train``).

One optimizer step = ``grad_accum`` micro-batches (per process; ``W·grad_accum`` over ``W``
processes under torchrun, see :mod:`qalora.training.distributed`) whose summed token losses are
divided by the step's total number of response tokens, so accumulation equals one large batch.
The data order is a pure function of (seed, epoch) and the micro-batch number, each micro-batch's
random draws (dropout) are seeded from its number, and the optimizer and scheduler states are
checkpointed, so a run stopped at any point and resumed ends with the same adapter as an
uninterrupted run (bit-identical on CPU in one process).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qalora.adapters.attach import (adapter_layers, adapter_state, add_adapters, load_adapter_state, ternary_parameter_names,
                                    trainable_parameters)
from qalora.adapters.base import BASE_KERNELS, load_base
from qalora.adapters.format import state_counts, write_adapter
from qalora.adapters.methods import method_kinds
from qalora.config import LoraConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.io import read_json, write_json
from qalora.training import head_loss
from qalora.training.optim import Optimizers
from qalora.training.data import TrainData, load_train_data
from qalora.training.distributed import Ranks, full, micro_seed, no_sync, wrap
from qalora.training.state import latest_checkpoint, load_train_state, save_train_state

RUN_FILE = "run.json"
# what must match for --resume to continue a run exactly
RESUME_KEYS = ("method", "base_sha256", "data", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay",
               "max_grad_norm", "max_seq_len", "compute_dtype", "seed", "lora")


@dataclass
class StepBatch:
    micro: list[tuple[int, dict]]  # (global micro-batch number, batch) run by this process
    tokens: int                    # response tokens of the whole step, every process (the loss is averaged over these)
    input_tokens: int              # all non-padding tokens the processes run


def _step_batches(data: TrainData, step: int, cfg: TrainConfig, ranks: Ranks) -> StepBatch:
    """This process's micro-batches of optimizer step ``step`` (0-based), derived from the step
    alone, with the step's token counts summed over processes."""
    micro = [(k, data.train_batch(k)) for k in ranks.micro_batches(step, cfg.grad_accum)]
    tokens = sum(int((b["labels"] != -100).sum()) for _, b in micro)
    inputs = sum(int(b["attention_mask"].sum()) for _, b in micro)
    return StepBatch(micro, int(ranks.sum(tokens)), int(ranks.sum(inputs)))


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[K]`` positions ``t`` whose logits some sequence of the batch scores (``labels[:, t + 1]``
    is a response token), from ``labels [B, T]``."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


def _token_loss_sum(model, batch: dict, dtype_ctx, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of next-token cross entropies over response tokens (fp32).

    Only the ``K`` positions some sequence scores get logits (``logits_to_keep``): the head's
    ``[B, K, vocab]`` instead of ``[B, T, vocab]``, and prompts, which are most of an instruction
    batch, cost no head matmul at all. Rows that are the same as the full head's, up to the
    GEMM's blocking (fp32). A plain model in one process goes further (``head_loss``): its
    decoder's hidden states at those positions meet the head in row chunks, and the logits are
    never held whole."""
    labels = batch["labels"]
    keep = scored_positions(labels)
    target = labels[:, 1:][:, keep].to(device)                                         # [B, K]
    if head_loss.applies(model):
        with dtype_ctx():
            hidden = model.get_decoder()(input_ids=batch["input_ids"].to(device),
                                         attention_mask=batch["attention_mask"].to(device)).last_hidden_state
        h = hidden[:, keep.to(device)]                                                 # [B, K, d]
        return head_loss.fused_head_ce(h.reshape(-1, h.shape[-1]), model.get_output_embeddings(), target.reshape(-1))
    with dtype_ctx():
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       logits_to_keep=keep.to(device)).logits                        # [B, K, vocab]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=-100, reduction="sum")


@torch.no_grad()
def validation_loss(model, data: TrainData, dtype_ctx, device: torch.device | str = "cpu") -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in data.val_batches():
        total += float(_token_loss_sum(model, batch, dtype_ctx, device))
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was)
    return total / max(count, 1)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_identity(cfg: TrainConfig, lora: LoraConfig, base_sha: str, world: int = 1) -> dict:
    """What a resume must match; ``grad_accum`` is the step's micro-batches over all processes."""
    d = cfg.to_dict()
    d.pop("steps"), d.pop("eval_every"), d.pop("eval_batches"), d.pop("save_every")
    return {**d, "grad_accum": cfg.grad_accum * world, "lora": lora.to_dict(), "base_sha256": base_sha}


def _check_resume(adir: Path, identity: dict) -> None:
    prev = read_json(adir / RUN_FILE, "run description")
    for key in RESUME_KEYS:
        if prev.get(key) != identity.get(key):
            what = "base checkpoint" if key == "base_sha256" else key
            if key == "grad_accum":
                what = "number of micro-batches per step over all processes (processes x --grad-accum)"
            raise QaloraError(f"--resume {str(adir)!r}: that run used a different {what} "
                              f"({prev.get(key)!r} vs {identity.get(key)!r}); resume with the same settings or use a new --out")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written by the interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def train(model: str | os.PathLike | None, out: str | os.PathLike, cfg: TrainConfig | None = None,
          lora: LoraConfig | None = None, resume: bool = False, progress: bool = True,
          ranks: Ranks | None = None, files=None) -> dict:
    """Train adapters of ``cfg.method`` on ``model``; write them to ``out``.

    ``ranks``: this process's place under torchrun (``training.distributed.from_env()``); every
    process runs this function, process 0 alone writes files and prints. ``files``: the command's
    :class:`~qalora.io.FileCache` (a base checkpoint it already read is not read or hashed again).

    Returns the adapter config written to ``out/adapter_config.json`` (method, rank, alpha,
    targets, group size, base fingerprint, trainable parameters, losses, speed, memory).
    """
    cfg, lora, ranks = cfg or TrainConfig(), lora or LoraConfig(), ranks or Ranks()
    progress = progress and ranks.main
    adir = Path(out).expanduser()
    if resume and not (adir / RUN_FILE).is_file():
        raise QaloraError(f"--resume {str(adir)!r}: no run to resume there (no {RUN_FILE})")
    if not resume and adir.exists():
        raise QaloraError(f"output {str(adir)!r} already exists; choose a new --out, or pass --resume to continue it")
    if not adir.parent.exists():
        raise QaloraError(f"the parent folder of output {str(adir)!r} does not exist")

    kinds = method_kinds(cfg.method, lora)  # refuses a switch the method does not take
    base = load_base(cfg.method, model, cfg.compute_dtype, files)
    identity = _run_identity(cfg, lora, base.sha256, ranks.world)
    if resume:
        _check_resume(adir, identity)
    data = load_train_data(cfg.data, base.tokenizer, cfg)  # validates data before any file is written

    torch.manual_seed(cfg.seed)
    net = base.model
    names = add_adapters(net, cfg.method, lora)
    device = torch.device(ranks.device if ranks.distributed else ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(device)  # the packed buffers and the adapters: training runs where the model is
    n_trainable = trainable_parameters(net)
    if cfg.grad_checkpointing:
        if hasattr(net, "activation_checkpointing_enable"):
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype_ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.compute_dtype == "bf16" else nullcontext
    rng_devices = [device] if device.type == "cuda" else []

    start = 0
    metrics = adir / "metrics.jsonl"
    ranks.barrier()  # every process has validated its inputs before process 0 writes anything
    ckpt = latest_checkpoint(adir) if resume else None
    if ckpt is not None:
        adapter, state = load_train_state(ckpt)
        load_adapter_state(net, adapter)  # whole tensors, before any sharding
        start = state["step"]
        if ranks.main:
            _truncate_metrics(metrics, start)
    elif ranks.main:
        adir.mkdir(exist_ok=resume)
        write_json(adir / RUN_FILE, {**identity, "base_path": base.path, "targets_wrapped": len(names),
                                     "processes": ranks.world})
        metrics.write_text("")
    # several processes: DDP over the adapter parameters, or FSDP2 sharding every parameter in place
    runner = wrap(net, ranks, cfg.parallel)
    sharded = ranks.distributed and cfg.parallel == "fsdp2"
    optim = Optimizers(net, cfg)  # after sharding: it holds the (sharded) parameters themselves
    if ckpt is not None:
        optim.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    if start >= cfg.steps:
        raise QaloraError(f"--resume {str(adir)!r}: the run already reached step {start}; ask for more --steps")

    if ranks.main:
        procs = f", {ranks.world} processes" if ranks.distributed else ""
        print(f"qalora train: method {cfg.method} ({'+'.join(kinds)}), {len(names)} adapters, {n_trainable:,} trainable "
              f"parameters, {data.n_train} train / {data.n_val} validation examples{procs}", flush=True)
    # the validation loss is process 0's alone (the others hold the same adapter), except under
    # FSDP2, where every forward needs every process
    validates = ranks.main or sharded
    val0 = validation_loss(net, data, dtype_ctx, device) if validates else float("nan")
    if start == 0 and ranks.main:
        _log(metrics, {"step": 0, "val_loss": val0})
    net.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.method}", disable=not progress)
    t_start, tokens_seen, last_good = time.time(), 0, start
    val = val0
    for step in range(start, cfg.steps):
        t0 = time.time()
        sb = _step_batches(data, step, cfg, ranks)
        loss_sum = 0.0
        for i, (k, batch) in enumerate(sb.micro):
            with torch.random.fork_rng(devices=rng_devices), no_sync(runner, last=i == len(sb.micro) - 1):
                torch.manual_seed(micro_seed(cfg.seed, k))
                loss = _token_loss_sum(runner, batch, dtype_ctx, device) / max(sb.tokens, 1)
                (loss * ranks.world).backward()  # DDP averages over processes: the sum of every token's loss
            loss_sum += float(loss.detach())
        loss_sum = ranks.sum(loss_sum)
        if not math.isfinite(loss_sum):
            bar.close()
            raise QaloraError(f"the loss became {loss_sum} at step {step + 1}; stopped. The last good checkpoint "
                              f"is step {last_good} in {str(adir / 'checkpoints')!r}; lower --lr or check the data")
        gnorm = optim.clip(cfg.max_grad_norm)
        optim.step()
        dt = time.time() - t0
        tokens_seen += sb.input_tokens
        rec = {"step": step + 1, "loss": loss_sum, "lr": optim.lr, "grad_norm": gnorm,
               "tokens": sb.tokens, "input_tokens": sb.input_tokens, "seconds": round(dt, 4)}
        if optim.ternary_changed is not None:
            rec["ternary_changed"] = optim.ternary_changed
        if ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps) and validates:
            val = rec["val_loss"] = validation_loss(net, data, dtype_ctx, device)
        if ranks.main:
            _log(metrics, rec)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            whole, optim_state = _whole_adapter_state(net), optim.state_dict()  # gathers: every process
            if ranks.main:
                save_train_state(adir, step + 1, whole, optim_state)
            last_good = step + 1
        bar.set_postfix(loss=f"{loss_sum:.3f}", val=f"{val:.3f}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}")
        bar.update(1)
    bar.close()
    elapsed = time.time() - t_start
    steps_run = cfg.steps - start
    state = _whole_adapter_state(net)
    config = {"method": cfg.method, "kinds": list(kinds), "rank": lora.rank,
              "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
              "lota_omega": _lota_omega(net), "lota_codes_only": lora.lota_codes_only, "modules": names,
              "group_size": base.group_size if cfg.method != "lora" else None,
              "base_bits": base.bits, "base_path": base.path, "base_sha256": base.sha256,
              **state_counts(state, ternary_parameter_names(net)), "steps": cfg.steps, "train_config": cfg.to_dict(),
              "compute": {"dtype": cfg.compute_dtype, "base_kernel": BASE_KERNELS[cfg.compute_dtype]},
              "val_loss_start": _first_val(metrics) if ranks.main else None, "val_loss_end": val,
              "processes": ranks.world,
              "seconds_per_step": elapsed / max(steps_run, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}
    if not ranks.main:
        ranks.barrier()  # returns once process 0 has written the adapter
        return config
    written = write_adapter(adir, state, config, files)
    ranks.barrier()
    return written


def _whole_adapter_state(net) -> dict:
    """:func:`adapter_state` with sharded tensors gathered whole (every process must call it)."""
    return {k: full(v) for k, v in adapter_state(net).items()}


def _lota_omega(net) -> float | None:
    return next((m.lota_omega for m in adapter_layers(net).values() if hasattr(m, "lota_omega")), None)


def _log(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _first_val(path: Path) -> float | None:
    for ln in path.read_text().splitlines():
        rec = json.loads(ln)
        if "val_loss" in rec:
            return rec["val_loss"]
    return None
