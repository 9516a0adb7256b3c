"""``prompt_ids``: the one place a generation prompt becomes token ids."""

import torch

from qalora.decode import prompt_ids


def test_chat_prompt_is_the_template_with_the_assistant_header(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    ids = prompt_ids(tok, "What is 2 + 2?", chat=True)
    text = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert ids.shape[0] == 1 and tok.decode(ids[0]).endswith(text)   # SmolLM2's ChatML, system turn first
    assert torch.equal(ids[0, -len(tok(text)["input_ids"]):], torch.tensor(tok(text)["input_ids"]))
    assert torch.equal(prompt_ids(tok, "What is 2 + 2?", chat=False), tok("What is 2 + 2?", return_tensors="pt")["input_ids"])


def test_without_a_template_the_plain_text_is_encoded(tiny_tok):
    assert not getattr(tiny_tok, "chat_template", None)
    plain = tiny_tok("the cat", return_tensors="pt")["input_ids"]
    assert torch.equal(prompt_ids(tiny_tok, "the cat", chat=True), plain)
    assert torch.equal(prompt_ids(tiny_tok, "the cat", chat=False), plain)
