"""Quantize a transformers model's linear layers in place: RTN, or GPTQ decoder layer by layer.

GPTQ runs one decoder layer at a time: the calibration activations entering layer ``i`` are
kept (``[n, T, hidden]``), each linear of the layer gets a Hessian ``H = 2/n Σ x xᵀ`` from
them, is quantized and swapped for a ``QuantLinear``, and the layer's *quantized* outputs
become layer ``i+1``'s inputs. Only one layer's activations and Hessians are alive at a time,
so memory does not grow with depth.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from qalora.config import QuantConfig
from qalora.errors import QaloraError
from qalora.patch import decoder_layers, find_linears, replacement_for, set_kernel, set_submodule
from qalora.quant.gptq import HessianAccumulator, gptq_quantize
from qalora.quant.qparams import check_group_size
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight


class _StopForward(Exception):
    """Raised by a hook to end a forward early once what it needed was seen."""


def check_model(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The layers to quantize; refuse a model with none, or a group size that does not fit one."""
    linears = find_linears(model, config.skip)
    if not linears:
        raise QaloraError(f"{type(model).__name__} has no linear layers to quantize "
                          f"(skipped: {', '.join(config.skip) or 'none'}); pass a decoder model with nn.Linear projections")
    for name, m in linears:
        check_group_size(config.group_size, m.in_features, name)
    return linears


def _quantize_weight(w: torch.Tensor, config: QuantConfig, name: str, hessian: torch.Tensor | None) -> QuantizedWeight:
    if hessian is None:
        codes, scale, offset = rtn_quantize(w, config.bits, config.group_size, name)
    else:
        codes, scale, offset = gptq_quantize(w, hessian, config.bits, config.group_size,
                                             damp=config.damp, block_size=config.block_size, name=name)
    return QuantizedWeight.from_codes(codes, scale, offset, config.bits, config.group_size)


def _relative_error(w: torch.Tensor, qw: QuantizedWeight, hessian: torch.Tensor | None) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (relative output error on the calibration inputs), or the
    relative Frobenius error without a Hessian."""
    w = w.float()
    d = w - qw.dequantize()
    if hessian is None:
        return float(d.norm() ** 2 / w.norm().clamp_min(1e-30) ** 2)
    return float(((d @ hessian) * d).sum() / ((w @ hessian) * w).sum().clamp_min(1e-30))


def _swap(root: nn.Module, name: str, linear: nn.Module, qw: QuantizedWeight) -> None:
    new = replacement_for(linear, qw)
    new.kernel = "reference"  # calibration runs many rows: the exact fp32 path is also the fast one
    set_submodule(root, name, new)


LayerLoader = Callable[[int, nn.Module], None]


def _target_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """The names of the layers to quantize, checked. Names, not modules: a module reference held
    through the run would keep its fp32 weight alive after the swap."""
    return [n for n, _ in check_model(model, config)]


def _rtn_one(model: nn.Module, name: str, config: QuantConfig, errors: dict[str, float]) -> None:
    """RTN of the linear ``name`` of ``model``, swapped for its ``QuantLinear``; its error recorded."""
    m = model.get_submodule(name)
    qw = _quantize_weight(m.weight.data, config, name, None)
    errors[name] = _relative_error(m.weight.data, qw, None)
    _swap(model, name, m, qw)


def _stack(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layers and their qualified name (``model.layers``)."""
    layers = decoder_layers(model)
    return layers, next(n for n, m in model.named_modules() if m is layers)


@torch.no_grad()
def quantize_rtn(model: nn.Module, config: QuantConfig, progress: bool = True,
                 load_layer: LayerLoader | None = None) -> dict[str, float]:
    """Min-max RTN of every target linear; returns ``{name: relative weight error}``.

    With ``load_layer(i, layer)`` (see ``qalora.quant.streaming``) the decoder layers start empty
    and each is read just before its linears are quantized: one fp32 layer alive at a time."""
    names = _target_names(model, config)
    errors: dict[str, float] = {}
    with tqdm(total=len(names), desc="rtn", disable=not progress) as bar:
        if load_layer is not None:
            layers, prefix = _stack(model)
            for i, layer in enumerate(layers):
                load_layer(i, layer)
                for n in names:
                    if n.startswith(f"{prefix}.{i}."):
                        _rtn_one(model, n, config, errors)
                        bar.update(1)
        for n in names:
            if n not in errors:  # all of them when fully loaded; else the linears outside the stack
                _rtn_one(model, n, config, errors)
                bar.update(1)
    return errors


def _layer_out(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, calib: torch.Tensor, batch_size: int,
                         progress: bool = True) -> list[tuple[torch.Tensor, dict]]:
    """Run the model up to its first decoder layer on ``calib [n, T]`` and keep what enters it:
    per batch, ``hidden [b, T, hidden]`` (fp32) and the layer's keyword arguments."""
    captured = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach().float(), kwargs))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in tqdm(range(0, calib.shape[0], batch_size), desc="calibration inputs", disable=not progress):
            try:
                model(input_ids=calib[i:i + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _call_groups(layer: nn.Module, linears: list[tuple[str, nn.Module]], x: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linears in execution order, consecutive calls on the very same input tensor grouped
    (q/k/v; o; gate/up; down for Llama), found by one forward on the first sequence."""
    calls: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their identity unambiguous
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: calls.append((n, inp[0]))) for n, m in linears]
    try:
        _layer_out(layer, x[:1], {k: (v[:1] if torch.is_tensor(v) and v.shape[:1] == x.shape[:1] else v)
                                  for k, v in kwargs.items()})
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    done: set[str] = set()
    prev = None
    for n, inp in calls:
        if n in done:
            continue
        if groups and inp is prev:
            groups[-1].append(n)
        else:
            groups.append([n])
        done.add(n)
        prev = inp
    missed = [n for n, _ in linears if n not in done]
    return groups + ([missed] if missed else [])


@torch.no_grad()
def _hessians(layer: nn.Module, modules: dict[str, nn.Module], inputs: list[tuple[torch.Tensor, dict]]
              ) -> dict[str, torch.Tensor]:
    """Each module's input Hessian over all batches. Modules called on the very same input
    tensor (q/k/v) share one accumulator; each forward stops as soon as the last module of the
    group has run."""
    accs: dict[str, HessianAccumulator] = {}
    owner: dict[str, str] = {}       # module -> module whose accumulator holds its inputs
    seen: set[str] = set()
    last: list = [None, None]        # (input tensor, its owner) of the previous call

    def hook(mod, inp, out, n):
        x = inp[0]
        if x is last[0]:
            owner[n] = last[1]
        else:
            owner[n] = n
            accs.setdefault(n, HessianAccumulator(mod.in_features)).add(x)
            last[0], last[1] = x, n
        seen.add(n)
        if len(seen) == len(modules):
            raise _StopForward

    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: hook(mod, inp, out, n)) for n, m in modules.items()]
    try:
        for x, kw in inputs:
            seen.clear()
            last[0] = last[1] = None
            try:
                _layer_out(layer, x, kw)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in modules if n not in owner]
    if missing:
        raise QaloraError(f"{missing[0]} received no calibration inputs; it cannot be quantized with GPTQ (use method 'rtn')")
    return {n: accs[owner[n]].hessian for n in modules}


def _gptq_layer(layer: nn.Module, prefix: str, targets: set[str], inputs: list[tuple[torch.Tensor, dict]],
                config: QuantConfig, errors: dict[str, float], bar) -> list[tuple[torch.Tensor, dict]]:
    """GPTQ of the target linears of one decoder layer (qualified names start with ``prefix.``),
    in call order when ``config.true_sequential``; returns the layer's quantized outputs, the next
    layer's inputs. Its fp32 weights are referenced only in here."""
    layer.float()
    linears = [(n, m) for n, m in find_linears(layer, config.skip, prefix=prefix) if n in targets]
    local = {n: n[len(prefix) + 1:] for n, _ in linears}
    groups = _call_groups(layer, linears, *inputs[0]) if config.true_sequential else [[n for n, _ in linears]]
    for group in groups:
        modules = {n: layer.get_submodule(local[n]) for n in group}
        for n, h in _hessians(layer, modules, inputs).items():
            w = modules[n].weight.data
            qw = _quantize_weight(w, config, n, h)
            errors[n] = _relative_error(w, qw, h)
            _swap(layer, local[n], modules[n], qw)
            bar.update(1)
    return [(_layer_out(layer, x, kw), kw) for x, kw in inputs]


@torch.no_grad()
def quantize_gptq(model: nn.Module, config: QuantConfig, calib: torch.Tensor, progress: bool = True,
                  load_layer: LayerLoader | None = None) -> dict[str, float]:
    """GPTQ decoder layer by decoder layer on calibration token ids ``calib [n, T]``; returns
    ``{name: relative output error on the calibration inputs}``. Target linears outside the
    decoder layers (rare) fall back to RTN. With ``load_layer``, layer ``i`` is read only when
    its turn comes (the calibration forward stops before the first, still empty, layer)."""
    names = _target_names(model, config)
    wanted = set(names)
    layers, prefix = _stack(model)
    inputs = capture_layer_inputs(model, layers[0], calib, config.calib_batch_size, progress)
    errors: dict[str, float] = {}
    with tqdm(total=len(names), desc=f"gptq int{config.bits} g{config.group_size}", disable=not progress) as bar:
        for i, layer in enumerate(layers):
            if load_layer is not None:
                load_layer(i, layer)
            inputs = _gptq_layer(layer, f"{prefix}.{i}", wanted, inputs, config, errors, bar)
    for n in names:
        if n not in errors:  # linears outside the decoder stack
            _rtn_one(model, n, config, errors)
    return errors


def quantize_model(model: nn.Module, config: QuantConfig, calib: torch.Tensor | None = None,
                   progress: bool = True, load_layer: LayerLoader | None = None) -> dict:
    """Quantize ``model`` in place (``QuantLinear`` replaces each target ``nn.Linear``).

    Args:
        calib: GPTQ calibration token ids ``[n, T]`` (required for ``method="gptq"``).
        load_layer: ``load(i, layer)`` reading decoder layer ``i`` into a model whose layers
            start empty (``qalora.quant.streaming``); ``None`` when the model is fully loaded.
    Returns:
        a report: ``{"method", "bits", "group_size", "seconds", "layer_errors": {name: err}}``.
    """
    t0 = time.time()
    model.eval()
    if config.method == "gptq":
        if calib is None:
            raise QaloraError("method 'gptq' needs calibration token ids; pass calib=[n, T] or use method 'rtn'")
        errors = quantize_gptq(model, config, calib, progress, load_layer)
    else:
        errors = quantize_rtn(model, config, progress, load_layer)
    set_kernel(model, "auto")  # calibration ran on the exact fp32 path; inference picks the fastest
    return {"method": config.method, "bits": config.bits, "group_size": config.group_size,
            "seconds": round(time.time() - t0, 2), "layer_errors": errors}
