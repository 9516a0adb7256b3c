"""Verification of a merge: does the merged model compute what the adapted one computed?

Three measurements, all on the same fixed prompts:

* **weights** (fp64, per layer) — the merged dequantized weight against the adapted layer's
  effective weight, read off the adapted layer's own forward (not the merge's code): the layer in
  fp64 applied to the identity matrix, bias removed::

      W_eff       = (layer(I_in) - bias)^T                           # [out, in], every kind
      err[o, i]   = |W_merged[o, i] - W_eff[o, i]|  /  ulp_fp32(offset'[o, g])     g = i // L

  An exact merge leaves only the rounding of ``offset'`` to fp32: ``err <= 0.5`` ulp (codes
  are integers and merged scales are the fp32 values the layer computes with).
* **logits** — ``compare_logits`` on the fp32 reference kernel (the exactness figure) and on
  the int4 bf16 kernel (what runtimes execute).
* **fp32 storage floor** — how far the merged model's fp64 logits move when every offset moves
  by a random fraction of its fp32 ulp: the resolution of fp32-stored offsets on this model.
  The fp64 merge error is held to ``max(tolerance, FLOOR_FACTOR * storage floor)``.
* **fp32 noise floor** — max |logits_fp32 - logits_fp64| of the *unmerged* model: how far two
  fp32 evaluations of one function can drift on these prompts — on SmolLM2-135M about 1e-4, so
  an fp32 comparison cannot resolve a merge error below that. ``fp64_max_abs_logit_diff`` (both
  models run in fp64) measures the merge itself; the fp32 figure is held to
  ``auto_tolerance`` (a multiple of the floor).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qalora.errors import QaloraError
from qalora.kernels.int4 import int4_supports
from qalora.adapters.layer import AdaptedLinear
from qalora.nn.quant_linear import QuantLinear
from qalora.patch import quant_layers, set_kernel

# Short, tokenizer-agnostic texts; each is run alone (no padding), so no attention mask matters.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Question: What do bees make?\nAnswer:",
    "def add(a, b):\n    return",
    "Quantized weights keep a scale and an offset for every group of",
)

# kernel -> dtype its matmuls run in (reported beside the logit differences)
VERIFY_KERNELS = {"reference": "fp32", "int4": "bf16"}


@contextlib.contextmanager
def on_kernel(kernel: str, *models: nn.Module):
    """``models`` in eval mode with every ``QuantLinear`` on ``kernel`` inside the block; each
    layer's kernel and each model's train/eval mode are restored afterwards, and repacked weights
    a layer built for ``kernel`` inside the block are dropped (the int4 layout of two whole models
    would otherwise stay alive through the rest of the merge)."""
    saved = [(q, q.kernel, q.has_kernel_state(kernel)) for m in models for q in quant_layers(m).values()]
    modes = [(m, m.training) for m in models]
    try:
        for m in models:
            m.eval()
            set_kernel(m, kernel)
        yield
    finally:
        for q, k, had in saved:
            q.kernel = k
            if not had:
                q.drop_kernel_state(kernel)
        for m, training in modes:
            m.train(training)


def fp32_ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the fp32 numbers at ``|t|`` (``t`` rounded to fp32 first), as fp32."""
    a = t.float().abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


@torch.no_grad()
def _prompt_logits(model: nn.Module, tokenizer, prompts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[n_tokens, vocab]`` logits (in ``dtype``) of every prompt, run one by one without padding."""
    device = next(model.parameters()).device
    rows = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")["input_ids"].to(device)   # [1, T]
        if ids.shape[1] == 0:
            raise QaloraError(f"prompt {p!r} tokenizes to nothing; pass non-empty prompts")
        rows.append(model(input_ids=ids, use_cache=False).logits[0].to(dtype))  # [T, vocab]
    return torch.cat(rows)


def _kernel_supported(model: nn.Module, kernel: str) -> bool:
    if kernel != "int4":
        return True
    device = next(model.parameters()).device
    return all(int4_supports(m, device) for m in quant_layers(model).values())


def compare_logits(unmerged: nn.Module, merged: nn.Module, tokenizer, prompts=DEFAULT_PROMPTS,
                   kernel: str = "reference") -> dict | None:
    """Logits of both models with every ``QuantLinear`` on ``kernel``; ``None`` when a layer of
    either model cannot run it. Kernels and train/eval modes are restored afterwards.

    Returns ``{"max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement", "n_tokens",
    "compute_dtype", "kernel"}`` over all prompt positions.
    """
    if kernel not in VERIFY_KERNELS:
        raise QaloraError(f"kernel {kernel!r} cannot verify a merge; use one of {', '.join(VERIFY_KERNELS)}")
    if not (_kernel_supported(unmerged, kernel) and _kernel_supported(merged, kernel)):
        return None
    with on_kernel(kernel, unmerged, merged):
        a, b = (_prompt_logits(model, tokenizer, prompts) for model in (unmerged, merged))
    diff = (a - b).abs()
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "n_tokens": int(a.shape[0]),
            "compute_dtype": VERIFY_KERNELS[kernel], "kernel": kernel}


def verify_merge(unmerged: nn.Module, merged: nn.Module, tokenizer, prompts=DEFAULT_PROMPTS,
                 kernels: tuple[str, ...] = ("reference", "int4")) -> dict:
    """``{kernel: compare_logits(...) or None}`` for each kernel: ``reference`` (fp32, the exactness
    check) and ``int4`` (bf16 tinygemm, what runtimes execute; ``None`` where unsupported)."""
    return {k: compare_logits(unmerged, merged, tokenizer, prompts, k) for k in kernels}


# ---------------------------------------------------------------------------------------------
# fp64 checks
# ---------------------------------------------------------------------------------------------

# Default merge tolerance (fp64 logits); the fp32 figure may reach FLOOR_FACTOR x the fp32 noise floor.
MIN_TOLERANCE = 1e-4
FLOOR_FACTOR = 4.0
# An exact merge rounds each offset once: at most half an ulp (plus fp64 slack in the check).
MAX_WEIGHT_ULPS = 0.5 + 1e-6


@torch.no_grad()
def effective_weight(adapted: AdaptedLinear) -> torch.Tensor:
    """``[out, in]`` fp64: what ``adapted`` multiplies its input by, from its own forward in fp64
    (identity input, bias removed). Every parameter and buffer is restored afterwards."""
    with float64(adapted):
        eye = torch.eye(adapted.in_features, dtype=torch.float64, device=adapted.base.qweight.device)
        y = adapted(eye)                                                                  # [in, out]
        if adapted.base.bias is not None:
            y = y - adapted.base.bias
        return y.t().contiguous()


@torch.no_grad()
def layer_weight_error(adapted: AdaptedLinear, merged: QuantLinear) -> tuple[float, float]:
    """``(max abs error, max error in ulps of the fp32 merged offset)`` of one merged layer, fp64."""
    L = adapted.group_size
    w_eff = effective_weight(adapted)                                                    # [out, in]
    err = (merged.dequantized_weight(torch.float64) - w_eff).abs()                       # [out, in]
    ulp = fp32_ulp(merged.offset).double()                                               # [out, G]
    ulps = err / ulp.repeat_interleave(L, dim=1)
    return float(err.max()), float(ulps.max())


def weight_errors(adapted: nn.Module, merged: nn.Module, names: list[str]) -> dict:
    """Worst :func:`layer_weight_error` over the merged layers ``names``."""
    worst_abs, worst_ulps, where = 0.0, 0.0, None
    for n in names:
        a, u = layer_weight_error(adapted.get_submodule(n), merged.get_submodule(n))
        worst_abs = max(worst_abs, a)
        if u >= worst_ulps:
            worst_ulps, where = u, n
    return {"max_abs_weight_err": worst_abs, "max_weight_err_ulps": worst_ulps, "worst_layer": where,
            "compute_dtype": "fp64"}


@contextlib.contextmanager
def float64(*models: nn.Module):
    """Every floating parameter and buffer of ``models`` in fp64 inside the block, restored to its
    own dtype afterwards (exact: fp32 -> fp64 -> fp32 round-trips); reference kernel inside."""
    tensors = {id(t): t for m in models for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()}
    dtypes = {k: t.dtype for k, t in tensors.items()}
    try:
        for t in tensors.values():
            t.data = t.data.to(torch.float64)
        with on_kernel("reference", *models):
            yield
    finally:
        for k, t in tensors.items():
            t.data = t.data.to(dtypes[k])


@torch.no_grad()
def _nudge_offsets(model: nn.Module, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Add ``u * ulp_fp32(offset)``, ``u ~ U(-1/2, 1/2)`` (seeded), to every ``QuantLinear``
    offset of ``model`` in place (fp64 offsets: inside :func:`float64`); returns what to restore."""
    g = torch.Generator().manual_seed(seed)
    saved = []
    for q in quant_layers(model).values():
        off = q.offset
        ulp = fp32_ulp(off).to(off.dtype)
        saved.append((off, off.detach().clone()))
        off.add_((torch.rand(off.shape, generator=g, dtype=torch.float64).to(off.dtype) - 0.5) * ulp)
    return saved


def fp64_checks(unmerged: nn.Module, merged: nn.Module, tokenizer, prompts=DEFAULT_PROMPTS) -> dict:
    """Three max |logit difference| figures over ``prompts``:

    * ``fp32_noise_floor``: the unmerged model in fp32 vs fp64 (arithmetic noise);
    * ``fp64_max_abs_logit_diff``: merged vs unmerged, both in fp64 — the merge's own error,
      i.e. what rounding the merged offsets to fp32 did;
    * ``fp32_storage_floor``: the merged model in fp64 vs itself with every offset moved by a
      random fraction (-1/2 … 1/2) of its fp32 ulp — how much the logits move under changes no
      fp32-stored offset can resolve. A merge that rounds each offset once sits at this level.

    Costs an fp64 copy of the weights."""
    with on_kernel("reference", unmerged, merged):
        fp32 = _prompt_logits(unmerged, tokenizer, prompts)
        with float64(unmerged, merged):
            a = _prompt_logits(unmerged, tokenizer, prompts, torch.float64)
            b = _prompt_logits(merged, tokenizer, prompts, torch.float64)
            restore = _nudge_offsets(merged)
            try:
                c = _prompt_logits(merged, tokenizer, prompts, torch.float64)
            finally:
                for t, v in restore:
                    t.copy_(v)
    return {"fp32_noise_floor": float((fp32.double() - a).abs().max()),
            "fp64_max_abs_logit_diff": float((a - b).abs().max()),
            "fp32_storage_floor": float((c - b).abs().max())}


def auto_tolerance(noise_floor: float | None, tolerance: float = MIN_TOLERANCE) -> float:
    """Allowed fp32 max |logit difference|: ``max(tolerance, FLOOR_FACTOR * noise_floor)``;
    ``tolerance`` when no floor was measured."""
    return tolerance if noise_floor is None else max(tolerance, FLOOR_FACTOR * noise_floor)
