"""``decode``: the token loop of ``qalora generate`` / ``qalora.generate``.

For prompts ``ids [B, T]`` (no padding: every row the same length) and ``N = max_new_tokens``:

1. prefill: one forward over ``ids`` into the KV cache (with ``compile``, a preallocated
   ``StaticCache`` of ``T + N`` rounded up to ``step.CACHE_BLOCK``, so every step has the same
   shapes; else a ``DynamicCache``), logits of the last position only;
2. ``N - 1`` one-token steps, each ``logits [B, V] = step(token [B, 1], position [B, 1], cache)``
   with every quantized layer's kernel bound (``step.bound_kernels``), eager or compiled;
3. the next token of each row is ``sampling.choose(logits)``: the argmax (greedy), or a draw
   with temperature / top-k / top-p from a generator of the call's own. Before
   ``min_new_tokens`` tokens eos is suppressed; a row that has emitted eos emits eos after it,
   and the loop stops once every row has.

Greedy tokens equal ``model.generate(do_sample=False)``'s for the same kernel (the logits of
every step are the same computation; a test checks the tokens on the fp32 reference kernel).
"""

from __future__ import annotations

import torch

from qalora.config import DecodeConfig
from qalora.decode.sampling import choose, suppress
from qalora.decode.step import bound_kernels, cache_for, compiled_step, eager_step
from qalora.errors import QaloraError


def _eos_ids(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def decode(model, ids: torch.Tensor, config: DecodeConfig | None = None, *, eos_token_id=None,
           min_new_tokens: int = 0, streamer=None) -> torch.Tensor:
    """Generated tokens ``[B, n]`` (``n <= config.max_new_tokens``) continuing ``ids [B, T]``.

    ``eos_token_id``: an id or ids that end a sequence (``None``: run to ``max_new_tokens``);
    ``streamer``: a transformers streamer (``put`` the prompt, then each token of row 0; ``end``).
    """
    config = config or DecodeConfig()
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise QaloraError(f"decode needs prompt ids of shape [batch, tokens] with tokens >= 1; got {tuple(ids.shape)}")
    if not 0 <= min_new_tokens <= config.max_new_tokens:
        raise QaloraError(f"min_new_tokens {min_new_tokens!r} must be in [0, max_new_tokens = {config.max_new_tokens}]")
    eos = _eos_ids(eos_token_id)
    device = next(model.parameters()).device
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    ids = ids.to(device)
    batch, prompt_len = ids.shape
    generator = None
    if config.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed if config.seed is not None else int(torch.randint(2**62, ()).item()))
    step = compiled_step(model) if config.compile else eager_step(model)
    if streamer is not None:
        streamer.put(ids[0].cpu())
    out = []
    with torch.inference_mode():
        cache = cache_for(model, batch, prompt_len + config.max_new_tokens, static=config.compile)
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # [B, V]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        with bound_kernels(model, batch):
            for i in range(config.max_new_tokens):
                if i < min_new_tokens:
                    logits = suppress(logits, eos)
                nxt = choose(logits, config.temperature, config.top_k, config.top_p, generator)  # [B, 1]
                if eos:
                    nxt = torch.where(done[:, None], torch.full_like(nxt, eos[0]), nxt)
                    done |= torch.isin(nxt[:, 0], eos_t)
                out.append(nxt)
                if streamer is not None:
                    streamer.put(nxt[0].cpu())
                if i + 1 == config.max_new_tokens or bool(done.all()):
                    break
                position = torch.full((batch, 1), prompt_len + i, dtype=torch.long, device=device)
                logits = step(nxt, position, cache)
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)
