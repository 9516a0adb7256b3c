"""The Python API beside the CLI: an adapter applied unmerged, generation options."""

import json

import pytest
import torch

from qalora.api import generate, load_model_and_tokenizer
from qalora.checkpoint import save_checkpoint
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.merging.command import merge
from qalora.patch import set_kernel
from qalora.quant.model import quantize_model
from qalora.training.loop import train


@pytest.fixture
def trained(tmp_path, tiny_model, tiny_tok):
    quantize_model(tiny_model, QuantConfig(bits=3, group_size=32, method="rtn"), progress=False)
    save_checkpoint(tiny_model, tiny_tok, tmp_path / "q", {"bits": 3, "group_size": 32, "method": "rtn"})
    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"{2 * i}."} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(data=str(tmp_path / "d.jsonl"), steps=3, batch_size=4, lr=1e-2, max_seq_len=64,
                      eval_every=3, save_every=3, eval_batches=1)
    train(tmp_path / "q", tmp_path / "a", cfg, LoraConfig(rank=4, alpha=8), progress=False)
    return tmp_path


def test_unmerged_adapter_equals_merged_model(trained):
    unmerged, tok = load_model_and_tokenizer(trained / "q", adapter=trained / "a", kernel="reference")
    merge(trained / "q", trained / "a", trained / "m", progress=False)
    merged, _ = load_model_and_tokenizer(trained / "m", kernel="reference")
    base, _ = load_model_and_tokenizer(trained / "q", kernel="reference")
    ids = tok("what is 3 plus 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b, c = unmerged(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # the exact merge, fp32 path
    assert (a - c).abs().max() > 1e-3  # and the adapter does change the model
    assert generate(unmerged, tok, "what is 3 plus 3?", max_new_tokens=5) == generate(merged, tok, "what is 3 plus 3?", max_new_tokens=5)


def test_sampling_is_seeded_and_greedy_is_default(trained):
    model, tok = load_model_and_tokenizer(trained / "q", adapter=trained / "a")
    set_kernel(model, "reference")
    s1 = generate(model, tok, "hello", max_new_tokens=8, temperature=1.5, top_k=50, seed=3)
    s2 = generate(model, tok, "hello", max_new_tokens=8, temperature=1.5, top_k=50, seed=3)
    assert s1 == s2
    assert generate(model, tok, "hello", max_new_tokens=8) == generate(model, tok, "hello", max_new_tokens=8)
    with pytest.raises(QaloraError, match="sampling needs"):
        generate(model, tok, "hello", temperature=-1)


def test_adapter_on_another_base_is_refused(trained, tiny_tok):
    from conftest import tiny_llama

    other = tiny_llama(seed=7)
    quantize_model(other, QuantConfig(bits=3, group_size=32, method="rtn"), progress=False)
    save_checkpoint(other, tiny_tok, trained / "q_other", {"bits": 3, "group_size": 32, "method": "rtn"})
    with pytest.raises(QaloraError, match="trained on another base"):
        load_model_and_tokenizer(trained / "q_other", adapter=trained / "a")


def test_package_names_stay_functions_whatever_was_imported():
    """``qalora.quantize`` etc. are functions even after every submodule was imported (a submodule
    of the same name would replace the attribute)."""
    import importlib
    import pkgutil

    import qalora

    for m in pkgutil.walk_packages(qalora.__path__, "qalora."):
        if "lm_eval" not in m.name and not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    for name in ("quantize", "pipeline", "merge", "train", "evaluate", "generate", "load", "quantize_model"):
        assert callable(getattr(qalora, name)) and not isinstance(getattr(qalora, name), type(qalora)), name


def test_loading_through_the_python_api_prints_nothing(tmp_path, tiny_model, tiny_tok):
    """``qalora.load`` is as quiet as the CLI: torchao's library-load lines and torch's pytree
    warnings (printed when transformers imports torchao) are silenced."""
    import subprocess
    import sys

    pytest.importorskip("torchao")   # the noise comes from torchao's import
    quantize_model(tiny_model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(tiny_model, tiny_tok, tmp_path / "q", {"bits": 4, "group_size": 32, "method": "rtn"})
    code = f"import qalora; m = qalora.load({str(tmp_path / 'q')!r}); print(type(m).__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "LlamaForCausalLM" and r.stderr == "", r.stderr[:500]
