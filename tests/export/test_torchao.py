"""torchao export: our codes, scales and float offsets become ``IntxUnpackedToInt8Tensor`` weights
(unpacked) or ``Int4OpaqueTensor`` weights (packed, b <= 4), codes exact, weights equal up to fp32
rounding; the folder loads with ``AutoModelForCausalLM.from_pretrained`` in a fresh process where
qalora cannot be imported (packed: after ``import torchao.prototype.quantization.int4``, on its CPU
capability), and its logits match qalora's fp32 reference kernel; bad inputs are refused and nothing
is written."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("torchao")

from conftest import tiny_llama, tiny_tokenizer

from qalora.adapters.attach import adapter_layers, add_adapters
from qalora.checkpoint import load, save_checkpoint
from qalora.cli import main
from qalora.config import LoraConfig, QuantConfig
from qalora.errors import QaloraError
from qalora.export.torchao import (
    INFO_FILE,
    export_torchao,
    torchao_qparams,
    torchao_weight,
)
from qalora.export.torchao_layouts import cpu_capability, unpack_int4_cpu
from qalora.merging.surgery import merge_model_inplace
from qalora.patch import quant_layers
from qalora.quant.model import quantize_model
from qalora.quant.qparams import dequantize
from qalora.quant.weight import QuantizedWeight

PROMPTS = ["the quick brown fox jumps over the lazy dog", "group wise scales and offsets describe every block"]


pytestmark = pytest.mark.usefixtures("one_thread")


def rounding_bound(scale, offset, bits, group_size):
    """Per-weight bound on |w_torchao - w_qalora| ``[out, in]``, from fp32 rounding alone.

    torchao computes ``fl(fl(qdata - fl(zero_point)) * scale)`` with ``zero_point = -2^(b-1) -
    offset / scale``; qalora ``fl(fl(q * scale) + offset)``. Each of the five roundings is at most
    2^-24 of a value whose size, times scale where needed, is below ``|offset| + 2^b · |scale|``;
    2^-21 leaves a factor 8/5 of margin. The packed kernel's ``fl(fl((q - 8)·scale) + fl(offset +
    8·scale))`` is bounded the same way with ``bits = 4`` (``|q - 8| <= 8``; see test_torchao_layouts)."""
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


class Case(NamedTuple):
    make: Callable
    bits: int
    group_size: int
    skip: tuple | None  # the quantizer's skip, None for an already quantized model
    tied: bool  # tied in the export


CASES = {
    "int2-g32": Case(tiny_llama, 2, 32, ("lm_head",), True),
    "int3-g32": Case(tiny_llama, 3, 32, ("lm_head",), True),
    "int4-g64": Case(tiny_llama, 4, 64, ("lm_head",), True),
    "int8-g16": Case(tiny_llama, 8, 16, ("lm_head",), True),
    "merged-int4-g32": Case(lambda: merged_tiny(4, 32), 4, 32, None, True),
    "untied-bias-int3": Case(untied_llama, 3, 32, (), False),      # lm_head quantized, untied, attention biases
    "tied-quantized-lm-head": Case(tiny_llama, 4, 32, (), False),  # tied config, quantized lm_head: untied
    "lm-head-320-int4": Case(lambda: tiny_llama(vocab_size=320), 4, 32, (), False),  # 320 rows: packable
}
# export name: (checkpoint, layout, cpu_capability); every checkpoint is exported unpacked under its own name
EXPORTS = {name: (name, "unpacked", None) for name in CASES} | {
    f"packed-{name}": (name, "packed", None) for name in ("int2-g32", "int3-g32", "int4-g64", "merged-int4-g32",
                                                         "lm-head-320-int4")}
FOR_DEFAULT = {"packed-int3-g32-default": ("int3-g32", "packed", "DEFAULT")}  # loaded under ATEN_CPU_CAPABILITY=default

CHILD = textwrap.dedent("""
    import sys
    sys.modules["qalora"] = None  # qalora is not importable in this process
    import json, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    folders, prompts, dest = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    try:
        import qalora
        raise SystemExit("qalora was importable")
    except ImportError:
        pass

    def packed(folder):
        return json.loads((Path(folder) / "config.json").read_text()).get("qalora_torchao", {}).get("layout") == "packed"

    def weight(w):
        if type(w).__name__ == "Int4OpaqueTensor":  # no dequantize: the kernel's own weights, x = I
            return {"type": "Int4OpaqueTensor", "qdata": w.qdata, "dense": torch.nn.functional.linear(torch.eye(w.shape[1]), w).T}
        return {"type": type(w).__name__, "qdata": w.qdata, "dense": w.dequantize()}

    found = {"_without_import": None}
    for name in sorted(folders, key=lambda n: packed(folders[n])):  # unpacked folders first
        folder = folders[name]
        if packed(folder) and "torchao.prototype.quantization.int4" not in sys.modules:
            try:
                AutoModelForCausalLM.from_pretrained(folder)
                found["_without_import"] = "loaded"
            except Exception as e:
                found["_without_import"] = f"{type(e).__name__}: {e}"
            import torchao.prototype.quantization.int4  # the packed folder's load recipe
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        weights = {n: weight(m.weight) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"}
        ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
        with torch.no_grad():
            logits = [model(i).logits[0] for i in ids]
        found[name] = {"weights": weights, "ids": ids, "logits": logits, "dtype": str(model.dtype),
                       "tied": model.lm_head.weight is model.model.embed_tokens.weight}
    torch.save(found, dest)
""")


def load_in_fresh_process(folders: dict, prompts: list[str], dest, capability: str | None = None):
    env = {**os.environ, **({"ATEN_CPU_CAPABILITY": capability.lower()} if capability else {})}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in folders.items()}),
                        json.dumps(prompts), str(dest)], check=False, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(dest, weights_only=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case quantized, saved, exported; then all folders loaded by one fresh process (and the
    DEFAULT-capability ones by a second, which dispatches as a CPU without AVX)."""
    root = tmp_path_factory.mktemp("torchao")
    tok = tiny_tokenizer()
    for name, case in CASES.items():
        model = case.make()
        if case.skip is not None:
            quantize_model(model, QuantConfig(bits=case.bits, group_size=case.group_size, method="rtn", skip=case.skip),
                           progress=False)
        save_checkpoint(model, tok, root / name, {"source_model": "tiny", "bits": case.bits, "group_size": case.group_size})
    reports = {name: export_torchao(root / ckpt, root / f"{name}-torchao", layout=layout, cpu_capability=cap,
                                    progress=False) for name, (ckpt, layout, cap) in (EXPORTS | FOR_DEFAULT).items()}
    loaded = load_in_fresh_process({n: root / f"{n}-torchao" for n in EXPORTS}, PROMPTS, root / "loaded.pt")
    other = load_in_fresh_process({n: root / f"{n}-torchao" for n in ["packed-int3-g32", *FOR_DEFAULT]}, PROMPTS,
                                  root / "default.pt", capability="DEFAULT")
    return root, reports, loaded, other


def check_logits(ref, got, atol=1e-4):
    tok = tiny_tokenizer()
    for prompt, ids, logits in zip(PROMPTS, got["ids"], got["logits"]):
        assert torch.equal(ids, tok(prompt, return_tensors="pt")["input_ids"])
        with torch.no_grad():
            want = ref(ids).logits[0]
        # weights differ by <= ~1e-7 relative (fp32 rounding; the packed kernel also sums in another
        # order, <= 64·2^-24 relative); through 1-2 layers the logits moved by < 2e-6 (|logit| ~ 0.5):
        # 1e-4 bounds that with margin, far below any real difference
        torch.testing.assert_close(logits, want, rtol=0, atol=atol)
        assert torch.equal(logits.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("name", list(EXPORTS))
def test_fresh_process_loads_same_weights_and_logits(exported, name):
    root, reports, loaded, _ = exported
    ckpt, layout, _ = EXPORTS[name]
    case, got, report = CASES[ckpt], loaded[name], reports[name]
    ref = load(root / ckpt, kernel="reference")
    layers = quant_layers(ref)
    assert set(got["weights"]) == set(layers) and got["dtype"] == "torch.float32" and got["tied"] == case.tied
    worst = peak = 0.0
    for layer, w in got["weights"].items():
        qw = layers[layer].quantized_weight()
        if layout == "packed":
            assert w["type"] == "Int4OpaqueTensor" and w["qdata"].dtype == torch.uint8
            assert torch.equal(unpack_int4_cpu(w["qdata"], report["cpu_capability"]), qw.codes()), layer
        else:
            assert w["type"] == "IntxUnpackedToInt8Tensor"
            assert torch.equal(w["qdata"].to(torch.int16) + 2 ** (case.bits - 1), qw.codes().to(torch.int16)), layer
        ours = qw.dequantize()
        bound = rounding_bound(qw.scale, qw.offset, 4 if layout == "packed" else case.bits, case.group_size)
        assert bool(((w["dense"] - ours).abs() <= bound).all()), layer
        worst, peak = max(worst, float((w["dense"] - ours).abs().max())), max(peak, float(ours.abs().max()))
    # the error measured at export is the loaded folder's (packed: the exporter models the kernel's FMA
    # in fp64, bit-identical here; one fp32 ulp of the largest weight allowed for a build without FMA)
    assert abs(report["max_abs_error"] - worst) <= (2.0**-23 * peak if layout == "packed" else 0.0)
    check_logits(ref, got)


def test_packed_folder_needs_the_import_and_its_cpu_capability(exported):
    """Without ``import torchao.prototype.quantization.int4`` transformers' weights-only unpickler refuses
    the folder; a folder packed for DEFAULT loads exactly under ATEN_CPU_CAPABILITY=default, while one
    packed for this machine's capability gives wrong logits there, silently."""
    root, reports, loaded, other = exported
    assert "Int4OpaqueTensor" in loaded["_without_import"] and "UnpicklingError" in loaded["_without_import"]
    ref = load(root / "int3-g32", kernel="reference")
    check_logits(ref, other["packed-int3-g32-default"])
    assert reports["packed-int3-g32-default"]["cpu_capability"] == "DEFAULT"
    if reports["packed-int3-g32"]["cpu_capability"] != "DEFAULT":
        with torch.no_grad():
            want = ref(other["packed-int3-g32"]["ids"][0]).logits[0]
        assert float((other["packed-int3-g32"]["logits"][0] - want).abs().max()) > 0.1


def test_folder_contents_and_report(exported):
    root, reports, _, _ = exported
    out, report = root / "int3-g32-torchao", reports["int3-g32"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                            "tokenizer.json", "tokenizer_config.json", INFO_FILE])
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] is True
    assert cfg["qalora_torchao"]["layout"] == "unpacked" and cfg["qalora_torchao"]["tensor"] == "IntxUnpackedToInt8Tensor"
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
        quantized = sum(f.get_tensor(n).nbytes for n in keys if "._weight_" in n)
    assert not any(k.endswith((".qweight", ".offset")) for k in keys) and "lm_head.weight" not in keys  # tied
    info = json.loads((out / INFO_FILE).read_text())
    source = json.loads((root / "int3-g32" / "qalora.json").read_text())
    assert info["source_sha256"] == source["sha256"]["model.safetensors"]
    assert (info["bits"], info["group_size"], info["quantized_layers"], info["layout"]) == (3, 32, 14, "unpacked")
    assert info["max_abs_error"] == report["max_abs_error"] and 0 <= report["max_abs_error"] < 1e-6
    assert report["max_rel_error"] < 1e-6 and report["folder_bytes"] > 0
    assert (out / "tokenizer.json").read_bytes() == (root / "int3-g32" / "tokenizer.json").read_bytes()
    assert quantized == QUANTIZED_WEIGHTS * (1 + 8 / 32)  # int8 code + fp32 scale and zero point per 32


QUANTIZED_WEIGHTS = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64)  # tiny_llama's 14 projections


def test_packed_folder_contents_sizes_and_report(exported):
    root, reports, _, _ = exported
    out, report = root / "packed-int3-g32-torchao", reports["packed-int3-g32"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "generation_config.json", "pytorch_model.bin",
                                                            "tokenizer.json", "tokenizer_config.json", INFO_FILE])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] is True and cfg["architectures"] == ["LlamaForCausalLM"]
    data = cfg["quantization_config"]["quant_type"]["default"]
    assert data["_type"] == "Int4WeightOnlyConfig" and data["_data"]["group_size"] == 32  # transformers' label
    record = cfg["qalora_torchao"]
    assert (record["layout"], record["tensor"], record["bits"], record["stored_bits"]) == ("packed", "Int4OpaqueTensor", 3, 4)
    assert record["cpu_capability"] == cpu_capability() and "import torchao.prototype.quantization.int4" in record["load"]
    import torchao.prototype.quantization.int4  # noqa: F401  (registers Int4OpaqueTensor for weights_only)

    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    w = state["model.layers.0.mlp.up_proj.weight"]
    assert type(w).__name__ == "Int4OpaqueTensor" and w.qdata.dtype == torch.uint8 and tuple(w.qdata.shape) == (128, 32)
    assert w.scale_and_zero.dtype == torch.float32 and tuple(w.scale_and_zero.shape) == (2, 128, 2)
    assert "lm_head.weight" not in state  # tied: stored once
    quantized = sum(t.qdata.nbytes + t.scale_and_zero.nbytes for t in state.values() if type(t).__name__ == "Int4OpaqueTensor")
    assert quantized == QUANTIZED_WEIGHTS * (1 / 2 + 8 / 32)  # two codes per byte + fp32 scale and zero per 32
    dense = sum(t.nbytes for t in state.values() if type(t).__name__ != "Int4OpaqueTensor")
    assert 0 < (out / "pytorch_model.bin").stat().st_size - quantized - dense < 64 * 1024  # pickle framing only
    info = json.loads((out / INFO_FILE).read_text())
    assert (info["layout"], info["bits"], info["quantized_layers"], info["cpu_capability"]) == ("packed", 3, 14, cpu_capability())
    assert info["max_abs_error"] == report["max_abs_error"] and report["max_rel_error"] < 1e-6
    assert report["folder_bytes"] < reports["int3-g32"]["folder_bytes"]


def test_refusals_write_nothing(exported, tmp_path, monkeypatch):
    root, _, _, _ = exported
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

    refused = {("int8-g16", "packed", None): "holds codes of up to 4 bits, not 8; use layout='unpacked'",
               ("untied-bias-int3", "packed", None): "layer 'lm_head': .*out_features % 16 == 0, not 300",
               ("int3-g32", "bogus", None): "layout 'bogus' is not known; use one of unpacked, packed",
               ("int3-g32", "unpacked", "AVX2"): "cpu_capability applies to layout='packed' only",
               ("int3-g32", "packed", "NEON"): "no packed int4 layout is known for CPU capability 'NEON'"}
    for (name, layout, cap), message in refused.items():
        with pytest.raises(QaloraError, match=message):
            export_torchao(root / name, tmp_path / "e", layout=layout, cpu_capability=cap, progress=False)

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QaloraError, match=r"pip install 'qalora\[export\]'"):
        export_torchao(ckpt, tmp_path / "d", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed", "plain", "taken"]


def test_cli_export_torchao(exported, tmp_path, capsys):
    root, _, _, _ = exported
    ckpt = root / "int2-g32"
    assert main(["export", "--model", str(ckpt), "--format", "torchao", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m" / INFO_FILE).read_text())["bits"] == 2
    assert main(["export", "--model", str(ckpt), "--format", "torchao", "--fallback", "f16",
                 "--out", str(tmp_path / "n")]) == 2
    assert "--fallback applies to --format gguf only" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    assert main(["export", "--model", str(ckpt), "--format", "torchao", "--layout", "packed", "--out",
                 str(tmp_path / "p"), "--quiet"]) == 0
    assert json.loads((tmp_path / "p" / "config.json").read_text())["qalora_torchao"]["layout"] == "packed"
    assert main(["export", "--model", str(ckpt), "--layout", "packed", "--out", str(tmp_path / "q.gguf")]) == 2
    assert "--layout applies to --format torchao only" in capsys.readouterr().err
    assert not (tmp_path / "q.gguf").exists()


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
