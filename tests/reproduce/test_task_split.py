"""The task split: deterministic, disjoint, stated sizes; training records are the scorer's strings."""

import random

import pytest

from conftest import tiny_tokenizer
from qalora.data.batching import prompt_response_ids
from qalora.data.readers import record_example
from qalora.errors import QaloraError
from qalora.eval.scoring import encode_pair
from qalora.eval.task_spec import ChoiceItem
from qalora.reproduce.task_split import completion_records, item_key, split_items


def _items(n=60):
    out = []
    for i in range(n):
        q = f"Question {i % 50}: what follows {i % 50}?\nAnswer:"  # items 50..59 repeat questions 0..9
        out.append(ChoiceItem(requests=((q, f" {i % 50 + 1}"), (q, " no")), gold=0, lengths=(3, 3), index=i))
    return out


def test_split_is_deterministic_disjoint_and_sized():
    items = _items()
    s = split_items(items, heldout=12)
    shuffled = list(items)
    random.Random(1).shuffle(shuffled)
    again = split_items(shuffled, heldout=12)
    assert [i.index for i in again.heldout] == [i.index for i in s.heldout]          # order-independent
    assert {i.index for i in again.train} == {i.index for i in s.train}
    held_keys, train_keys = {item_key(i) for i in s.heldout}, {item_key(i) for i in s.train}
    assert not held_keys & train_keys                                                # disjoint by text
    assert {i.index for i in s.heldout} | {i.index for i in s.train} == set(range(60))
    assert 12 <= s.sizes["heldout"] <= 13 and s.sizes["train"] == 60 - s.sizes["heldout"]
    # a repeated question sits wholly on one side
    for k in range(10):
        assert (k in {i.index for i in s.heldout}) == (50 + k in {i.index for i in s.heldout})
    # the held-out part is the smallest keys: a naive reference
    want = sorted({item_key(i) for i in items})
    took, n = [], 0
    for key in want:
        if n >= 12:
            break
        took.append(key)
        n += sum(item_key(i) == key for i in items)
    assert held_keys == set(took)


def test_split_refusals():
    with pytest.raises(QaloraError, match="heldout must be an integer >= 1, got 0"):
        split_items(_items(), 0)
    with pytest.raises(QaloraError, match="leave none for training"):
        split_items(_items(5), 10)


def test_completion_records_train_on_the_scored_tokens():
    tok = tiny_tokenizer()
    item = ChoiceItem(requests=(("Q: one plus one?\nA: ", "two"), ("Q: one plus one?\nA: ", "three")), gold=1,
                      lengths=(3, 5), index=0)
    rec = completion_records([item])[0]
    assert rec == {"prompt": "Q: one plus one?\nA: ", "completion": "three"}
    ex = record_example(rec, "r:1", "r:1")
    assert ex.template == "raw"
    assert prompt_response_ids(tok, ex) == encode_pair(tok, *item.requests[1])   # same split, no eos
    with pytest.raises(QaloraError, match="field 'completion' must be a non-empty string"):
        record_example({"prompt": "x", "completion": " "}, "r:2", "r:2")
