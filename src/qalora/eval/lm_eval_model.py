"""lm-evaluation-harness (0.4.x) model ``qalora``: a qalora checkpoint (or a full-precision HF
folder, or ``"default"``, the embedded model), optionally with a trained adapter, as an
``lm_eval.api.model.LM``.

Importing this module registers the model name ``qalora`` with lm-eval. lm-eval 0.4.13 finds
models only in its own registry (it reads no entry points of other packages), so the module
must be imported in the evaluating process: ``qalora-lm-eval`` (lm-eval's own command line with
this module imported first) or, in Python::

    import lm_eval
    from qalora.eval.lm_eval_model import QaloraLM

    lm = QaloraLM(path="q3", adapter=None, kernel="auto", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["piqa"])

The three request types, as lm-eval's ``HFLM`` computes them:

* ``loglikelihood((context, continuation))``: trailing whitespace of the context moves to the
  continuation, then :func:`qalora.eval.scoring.loglikelihoods` gives
  ``sum_j log p(y_j | c, y_<j)`` and the greedy flag (left truncation to ``max_length``).
* ``loglikelihood_rolling((text,))``: ``log p(text)`` conditioned on the prefix token (bos, else
  eos), scored over lm-eval's disjoint rolling windows of ``max_length`` tokens
  (``get_rolling_token_windows(..., context_len=1)`` + ``make_disjoint_window``), so every token
  is predicted exactly once; the windows are batched through :func:`score_tokens`.
* ``generate_until((context, gen_kwargs))``: greedy ``model.generate`` per request (no padding,
  so a result never depends on its batch), stopped by lm-eval's multi-token stop criteria at any
  ``until`` string or eos, at most ``max_gen_toks`` new tokens, then cut at the first stop
  string. The context keeps its last ``max_length - max_gen_toks`` tokens.

Text is tokenized without added special tokens everywhere (as :mod:`qalora.eval.scoring`).
HFLM uses the tokenizer's default instead: the same for GPT-2-style tokenizers such as the
embedded SmolLM2's, but a tokenizer that prepends bos by default (Llama's) scores differently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from qalora.api import load_model_and_tokenizer
from qalora.errors import QaloraError
from qalora.eval.scoring import loglikelihoods, score_tokens

try:
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models; see below)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text,
                                      resolve_max_length)
    from lm_eval.models.utils_hf import stop_sequences_criteria
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the environment
    raise QaloraError(f"the lm-eval model needs lm-evaluation-harness 0.4.x ({e}); "
                      "run: pip install 'qalora[lm-eval]'") from e

# lm_eval.api.registry.get_model imports lm_eval.models (which registers "hf" and the others)
# only while the registry is empty: registering "qalora" first would hide every stock model,
# hence the import of lm_eval.models above.

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default


def split_like_lm_eval(context: str, continuation: str) -> tuple[str, str]:
    """``(context, continuation)`` with all trailing whitespace of the context moved to the
    continuation (lm-eval's ``_encode_pair``: ``"Answer:\\n", "B"`` -> ``"Answer:", "\\nB"``)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def rolling_windows(token_ids: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows ``(context_ids, target_ids)`` over ``token_ids``.

    Each target token appears in exactly one window; the first window is conditioned on
    ``prefix_id``, later ones on up to ``max_length + 1 - len(target)`` preceding tokens, so
    ``len(context) + len(target) <= max_length + 1`` (one forward pass of ``max_length``).
    An empty text gives no window.
    """
    windows = get_rolling_token_windows(token_list=list(token_ids), prefix_token=prefix_id,
                                        max_seq_len=max_length, context_len=1)
    return [make_disjoint_window(w) for w in windows]


def parse_batch_size(batch_size: int | str | None) -> int:
    """An integer batch size >= 1 from a model argument or ``--batch_size`` (a string there)."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, str) and batch_size.strip().isdigit():
        batch_size = int(batch_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QaloraError(f"batch_size {batch_size!r} is not supported by the qalora model; "
                          "pass an integer >= 1, e.g. --batch_size 8 (no 'auto')")
    return batch_size


def resolve_device(device: str | None) -> str:
    """``device``, or cuda when available, else cpu; a cuda request without CUDA falls back to
    cpu with a warning (lm-eval's command line asks for ``cuda:0`` unless told otherwise)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available; using cpu", device)
        return "cpu"
    return str(device)


def postprocess(text: str, until: Sequence[str]) -> str:
    """``text`` cut before the first occurrence of each stop string (HFLM's post-processing)."""
    return postprocess_generated_text(generation=text, stop=list(until), think_end_token=None)


@register_model("qalora")
class QaloraLM(LM):
    """A qalora checkpoint as an lm-eval model (see the module docstring for the math).

    Args (all are lm-eval ``--model_args`` keys):
        path: qalora checkpoint folder, full-precision HF folder, or ``"default"``.
        adapter: optional adapter folder from ``qalora train`` (attached unmerged).
        kernel: ``auto``, ``int4`` or ``reference`` matmul for the quantized layers.
        batch_size: requests per forward pass for scoring (an integer; on the command line use
            ``--batch_size``, which lm-eval always passes).
        max_length: context window in tokens; default from the model config (as HFLM).
        device: ``cpu`` or ``cuda``; default cuda when available (on the command line use
            ``--device``).
        max_gen_toks: default generation budget when a request does not set one.
        max_batch_size: accepted for lm-eval's interface and ignored (no automatic batch size).
    """

    def __init__(self, path: str | os.PathLike = "default", adapter: str | os.PathLike | None = None,
                 kernel: str = "auto", batch_size: int | str | None = None, max_length: int | None = None,
                 device: str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 max_batch_size: int | None = None) -> None:
        super().__init__()

        self._batch_size = parse_batch_size(batch_size)
        for name, value in (("max_length", max_length), ("max_gen_toks", max_gen_toks)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise QaloraError(f"{name} must be an integer >= 1, got {value!r}")
        self._device = torch.device(resolve_device(device))
        self.model, self.tokenizer = load_model_and_tokenizer(path, kernel=kernel, device=str(self._device),
                                                              adapter=adapter)
        self.model.eval()
        self._max_length = max_length or resolve_max_length(self.model.config, self.tokenizer)
        self._max_gen_toks = max_gen_toks
        self._name = str(path)

    # ------------------------------------------------------------------ properties

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: bos, else eos (as HFLM)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request (``Instance.args``)."""

        pairs = [split_like_lm_eval(*req.args) for req in requests]
        scored = loglikelihoods(self.model, self.tokenizer, pairs, batch_size=self.batch_size,
                                max_length=self.max_length, progress=not disable_tqdm, desc="loglikelihood")
        out = [(s.loglik, s.is_greedy) for s in scored]
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """``log p(text | prefix token)`` per request, summed over disjoint rolling windows."""

        windows, owners = [], []
        for i, req in enumerate(requests):
            for window in rolling_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length):
                windows.append(window)
                owners.append(i)
        scored = score_tokens(self.model, windows, batch_size=self.batch_size, max_length=self.max_length,
                              progress=not disable_tqdm, desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, s in zip(owners, scored):
            totals[i] += s.loglik
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first ``until`` string or eos."""
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            text = self.generate_one(context, gen_kwargs)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """One ``generate_until`` request: greedy decoding of at most ``max_gen_toks`` tokens."""
        kwargs = normalize_gen_kwargs(gen_kwargs or {}, self.max_gen_toks)
        if kwargs.get("do_sample"):
            raise QaloraError(f"the qalora lm-eval model decodes greedily; got do_sample=True in {gen_kwargs!r} "
                              "(set do_sample=False or temperature=0)")
        eos = self.tokenizer.decode([self.tokenizer.eos_token_id], skip_special_tokens=False) \
            if self.tokenizer.eos_token_id is not None else None
        until = handle_stop_sequences(kwargs["until"], eos=eos)
        max_new = kwargs["max_gen_toks"]
        if max_new >= self.max_length:
            raise QaloraError(f"max_gen_toks {max_new} must be below max_length {self.max_length}")
        ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
        inputs = torch.tensor([ids], device=self._device)                     # [1, T]
        criteria = stop_sequences_criteria(self.tokenizer, until, inputs.shape[1], 1)
        with torch.inference_mode():
            seq = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new,
                                      do_sample=False, stopping_criteria=criteria,
                                      pad_token_id=self.tokenizer.pad_token_id
                                      if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id)
        text = self.tokenizer.decode(seq[0, inputs.shape[1]:].tolist(), skip_special_tokens=True)
        return postprocess(text, until)

    # ------------------------------------------------------------------ chat templates

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer for lm-eval's request cache."""
        return str(getattr(self.tokenizer, "name_or_path", "") or self._name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template when ``--apply_chat_template`` is given, else None."""
        if not chat_template:
            return None
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise QaloraError(f"the tokenizer of {self._name!r} has no chat template; drop --apply_chat_template")
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the tokenizer's chat template (as text)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)
