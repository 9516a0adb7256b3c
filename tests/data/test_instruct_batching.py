"""Tests for tokenization with prompt-masked labels and for batching (qalora.data.batching).

All checks are exact (token ids and index lists): the labels must be -100 on exactly the
prompt tokens, and the plan must be a pure function of its inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_tokenizer

from qalora.data.instruct import (IGNORE_INDEX, PLAIN_PROMPT, Example, TokenizedDataset, batch_plan, collate,
                                  encode_example, pad_token_id, padding_fraction)
from qalora.errors import QaloraError

QA = Example(({"role": "user", "content": "the quick brown fox"},
              {"role": "assistant", "content": "jumps over the lazy dog"}), "qa.jsonl:1")
MULTI = Example(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "a quantized model"},
                 {"role": "assistant", "content": "keeps its weights"}, {"role": "user", "content": "in few bits"},
                 {"role": "assistant", "content": "low rank adapters"}), "multi.jsonl:2")


@pytest.fixture(scope="module")
def smol_tok(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    assert tok.chat_template
    return tok


def labeled(ids, labels) -> list[int]:
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    return [label for label in labels if label != IGNORE_INDEX]


def test_plain_template_masks_exactly_the_prompt(tiny_tok):
    assert not tiny_tok.chat_template
    ids, labels = encode_example(tiny_tok, QA, 256)
    prompt = tiny_tok(PLAIN_PROMPT.format(user="the quick brown fox"), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert tiny_tok.decode(labeled(ids, labels)) == "jumps over the lazy dog<eos>"
    assert ids[-1] == tiny_tok.eos_token_id


def test_plain_template_multi_turn_labels_only_the_last_answer(tiny_tok):
    ids, labels = encode_example(tiny_tok, MULTI, 256)
    assert tiny_tok.decode(labeled(ids, labels)) == "low rank adapters<eos>"
    text = tiny_tok.decode(ids)
    assert text.startswith("Be brief.\n\n### Instruction:\na quantized model\n\n### Response:\nkeeps its weights\n\n")
    assert text.endswith("### Instruction:\nin few bits\n\n### Response:\nlow rank adapters<eos>")


def test_chat_template_masks_exactly_the_prompt(smol_tok):
    for example in (QA, MULTI):
        ids, labels = encode_example(smol_tok, example, 512)
        prompt = smol_tok.apply_chat_template(list(example.messages[:-1]), add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
        full = smol_tok.apply_chat_template(list(example.messages), tokenize=True, return_dict=False)
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert ids == full[:-1]  # the template's "\n" after <|im_end|> is dropped
        assert smol_tok.decode(labeled(ids, labels)) == example.response + "<|im_end|>"


def test_chat_template_fallback_when_tokens_merge_across_the_boundary():
    tok = tiny_tokenizer()  # a fresh copy: the session fixture must keep no chat template
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}")
    # "...t" + "he quick" tokenizes as "the" in the full text, so the prompt ids are not a prefix
    example = Example(({"role": "user", "content": "over t"}, {"role": "assistant", "content": "he quick"}), "m:1")
    prompt_ids = tok.apply_chat_template([dict(example.messages[0])], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
    full_ids = tok.apply_chat_template([dict(m) for m in example.messages], tokenize=True, return_dict=False)
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the case the fallback exists for
    ids, labels = encode_example(tok, example, 64)
    assert tok.decode(labeled(ids, labels)) == "he quick<eos>"
    assert tok.decode(ids) == "over the quick<eos>"


def test_chat_template_that_reorders_turns_raises():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(QaloraError, match=r"qa\.jsonl:1: the tokenizer's chat template"):
        encode_example(tok, QA, 64)


def test_truncation_cuts_the_response_and_keeps_the_prompt(tiny_tok):
    full_ids, full_labels = encode_example(tiny_tok, QA, 256)
    n_prompt = full_labels.count(IGNORE_INDEX)
    ids, labels = encode_example(tiny_tok, QA, n_prompt + 2)
    assert ids == full_ids[: n_prompt + 2] and labels == full_labels[: n_prompt + 2]
    assert len(labeled(ids, labels)) == 2


def test_prompt_too_long_raises(tiny_tok):
    n_prompt = encode_example(tiny_tok, QA, 256)[1].count(IGNORE_INDEX)
    with pytest.raises(QaloraError, match=rf"qa\.jsonl:1: the prompt is {n_prompt} tokens.*max_seq_len {n_prompt}; "
                                          r"use a larger --max-seq-len"):
        encode_example(tiny_tok, QA, n_prompt)
    with pytest.raises(QaloraError, match="max_seq_len must be an integer >= 2"):
        encode_example(tiny_tok, QA, 0)


def test_plain_template_needs_an_eos():
    tok = tiny_tokenizer()
    tok.eos_token = None
    with pytest.raises(QaloraError, match="neither a chat template nor an eos token"):
        encode_example(tok, QA, 64)


def test_dataset_skips_or_truncates_too_long_examples(tiny_tok):
    long = Example(({"role": "user", "content": "the lazy dog"},
                    {"role": "assistant", "content": " ".join(["the quick brown fox"] * 40)}), "long.jsonl:1")
    n_qa = len(encode_example(tiny_tok, QA, 256)[0])
    skipped = TokenizedDataset([QA, long, QA], tiny_tok, n_qa, skip_too_long=True)
    assert len(skipped) == 2 and skipped.n_skipped == 1 and skipped.lengths == [n_qa, n_qa]
    assert skipped.sources == ["qa.jsonl:1", "qa.jsonl:1"]
    kept = TokenizedDataset([QA, long], tiny_tok, n_qa)
    assert kept.lengths == [n_qa, n_qa] and kept.n_truncated == 1 and kept.n_skipped == 0
    assert kept[0] == encode_example(tiny_tok, QA, n_qa)
    with pytest.raises(QaloraError, match=r"none of the 1 examples fits max_seq_len 4 \(1 skipped"):
        TokenizedDataset([QA], tiny_tok, 4, skip_too_long=True)
    with pytest.raises(QaloraError, match=r"qa\.jsonl:1: the prompt is"):
        TokenizedDataset([QA], tiny_tok, 4)


def random_lengths(n: int = 1000, seed: int = 0) -> list[int]:
    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_batch_plan_is_deterministic_and_covers_every_index_once():
    lengths = random_lengths()
    plan = batch_plan(lengths, 8, seed=3, epoch=0)
    assert plan == batch_plan(list(lengths), 8, seed=3, epoch=0)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    assert all(1 <= len(batch) <= 8 for batch in plan) and len(plan) == 125
    assert batch_plan(lengths, 8, seed=3, epoch=1) != plan
    assert batch_plan(lengths, 8, seed=4, epoch=0) != plan
    assert batch_plan(lengths[:5], 8, seed=0, epoch=0) and batch_plan([], 8, seed=0, epoch=0) == []
    with pytest.raises(QaloraError, match="batch_size must be an integer >= 1, got 0"):
        batch_plan(lengths, 0, seed=0, epoch=0)


def test_batch_plan_pads_less_than_a_random_plan():
    lengths = random_lengths()
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_plan = [order[k:k + 8] for k in range(0, len(order), 8)]
    bucketed = padding_fraction(batch_plan(lengths, 8, seed=0, epoch=0), lengths)
    assert bucketed < 0.05 < 0.3 < padding_fraction(random_plan, lengths)


def test_padding_fraction_by_hand():
    assert padding_fraction([[0, 1], [2]], [2, 4, 3]) == pytest.approx(1 - 9 / 11)  # slots 2*4 + 1*3
    assert padding_fraction([], []) == 0.0


def test_collate_pads_right_and_masks(tiny_tok):
    short = Example(({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}), "s:1")
    dataset = TokenizedDataset([QA, short], tiny_tok, 256)
    pad = pad_token_id(tiny_tok)
    batch = collate(dataset, [1, 0], pad)
    width = max(dataset.lengths)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert batch[key].shape == (2, width) and batch[key].dtype == torch.long
    for row, i in enumerate([1, 0]):
        n = dataset.lengths[i]
        assert batch["input_ids"][row, :n].tolist() == dataset.input_ids[i]
        assert batch["labels"][row, :n].tolist() == dataset.labels[i]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    with pytest.raises(QaloraError, match="pad_id is None"):
        collate(dataset, [0], None)
