"""Shared fixtures: a tiny random Llama (+ tokenizer) that runs in milliseconds, and the
embedded SmolLM2-135M-Instruct folder (converted once per machine into the user cache)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

TINY_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a quantized model keeps its weights in few bits",
    "low rank adapters learn a small update to each layer",
    "group wise scales and offsets describe every block of weights",
]


def tiny_tokenizer(texts=TINY_TEXT, eos: bool = True, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory (no download): any text tokenizes.
    With ``eos``, ``<eos>`` is both its eos and pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 4, trainer)
    special = {"eos_token": "<eos>", "pad_token": "<eos>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def tiny_llama(seed: int = 0, vocab_size: int = 300, hidden: int = 64, inter: int = 128, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so quantization error is visible in logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def benchmark_module(name: str):
    """The module ``benchmarks/<name>.py`` (the benchmarks folder is not a package; its scripts
    import each other by file name, so the folder is on ``sys.path`` while the import runs)."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def embedded_dir():
    from qalora.default_model import default_model_dir

    return default_model_dir()


# ------------------------------------------------------------------ safetensors layout

SAFETENSORS_DTYPE_BYTES = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "F64": 8}


def safetensors_table(path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """``(header_bytes, {name: (dtype, shape, begin, end)})`` of a safetensors file, read from
    the file itself: an 8-byte little-endian header length, then that many bytes of JSON."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return n, {k: (v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}


def assert_safetensors_exact(path, expected: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """The file holds exactly ``expected`` (name -> (dtype, shape)), its tensors are packed back
    to back with no gap, and its size is 8 + header + the sum of the tensors' exact byte sizes.
    Returns the tensor bytes."""
    import math
    import os

    n_header, table = safetensors_table(path)
    assert {k: v[:2] for k, v in table.items()} == expected
    spans = sorted((begin, end, SAFETENSORS_DTYPE_BYTES[dtype] * math.prod(shape), name)
                   for name, (dtype, shape, begin, end) in table.items())
    at = 0
    for begin, end, nbytes, name in spans:
        assert (begin, end) == (at, at + nbytes), name
        at = end
    assert os.path.getsize(path) == 8 + n_header + at
    return at


@pytest.fixture(scope="module")
def one_thread():
    """Tiny GEMMs: one torch thread is deterministic, and on a loaded 2-core machine a second
    OpenMP thread only spins (runs were 5-100x slower). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
