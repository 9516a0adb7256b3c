"""Head + cross entropy in row chunks, with the gradient of the hidden states computed in the
forward: the ``[N, vocab]`` logits never exist whole, in forward or backward.

For hidden states ``h [N, d]`` at the scored positions, a frozen head ``W [V, d]`` (bias ``b``)
and targets ``t [N]`` (``-100``: not scored)::

    z = h W^T + b                    # [n, V] per chunk of n rows, fp32
    loss = sum_i [t_i != -100] (logsumexp(z_i) - z_i[t_i])
    dloss/dh_i = (softmax(z_i) - onehot(t_i)) W     (0 for unscored rows)

Each chunk's logits are used for both and freed; what is kept for backward is ``dloss/dh``
(``[N, d]``, the size of ``h``). Backward scales it by the incoming gradient. The head gets no
gradient (it is frozen for every method: embeddings and ``lm_head`` are never adapter targets).
At 49,152 tokens of vocabulary and 1,020 scored positions, the whole-batch path holds the fp32
logits, their log-softmax and their gradient (~200 MB each); this one holds one chunk's.

Used by the trainer for a plain model in one process (``applies``); under DDP / FSDP2 the
forward must go through the wrapper, so the loss stays the head's logits + ``F.cross_entropy``.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 256


class FusedHeadCE(torch.autograd.Function):
    """``(h [N, d], weight [V, d], bias [V] | None, target [N]) -> summed cross entropy (fp32)``."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk: int):
        w = weight.float()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        for s in range(0, h.shape[0], chunk):
            z = h[s:s + chunk].float() @ w.t()                                     # [n, V]
            if bias is not None:
                z = z + bias.float()
            t = target[s:s + chunk]
            valid = t != -100
            tt = t.clamp_min(0)[:, None]                                           # [n, 1]
            lse = torch.logsumexp(z, dim=-1)                                       # [n]
            total = total + ((lse - z.gather(1, tt)[:, 0]) * valid).sum()
            if grad_h is not None:
                p = torch.exp(z.sub_(lse[:, None]))                                # softmax, in place of z
                p.scatter_add_(1, tt, -valid.float()[:, None])
                p.mul_(valid.float()[:, None])
                grad_h[s:s + chunk] = p @ w                                        # [n, d]
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_out * grad_h).to(ctx.h_dtype), None, None, None, None


def fused_head_ce(h: torch.Tensor, head: torch.nn.Linear, target: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross entropy of ``head(h)`` against ``target`` (``-100`` ignored); ``h [N, d]``."""
    return FusedHeadCE.apply(h, head.weight, head.bias, target, chunk)


def applies(model) -> bool:
    """Whether ``model`` can take this path: a plain transformers model (not a DDP / FSDP2 wrapper
    or another library's wrapper) with a frozen linear head and no logit soft-capping."""
    from transformers import PreTrainedModel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        FSDPModule = ()
    if not isinstance(model, PreTrainedModel) or isinstance(model, FSDPModule):
        return False
    head = model.get_output_embeddings()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return (type(head) is torch.nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad)
            and not getattr(cfg, "final_logit_softcapping", None) and model.get_decoder() is not None)
