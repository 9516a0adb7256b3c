"""Tests for qalora.eval.perplexity against a naive one-window-at-a-time reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_tokenizer

from qalora.data.text import heldout_texts
from qalora.errors import QaloraError
from qalora.eval.perplexity import PerplexityResult, perplexity

TRAIN_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a barn near a farm house, there lived a little white kitten.",
    "She said \"hello\" and he answered: 'goodbye', 1234567890!",
]


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(TRAIN_STRINGS, vocab_size=320)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer)).eval()


def naive_stream(tokenizer, texts) -> list[int]:
    """Reference token stream: each text tokenized alone, joined by eos."""
    out: list[int] = []
    for t in texts:
        if out:
            out.append(tokenizer.eos_token_id)
        out.extend(tokenizer.encode(t, add_special_tokens=False))
    return out


def naive_perplexity(model, windows: torch.Tensor) -> tuple[float, int]:
    """Reference: one window at a time, explicit log-softmax and gather of the next token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:                                        # w: [T]
            logits = model(w[None]).logits[0].float()            # [T, V]
            logp = torch.log_softmax(logits[:-1], dim=-1)        # [T-1, V] predicts tokens 1..T-1
            total -= logp.gather(1, w[1:, None]).sum().item()
            count += w.numel() - 1
    return math.exp(total / count), count


class OracleLM(torch.nn.Module):
    """Cheats by reading the next token: logits[:, t] = 50 * onehot(ids[:, t+1])."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], 50.0)
        return SimpleNamespace(logits=logits)


class UniformLM(torch.nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab_size))


def test_matches_naive_reference(model, tokenizer):
    seq_len, max_windows = 32, 6
    result = perplexity(model, tokenizer, seq_len=seq_len, max_windows=max_windows, batch_size=4, progress=False)
    stream = naive_stream(tokenizer, heldout_texts()[:20])  # 20 passages hold far more than 6 windows
    windows = torch.tensor(stream[: max_windows * seq_len]).view(max_windows, seq_len)
    ref_ppl, ref_count = naive_perplexity(model, windows)
    assert result.n_windows == max_windows and result.seq_len == seq_len
    assert result.n_tokens == ref_count == max_windows * (seq_len - 1)
    # rtol 1e-5: both are fp32; batched (4 + 2 windows) vs single-window matmuls and fused
    # cross_entropy vs log_softmax+gather differ only by fp32 rounding (~1e-7 relative per op).
    torch.testing.assert_close(result.perplexity, ref_ppl, rtol=1e-5, atol=0.0)
    assert result.perplexity == pytest.approx(math.exp(result.nll), rel=1e-12)


def test_random_model_is_finite_and_above_one(model, tokenizer):
    result = perplexity(model, tokenizer, seq_len=16, max_windows=2, progress=False)
    assert math.isfinite(result.perplexity) and result.perplexity > 1.0
    assert set(result.to_dict()) == {"perplexity", "nll", "n_tokens", "n_windows", "seq_len"}
    assert isinstance(result, PerplexityResult)


def test_oracle_scores_one_and_uniform_scores_vocab(tokenizer):
    """The shift is right: a model that sees the true next token gets ppl 1; uniform logits give V."""
    vocab = len(tokenizer)
    oracle = perplexity(OracleLM(vocab), tokenizer, seq_len=16, max_windows=3, progress=False)
    assert oracle.perplexity == pytest.approx(1.0, abs=1e-6)
    uniform = perplexity(UniformLM(vocab), tokenizer, seq_len=16, max_windows=3, progress=False)
    # rel 1e-5: log(V) through fp32 log-softmax
    assert uniform.perplexity == pytest.approx(vocab, rel=1e-5)


def test_custom_texts_and_fewer_windows_than_max(model, tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog."] * 3
    result = perplexity(model, tokenizer, texts, seq_len=8, max_windows=1000, progress=False)
    n_stream = 3 * len(tokenizer.encode(texts[0], add_special_tokens=False)) + 2
    assert result.n_windows == n_stream // 8
    assert result.n_tokens == result.n_windows * 7


def test_restores_training_mode(tokenizer):
    m = tiny_llama(len(tokenizer))
    m.train()
    perplexity(m, tokenizer, seq_len=8, max_windows=1, progress=False)
    assert m.training


@pytest.mark.parametrize("kwargs", [dict(seq_len=1), dict(max_windows=0), dict(batch_size=0)])
def test_bad_arguments(model, tokenizer, kwargs):
    with pytest.raises(QaloraError, match="must be an integer"):
        perplexity(model, tokenizer, ["some text"], progress=False, **kwargs)


def test_text_too_short_for_one_window(model, tokenizer):
    with pytest.raises(QaloraError, match="0 windows"):
        perplexity(model, tokenizer, ["hi"], seq_len=64, progress=False)
