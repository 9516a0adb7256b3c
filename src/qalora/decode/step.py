"""The one-token decode step, its preallocated KV cache, and the kernels bound for it.

``bound_kernels(model, rows)`` binds every ``QuantLinear`` to the kernel (and prepared state) it
uses for ``rows`` input rows, so the hot path does no per-call selection or cache-key work; the
step function is either the model's eager forward or the same forward compiled by
``torch.compile`` (``dynamic=False``: every decode step has the same shapes, because the cache is
preallocated). Both live on the model object (``_qalora_decode``), never in a global.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from qalora.nn.quant_linear import QuantLinear

CACHE_BLOCK = 256  # cache lengths are rounded up to this, so a compiled step is reused across prompts


@contextmanager
def bound_kernels(model, rows: int):
    """Bind every ``QuantLinear`` of ``model`` for ``rows``-row no-grad calls while inside."""
    device = next(model.parameters()).device
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        for m in layers:
            m.bind_kernel(rows, device)
        yield
    finally:
        for m in layers:
            m.unbind_kernel()


def _state(model) -> dict:
    state = model.__dict__.get("_qalora_decode")
    if state is None:
        state = {"caches": {}, "compiled": None}
        model.__dict__["_qalora_decode"] = state
    return state


def cache_for(model, batch: int, length: int, static: bool):
    """The KV cache of one decode call. ``static``: a ``StaticCache`` for ``batch`` sequences of
    at least ``length`` tokens, reset, reused across calls of the same batch and length block (a
    compiled step keeps its shapes; attention then spans the whole block, masked). Otherwise a
    ``DynamicCache`` (attention spans the tokens so far: the cheaper choice for the eager step)."""
    from transformers import DynamicCache, StaticCache

    if not static:
        return DynamicCache(config=model.config)
    size = -(-length // CACHE_BLOCK) * CACHE_BLOCK
    caches = _state(model)["caches"]
    key = (batch, size)
    cache = caches.get(key)
    if cache is None:
        caches.clear()  # one cache at a time: a cache holds [layers, batch, heads, size, dim] twice
        cache = caches[key] = StaticCache(config=model.config, max_cache_len=size)
    else:
        cache.reset()
    return cache


def eager_step(model):
    """``(ids [B, 1], position_ids [B, 1], cache) -> logits [B, V]`` of the next position."""
    def step(ids, position_ids, cache):
        return model(input_ids=ids, position_ids=position_ids, cache=cache, use_cache=True).logits[:, -1]
    return step


def compiled_step(model):
    """``eager_step`` compiled once per model (``torch.compile``, static shapes); kept on the model."""
    state = _state(model)
    if state["compiled"] is None:
        state["compiled"] = torch.compile(eager_step(model), dynamic=False)
    return state["compiled"]
