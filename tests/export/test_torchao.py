"""torchao export: our codes, scales and float offsets become ``IntxUnpackedToInt8Tensor`` weights
(codes exact, weights equal up to fp32 rounding); the folder loads with
``AutoModelForCausalLM.from_pretrained`` in a fresh process where qalora cannot be imported, and
its logits match qalora's fp32 reference kernel; bad inputs are refused and nothing is written."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("torchao")

from conftest import tiny_llama, tiny_tokenizer  # noqa: E402
from qalora.adapters.attach import adapter_layers, add_adapters  # noqa: E402
from qalora.checkpoint import load, save_checkpoint  # noqa: E402
from qalora.cli import main  # noqa: E402
from qalora.config import LoraConfig, QuantConfig  # noqa: E402
from qalora.errors import QaloraError  # noqa: E402
from qalora.export.torchao import INFO_FILE, export_torchao, torchao_qparams, torchao_weight  # noqa: E402
from qalora.merging.surgery import merge_model_inplace  # noqa: E402
from qalora.patch import quant_layers  # noqa: E402
from qalora.quant.qparams import dequantize  # noqa: E402
from qalora.quant.weight import QuantizedWeight  # noqa: E402
from qalora.quant.model import quantize_model  # noqa: E402

PROMPTS = ["the quick brown fox jumps over the lazy dog", "group wise scales and offsets describe every block"]


pytestmark = pytest.mark.usefixtures("one_thread")


def rounding_bound(scale, offset, bits, group_size):
    """Per-weight bound on |w_torchao - w_qalora| ``[out, in]``, from fp32 rounding alone.

    torchao computes ``fl(fl(qdata - fl(zero_point)) * scale)`` with ``zero_point = -2^(b-1) -
    offset / scale``; qalora ``fl(fl(q * scale) + offset)``. Each of the five roundings is at most
    2^-24 of a value whose size, times scale where needed, is below ``|offset| + 2^b · |scale|``;
    2^-21 leaves a factor 8/5 of margin."""
    per_group = 2.0**-21 * (offset.abs() + 2**bits * scale.abs())
    return per_group.repeat_interleave(group_size, dim=1)


def random_weight(bits, group_size, out_f=16, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = torch.rand(out_f, in_f // group_size, generator=g) * 0.02 + 1e-4
    offset = torch.randn(out_f, in_f // group_size, generator=g) * 0.5  # |offset| >> scale: merged offsets
    return QuantizedWeight.from_codes(codes, scale, offset, bits, group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 32, 128])
def test_codes_exact_weights_within_fp32_rounding(bits, group_size):
    qw = random_weight(bits, group_size, seed=bits * 1000 + group_size)
    t = torchao_weight(qw)
    assert type(t).__name__ == "IntxUnpackedToInt8Tensor" and t.block_size == (1, group_size)
    assert t.qdata.dtype == torch.int8 and t.scale.dtype == t.zero_point.dtype == t.dtype == torch.float32
    assert torch.equal(t.qdata.to(torch.int16) + 2 ** (bits - 1), qw.codes().to(torch.int16))
    assert int(t.qdata.min()) >= -(2 ** (bits - 1)) and int(t.qdata.max()) <= 2 ** (bits - 1) - 1
    assert torch.equal(t.scale, qw.scale)
    ours, theirs = qw.dequantize(), t.dequantize()
    bound = rounding_bound(qw.scale, qw.offset, bits, group_size)
    assert bool(((theirs - ours).abs() <= bound).all())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=float(bound.max()))


def test_degenerate_groups_keep_their_weights():
    """scale 0 (and an offset / scale beyond fp32) dequantize to the offset whatever the codes."""
    codes = torch.tensor([[0, 3, 1, 2], [3, 2, 1, 0]], dtype=torch.uint8)
    scale = torch.tensor([[0.0, 0.5], [1e-45, 0.25]])
    offset = torch.tensor([[1.5, -1.0], [1e5, 0.0]])
    qdata, s, zero = torchao_qparams(codes, scale, offset, bits=2)
    assert s.tolist() == [[1.0, 0.5], [1.0, 0.25]]
    assert qdata.tolist() == [[-2, -2, -1, 0], [-2, -2, -1, -2]]
    w = ((qdata.float() - zero.repeat_interleave(2, 1)) * s.repeat_interleave(2, 1))
    assert torch.equal(w, dequantize(codes, scale, offset, 2))


# ----------------------------------------------------------------------------------- folders

def untied_llama(seed=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False,
                      attention_bias=True, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.5 if n.endswith("bias") else 0.08)
    return model


def merged_tiny(bits, group_size):
    """A quantized tiny Llama whose QA-LoRA adapters (random, non-zero B) are merged into the offsets."""
    model = tiny_llama()
    quantize_model(model, QuantConfig(bits=bits, group_size=group_size, method="rtn"), progress=False)
    torch.manual_seed(1)
    add_adapters(model, "qalora", LoraConfig(rank=4, alpha=8))
    for layer in adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    assert merge_model_inplace(model)
    return model


# name: (model, bits, group size, quantizer's skip or None for an already quantized model, tied in the export)
CASES = {
    "int2-g32": (tiny_llama, 2, 32, ("lm_head",), True),
    "int3-g32": (tiny_llama, 3, 32, ("lm_head",), True),
    "int4-g64": (tiny_llama, 4, 64, ("lm_head",), True),
    "int8-g16": (tiny_llama, 8, 16, ("lm_head",), True),
    "merged-int4-g32": (lambda: merged_tiny(4, 32), 4, 32, None, True),
    "untied-bias-int3": (untied_llama, 3, 32, (), False),      # lm_head quantized, untied, attention biases
    "tied-quantized-lm-head": (tiny_llama, 4, 32, (), False),  # tied config, quantized lm_head: untied
}

CHILD = textwrap.dedent("""
    import sys
    sys.modules["qalora"] = None  # qalora is not importable in this process
    import json, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    folders, prompts, dest = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    try:
        import qalora
        raise SystemExit("qalora was importable")
    except ImportError:
        pass
    found = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        weights = {n: {"type": type(m.weight).__name__, "qdata": m.weight.qdata, "dense": m.weight.dequantize()}
                   for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"}
        ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
        with torch.no_grad():
            logits = [model(i).logits[0] for i in ids]
        found[name] = {"weights": weights, "ids": ids, "logits": logits, "dtype": str(model.dtype),
                       "tied": model.lm_head.weight is model.model.embed_tokens.weight}
    torch.save(found, dest)
""")


def load_in_fresh_process(folders: dict, prompts: list[str], dest):
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in folders.items()}),
                        json.dumps(prompts), str(dest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(dest, weights_only=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case quantized, saved, exported; then all folders loaded by one fresh process."""
    root = tmp_path_factory.mktemp("torchao")
    tok = tiny_tokenizer()
    reports = {}
    for name, (make, bits, group_size, skip, _) in CASES.items():
        model = make()
        if skip is not None:
            quantize_model(model, QuantConfig(bits=bits, group_size=group_size, method="rtn", skip=skip), progress=False)
        save_checkpoint(model, tok, root / name, {"source_model": "tiny", "bits": bits, "group_size": group_size})
        reports[name] = export_torchao(root / name, root / f"{name}-torchao", progress=False)
    loaded = load_in_fresh_process({n: root / f"{n}-torchao" for n in CASES}, PROMPTS, root / "loaded.pt")
    return root, reports, loaded


@pytest.mark.parametrize("name", list(CASES))
def test_fresh_process_loads_same_weights_and_logits(exported, name):
    root, reports, loaded = exported
    _, bits, group_size, _, tied = CASES[name]
    got = loaded[name]
    ref = load(root / name, kernel="reference")
    layers = quant_layers(ref)
    assert set(got["weights"]) == set(layers) and got["dtype"] == "torch.float32" and got["tied"] == tied
    worst = 0.0
    for layer, w in got["weights"].items():
        qw = layers[layer].quantized_weight()
        assert w["type"] == "IntxUnpackedToInt8Tensor"
        assert torch.equal(w["qdata"].to(torch.int16) + 2 ** (bits - 1), qw.codes().to(torch.int16)), layer
        ours = qw.dequantize()
        bound = rounding_bound(qw.scale, qw.offset, bits, group_size)
        assert bool(((w["dense"] - ours).abs() <= bound).all()), layer
        worst = max(worst, float((w["dense"] - ours).abs().max()))
    assert reports[name]["max_abs_error"] == worst  # the error measured at export is the loaded folder's

    tok = tiny_tokenizer()
    for prompt, ids, logits in zip(PROMPTS, got["ids"], got["logits"]):
        assert torch.equal(ids, tok(prompt, return_tensors="pt")["input_ids"])
        with torch.no_grad():
            want = ref(ids).logits[0]
        # weights differ by <= ~1e-7 relative (fp32 rounding); through 1-2 layers the logits moved
        # by < 2e-6 (|logit| ~ 0.5): 1e-4 bounds that with margin, far below any real difference
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)
        assert torch.equal(logits.argmax(-1), want.argmax(-1))


def test_folder_contents_and_report(exported):
    root, reports, _ = exported
    out, report = root / "int3-g32-torchao", reports["int3-g32"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                            "tokenizer.json", "tokenizer_config.json", INFO_FILE])
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] is True
    assert q["quant_method"] == "torchao" and q["modules_to_not_convert"] == ["lm_head"]
    data = q["quant_type"]["default"]
    assert data["_type"] == "IntxWeightOnlyConfig"
    assert data["_data"]["weight_dtype"]["_data"] == "int3" and data["_data"]["granularity"]["_data"] == {"group_size": 32}
    assert data["_data"]["mapping_type"]["_data"] == "ASYMMETRIC"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        k = "model.layers.0.mlp.up_proj"
        assert f.get_tensor(f"{k}._weight_qdata").dtype == torch.int8 and f.get_slice(f"{k}._weight_qdata").get_shape() == [128, 64]
        assert f.get_tensor(f"{k}._weight_zero_point").dtype == torch.float32
        assert f.get_slice(f"{k}._weight_scale").get_shape() == [128, 2]
    assert not any(k.endswith((".qweight", ".offset")) for k in keys) and "lm_head.weight" not in keys  # tied
    info = json.loads((out / INFO_FILE).read_text())
    source = json.loads((root / "int3-g32" / "qalora.json").read_text())
    assert info["source_sha256"] == source["sha256"]["model.safetensors"]
    assert (info["bits"], info["group_size"], info["quantized_layers"]) == (3, 32, 14)
    assert info["max_abs_error"] == report["max_abs_error"] and 0 <= report["max_abs_error"] < 1e-6
    assert report["max_rel_error"] < 1e-6 and report["folder_bytes"] > 0
    assert (out / "tokenizer.json").read_bytes() == (root / "int3-g32" / "tokenizer.json").read_bytes()


def test_refusals_write_nothing(exported, tmp_path, monkeypatch):
    root, _, _ = exported
    ckpt = root / "int3-g32"
    (tmp_path / "taken").mkdir()
    with pytest.raises(QaloraError, match="already exists"):
        export_torchao(ckpt, tmp_path / "taken", progress=False)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(QaloraError, match="qalora checkpoint metadata .* is missing"):
        export_torchao(tmp_path / "plain", tmp_path / "a", progress=False)
    with pytest.raises(QaloraError, match="is not a folder"):
        export_torchao(tmp_path / "nowhere", tmp_path / "b", progress=False)

    mixed = tmp_path / "mixed"
    shutil.copytree(ckpt, mixed)
    meta = json.loads((mixed / "qalora.json").read_text())
    meta["layers"]["model.layers.0.mlp.up_proj"]["group_size"] = 64
    (mixed / "qalora.json").write_text(json.dumps(meta))
    with pytest.raises(QaloraError, match=r"mixes \(bits, group_size\) \[\(3, 32\), \(3, 64\)\]"):
        export_torchao(mixed, tmp_path / "c", progress=False)

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QaloraError, match=r"pip install 'qalora\[export\]'"):
        export_torchao(ckpt, tmp_path / "d", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed", "plain", "taken"]


def test_cli_export_torchao(exported, tmp_path, capsys):
    root, _, _ = exported
    ckpt = root / "int2-g32"
    assert main(["export", "--model", str(ckpt), "--format", "torchao", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m" / INFO_FILE).read_text())["bits"] == 2
    assert main(["export", "--model", str(ckpt), "--format", "torchao", "--fallback", "f16",
                 "--out", str(tmp_path / "n")]) == 2
    assert "--fallback applies to --format gguf only" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


# ----------------------------------------------------------------------------------- embedded model

@pytest.mark.embedded
def test_smollm2_int3_export_loads_without_qalora(tmp_path):
    """SmolLM2-135M-Instruct, INT3 g32 RTN: exported weights within fp32 rounding of qalora's,
    and the folder, loaded by transformers alone, gives qalora's reference-kernel logits."""
    import qalora
    from qalora.models import load_tokenizer

    qalora.quantize("default", tmp_path / "q3", QuantConfig(bits=3, group_size=32, method="rtn"), progress=False)
    report = export_torchao(tmp_path / "q3", tmp_path / "q3-torchao", progress=False)
    assert report["quantized_layers"] == 210 and report["tie_word_embeddings"] is True
    assert report["max_rel_error"] < 1e-6  # measured 1.26e-7 (4.8e-7 abs): fp32 rounding
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:", "Quantized models keep their weights in"]
    got = load_in_fresh_process({"q3": tmp_path / "q3-torchao"}, prompts, tmp_path / "loaded.pt")["q3"]
    model, tok = load(tmp_path / "q3", kernel="reference"), load_tokenizer(tmp_path / "q3")
    diffs, agree, total = [], 0, 0
    for prompt, ids, logits in zip(prompts, got["ids"], got["logits"]):
        assert torch.equal(ids, tok(prompt, return_tensors="pt")["input_ids"])
        with torch.no_grad():
            want = model(ids).logits[0]
        diffs.append((logits - want).abs())
        agree += int((logits.argmax(-1) == want.argmax(-1)).sum())
        total += ids.shape[1]
    diff = torch.cat([d.flatten() for d in diffs])
    # 30 layers in fp32, weights within ~1e-7 (relative) of each other: measured max 1.2e-4, mean 1.5e-5
    # (mean |logit| 6.0); the bounds leave 10x margin for another machine's fp32 GEMM
    assert float(diff.max()) < 1.5e-3 and float(diff.mean()) < 1.5e-4
    assert agree == total
