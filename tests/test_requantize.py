"""The lossy baseline path: LoRA/QLoRA merged in fp32, then quantized again."""

import json

import pytest
import torch

from qalora.adapters.layer import AdaptedLinear
from qalora.api import load_model_and_tokenizer
from qalora.checkpoint import load
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.merging.requantize import merge_lora_dense, requantize
from qalora.merging.verify import DEFAULT_PROMPTS
from qalora.patch import quant_layers, set_kernel
from qalora.training.loop import train


@pytest.fixture
def fp_and_data(tmp_path, tiny_model, tiny_tok):
    tiny_model.save_pretrained(tmp_path / "fp")
    tiny_tok.save_pretrained(tmp_path / "fp")
    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"{2 * i}."} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


METRICS = ("max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement")


def direct_logit_comparison(a, b, tok, prompts) -> dict:
    """The report's logit figures written out naively: each prompt alone through both models,
    all positions pooled; max and mean |difference| and how often the argmaxes agree."""
    diffs, agree = [], []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            la, lb = a(ids).logits[0].double(), b(ids).logits[0].double()   # [T, vocab]
            diffs.append((la - lb).abs().flatten())
            agree.extend((la.argmax(-1) == lb.argmax(-1)).tolist())
    d = torch.cat(diffs)
    return {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
            "top1_agreement": sum(agree) / len(agree), "n_tokens": len(agree)}


def tcfg(tmp_path, method):
    return TrainConfig(method=method, data=str(tmp_path / "d.jsonl"), steps=3, batch_size=4, lr=1e-2, max_seq_len=64,
                       eval_every=3, save_every=3, eval_batches=1)


def test_merge_lora_dense_equals_adapted_layer():
    base = torch.nn.Linear(64, 32)
    layer = AdaptedLinear(base, ("lora",), LoraConfig(rank=4, alpha=8))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(merge_lora_dense(layer)(x), layer(x), rtol=1e-5, atol=1e-5)  # fp32 reassociation


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_requantize_writes_a_labelled_lossy_checkpoint(fp_and_data, method):
    tmp = fp_and_data
    train(tmp / "fp", tmp / "a", tcfg(tmp, method), LoraConfig(rank=4, alpha=8), progress=False)
    report = requantize(tmp / "fp", tmp / "a", tmp / "m", QuantConfig(bits=3, group_size=32, method="rtn"), progress=False)
    assert report["lossy"] is True and report["requantize"] == "rtn" and report["layers_merged"] == 14
    ref = report["reference"]
    assert ref["max_abs_logit_diff"] > 1e-4  # INT3 re-quantization is visible, unlike an exact merge
    on_disk = json.loads((tmp / "m" / "merge_report.json").read_text())
    assert on_disk["reference"] == ref
    merged = load(tmp / "m")
    assert len(quant_layers(merged)) == 14 and all(m.bits == 3 for m in quant_layers(merged).values())
    # the report's figure is what one gets by comparing the files' models directly
    adapted, tok = load_model_and_tokenizer(tmp / "fp", adapter=tmp / "a")
    set_kernel(merged, "reference")
    direct = direct_logit_comparison(adapted, merged, tok, DEFAULT_PROMPTS)
    assert direct["n_tokens"] == ref["n_tokens"]
    # the same fp32 logits; the report reduces them in fp32, this in fp64 (4e-8 apart measured):
    # 1e-6 relative and absolute, far below the 1e-4 the figure must exceed
    torch.testing.assert_close({k: direct[k] for k in METRICS}, {k: ref[k] for k in METRICS}, rtol=1e-6, atol=1e-6)
    assert direct["max_abs_logit_diff"] > 1e-4


def test_requantize_refuses_a_qalora_adapter(tmp_path, tiny_model, tiny_tok, fp_and_data):
    from qalora.checkpoint import save_checkpoint
    from qalora.quant.model import quantize_model

    tmp = fp_and_data
    quantize_model(tiny_model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(tiny_model, tiny_tok, tmp / "q", {"bits": 4, "group_size": 32, "method": "rtn"})
    train(tmp / "q", tmp / "qa", tcfg(tmp, "qalora"), LoraConfig(rank=4, alpha=8), progress=False)
    with pytest.raises(QaloraError, match="is a .qalora. adapter: it merges exactly"):
        requantize(tmp / "q", tmp / "qa", tmp / "m", QuantConfig(bits=3, method="rtn"), progress=False)
    assert not (tmp / "m").exists()
