"""The lossy path of the baselines: merge a LoRA/QLoRA adapter in full precision, then quantize
again (the paper's "QLoRA w/ GPTQ" and "QLoRA w/ RTN").

For every adapted layer ``W' = W + s · B A`` in fp32, where ``W`` is the dense base weight
(``nn.Linear``) or the dequantized NF4 base; the dense model is then quantized to INTn with
RTN or GPTQ like any model. Post-training quantization loses accuracy, and the report says how
much: the adapted (unmerged, full-precision adapter) model vs the re-quantized one, on the same
prompts and kernels as the exact merge reports.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qalora.adapters.format import adapter_sha256, load_adapted, read_adapter_config
from qalora.adapters.kinds.lora import dense_delta
from qalora.adapters.layer import AdaptedLinear
from qalora.checkpoint import write_checkpoint
from qalora.config import QuantConfig
from qalora.errors import QaloraError
from qalora.io import atomic_dir, check_new_output, write_json
from qalora.merging.surgery import shared_copy
from qalora.merging.verify import verify_merge
from qalora.patch import set_submodule
from qalora.quant.model import quantize_model

REPORT_FILE = "merge_report.json"


def dense_base_weight(base: nn.Module) -> torch.Tensor:
    """``[out, in]`` fp32 weight of a frozen base: ``nn.Linear`` or any layer that dequantizes."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().float()
    if hasattr(base, "dequantized_weight"):
        return base.dequantized_weight(torch.float32)
    raise QaloraError(f"cannot take a dense weight from a {type(base).__name__}")


@torch.no_grad()
def dense_linear(base: nn.Module, delta: torch.Tensor | None = None) -> nn.Linear:
    """``nn.Linear`` with the base's dense fp32 weight (``+ delta``) and the base's bias."""
    w = dense_base_weight(base)
    if delta is not None:
        w = w + delta
    bias = getattr(base, "bias", None)
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None)
    out.weight.data = w.contiguous()
    if bias is not None:
        out.bias.data = bias.detach().float().clone()
    return out


def merge_lora_dense(layer: AdaptedLinear) -> nn.Linear:
    """``nn.Linear`` with ``W + s · B A`` (fp32) and the base's bias, for a ``lora``-kind layer."""
    if layer.kinds != ("lora",):
        raise QaloraError(f"{layer.name} holds {'+'.join(layer.kinds)} adapters; the dense merge takes LoRA only")
    return dense_linear(layer.base, dense_delta(layer))


def merge_dense(adapted: nn.Module) -> tuple[nn.Module, list[str]]:
    """``(dense, names)``: a copy of ``adapted`` (sharing its unadapted tensors) with every
    LoRA layer merged into an fp32 ``nn.Linear`` (``names``) and every NF4 layer without an
    adapter dequantized: the "merged in 16 bits" model of the LoRA/QLoRA baselines (kept in
    fp32 here). ``adapted`` itself is unchanged."""
    dense = shared_copy(adapted)  # shares every tensor; merging swaps modules, so ``adapted`` stays the reference
    names = [n for n, m in dense.named_modules() if isinstance(m, AdaptedLinear)]
    for n in names:
        set_submodule(dense, n, merge_lora_dense(dense.get_submodule(n)))
    for n, m in list(dense.named_modules()):
        if type(m).__name__ == "NF4Linear":
            set_submodule(dense, n, dense_linear(m))
    return dense, names


def requantize(model: str | os.PathLike | None, adapter_dir: str | os.PathLike, out: str | os.PathLike,
               config: QuantConfig, progress: bool = True) -> dict:
    """Merge a ``lora``/``qlora`` adapter into its full-precision (or NF4-dequantized) base and
    quantize the result to ``config`` (RTN or GPTQ); write a qalora checkpoint with a
    ``merge_report.json`` marked ``"lossy": true``. Returns the report."""
    from qalora.data.text import calibration_batch

    check_new_output(out)
    method = read_adapter_config(adapter_dir)["method"]
    if method not in ("lora", "qlora"):
        raise QaloraError(f"adapter {str(adapter_dir)!r} is a {method!r} adapter: it merges exactly "
                          "(qalora merge without --requantize)")
    adapted, tok, cfg = load_adapted(model, adapter_dir)
    dense, names = merge_dense(adapted)
    calib = None
    if config.method == "gptq":
        calib = calibration_batch(tok, n_samples=config.calib_samples, seq_len=config.calib_seq_len, seed=config.seed)
    qreport = quantize_model(dense, config, calib, progress=progress)
    verification = verify_merge(adapted, dense, tok)
    adir = Path(adapter_dir).expanduser()
    report = {**verification, "lossy": True, "requantize": config.method, "bits": config.bits,
              "group_size": config.group_size, "adapter_method": cfg["method"], "layers_merged": len(names),
              "adapter": str(adir), "adapter_sha256": adapter_sha256(cfg), "base": str(model),
              "base_sha256": cfg["base_sha256"]}
    meta = {"source_model": str(model), "quant_config": config.to_dict(), "bits": config.bits,
            "group_size": config.group_size, "method": config.method,
            "merged_adapter": {"path": str(adir), "method": cfg["method"], "rank": cfg["rank"], "alpha": cfg["alpha"],
                               "lossy": True},
            "report": {"layer_errors": qreport["layer_errors"], "seconds": qreport["seconds"]}}
    with atomic_dir(out) as tmp:
        write_checkpoint(dense, tok, tmp, meta)
        write_json(tmp / REPORT_FILE, report)
    if progress:
        ref = verification["reference"]
        print(f"qalora merge --requantize {config.method}: {cfg['method']} adapter merged in fp32 and quantized to "
              f"INT{config.bits} g{config.group_size} (LOSSY) into {str(out)!r}; vs the adapted model: "
              f"max |logit diff| {ref['max_abs_logit_diff']:.3g}, mean {ref['mean_abs_logit_diff']:.3g}, "
              f"top-1 {ref['top1_agreement']:.3f}")
    return report
