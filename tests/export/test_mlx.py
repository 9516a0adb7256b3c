"""MLX export: our codes go into MLX's uint32 words unchanged (a naive bit-stream reader in this
file recovers them exactly), scales and biases are our scale and offset cast to the export dtype,
the folder's config carries mlx-lm's ``quantization`` block (per-layer entries where a layer
differs), its files have exactly the sizes of what they hold; bad group sizes and dtypes are
refused with one line and nothing written. With mlx-lm available (``/work/mlxenv/bin/python``,
``$QALORA_MLX_PYTHON``, or mlx installed in this interpreter), ``mlx_lm.load`` loads every
folder in a child process, its ``mx.dequantize`` of each layer equals our weight up to the
dtype's rounding, and its logits match qalora's fp32 reference kernel.

The mlx venv (kept apart so this interpreter's packages stay pinned)::

    python -m venv /work/mlxenv && /work/mlxenv/bin/pip install "mlx[cpu]==0.32.4" "mlx-lm==0.32.2"
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import assert_safetensors_exact, safetensors_table, tiny_llama, tiny_tokenizer
from qalora.api import quantize
from qalora.checkpoint import load, save_checkpoint
from qalora.cli import main
from qalora.config import QuantConfig
from qalora.errors import QaloraError
from qalora.export import mlx as mlx_export
from qalora.export.mlx import INDEX_FILE, INFO_FILE, export_mlx, mlx_words
from qalora.nn.quant_linear import QuantLinear
from qalora.patch import quant_layers, set_submodule
from qalora.quant.packing import pack
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight

PROMPTS = ["the quick brown fox jumps over the lazy dog", "group wise scales and offsets describe every block",
           "low rank adapters"]
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


pytestmark = pytest.mark.usefixtures("one_thread")


def naive_mlx_codes(words: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Codes ``[rows, n]`` read from MLX's ``uint32`` words by the definition, one at a time:
    a row is one little-endian bit stream (word ``j`` holds stream bits ``32j … 32j + 31``) and
    code ``k`` is stream bits ``k·b … k·b + b - 1`` (3-bit codes may straddle two words)."""
    rows = []
    for row in words.to(torch.int64).tolist():
        stream = sum(w << (32 * j) for j, w in enumerate(row))
        rows.append([(stream >> (k * bits)) & (2**bits - 1) for k in range(n)])
    return torch.tensor(rows, dtype=torch.uint8)


# ----------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features", [32, 96, 128, 384])
def test_words_hold_our_codes_exactly(bits, in_features):
    g = torch.Generator().manual_seed(bits * 1000 + in_features)
    codes = torch.randint(0, 2**bits, (7, in_features), generator=g, dtype=torch.uint8)
    words = mlx_words(pack(codes, bits))
    assert words.dtype == torch.uint32 and tuple(words.shape) == (7, in_features * bits // 32)
    assert torch.equal(naive_mlx_codes(words, in_features, bits), codes)


def test_words_known_values():
    """3 bits: codes 0 … 7 repeated; code 10 (value 2) straddles words 0 and 1 (bits 30 … 32)."""
    codes = torch.arange(32, dtype=torch.uint8).remainder(8).reshape(1, 32)
    stream = sum(int(c) << (3 * k) for k, c in enumerate(codes[0]))
    want = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(3)]
    assert mlx_words(pack(codes, 3)).to(torch.int64).tolist() == [want]
    assert mlx_words(pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8), 4)).to(torch.int64).tolist() \
        == [[0x87654321]]


# ----------------------------------------------------------------------------------- checkpoints

def save_fp(folder: Path, model, tok) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_qwen(kind: str, seed: int = 2):
    """A tiny random Qwen2 (q/k/v biases) or Qwen3 (q/k norms, head_dim) decoder, untied."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0,
                  rope_parameters={"rope_theta": 50000.0, "rope_type": "default"})
    cfg, cls = (Qwen2Config(**common), Qwen2ForCausalLM) if kind == "qwen2" else \
        (Qwen3Config(head_dim=16, **common), Qwen3ForCausalLM)
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif n.endswith("bias"):
                p.normal_(0, 0.3)
    return model


def requantize_layer(model, name: str, bits: int, group_size: int) -> None:
    """Replace one quantized layer by an RTN quantization of its own weight at other bits / group."""
    layer = quant_layers(model)[name]
    codes, scale, offset = rtn_quantize(layer.dequantized_weight(), bits, group_size, name)
    set_submodule(model, name, QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, scale, offset, bits, group_size),
                                                          kernel="reference"))


# name: (make checkpoint (root, tok) -> folder, bits, group size); all RTN
def _rtn(root, fp, name, bits, group_size=32, skip=("lm_head",)):
    quantize(fp, root / name, QuantConfig(bits=bits, group_size=group_size, method="rtn", skip=skip), progress=False)
    return root / name


def _mixed(root, fp):
    """INT4 g32 with two layers of their own: down_proj of layer 0 at 8 bits g64, q_proj of layer 1 at 2 bits g32."""
    base = _rtn(root, fp, "mixed-base", 4)
    model = load(base, kernel="reference")
    requantize_layer(model, "model.layers.0.mlp.down_proj", 8, 64)
    requantize_layer(model, "model.layers.1.self_attn.q_proj", 2, 32)
    from qalora.models import load_tokenizer

    save_checkpoint(model, load_tokenizer(base), root / "mixed", {"source_model": "tiny", "bits": 4, "group_size": 32})
    return root / "mixed"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every case saved as a full-precision folder and quantized with ``qalora.api.quantize``."""
    root = tmp_path_factory.mktemp("mlx")
    tok = tiny_tokenizer()
    llama = save_fp(root / "fp-llama", tiny_llama(), tok)
    cases = {f"int{b}": _rtn(root, llama, f"int{b}", b) for b in (2, 3, 4, 8)}
    cases["int4-g64"] = _rtn(root, llama, "int4-g64", 4, 64)
    cases["mixed"] = _mixed(root, llama)
    cases["lm-head"] = _rtn(root, llama, "lm-head", 3, skip=())  # tied config, quantized lm_head
    for kind in ("qwen2", "qwen3"):
        cases[kind] = _rtn(root, save_fp(root / f"fp-{kind}", tiny_qwen(kind), tok), kind, 4)
    return root, cases


# folder name: (case, dtype)
EXPORTS = {f"int{b}-float16": (f"int{b}", "float16") for b in (2, 3, 4, 8)}
EXPORTS.update({"int3-float32": ("int3", "float32"), "int3-bfloat16": ("int3", "bfloat16"),
                "int8-float32": ("int8", "float32"), "int4-g64-float16": ("int4-g64", "float16"),
                "mixed-float16": ("mixed", "float16"), "lm-head-float16": ("lm-head", "float16"),
                "qwen2-float16": ("qwen2", "float16"), "qwen2-float32": ("qwen2", "float32"),
                "qwen3-float16": ("qwen3", "float16")})


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    _, cases = checkpoints
    out = tmp_path_factory.mktemp("mlx-out")
    reports = {name: export_mlx(cases[case], out / name, dtype=dtype, progress=False)
               for name, (case, dtype) in EXPORTS.items()}
    return out, reports


# ----------------------------------------------------------------------------------- layout (no mlx)

def expected_tensors(ckpt: Path, dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` the export must hold, from the checkpoint alone."""
    meta = json.loads((ckpt / "qalora.json").read_text())
    st = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[dtype]
    want = {}
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            layer, _, part = key.rpartition(".")
            if layer in meta["layers"] and part != "bias":  # a layer's bias is a float tensor like any other
                spec = meta["layers"][layer]
                groups = spec["in_features"] // spec["group_size"]
                if part == "qweight":
                    want[f"{layer}.weight"] = ("U32", (spec["out_features"], spec["in_features"] * spec["bits"] // 32))
                else:
                    want[f"{layer}.{'scales' if part == 'scale' else 'biases'}"] = (st, (spec["out_features"], groups))
            else:
                want[key] = (st, tuple(f.get_slice(key).get_shape()))
    return want


@pytest.mark.parametrize("name", list(EXPORTS))
def test_layout_codes_scales_biases_exact(checkpoints, exported, name):
    _, cases = checkpoints
    out, reports = exported
    case, dtype = EXPORTS[name]
    ckpt, folder, report = cases[case], out / name, reports[name]
    want = expected_tensors(ckpt, dtype)
    tensor_bytes = assert_safetensors_exact(folder / "model.safetensors", want)
    assert report["weights_bytes"] == tensor_bytes
    meta = json.loads((ckpt / "qalora.json").read_text())
    td = TORCH_DTYPES[dtype]
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as src, \
            safe_open(str(folder / "model.safetensors"), framework="pt") as got:
        for layer, spec in meta["layers"].items():
            qw = QuantizedWeight(*(src.get_tensor(f"{layer}.{p}") for p in ("qweight", "scale", "offset")),
                                 spec["bits"], spec["group_size"], spec["in_features"])
            words = got.get_tensor(f"{layer}.weight")
            assert words.dtype == torch.uint32
            assert torch.equal(naive_mlx_codes(words, spec["in_features"], spec["bits"]), qw.codes()), layer
            assert torch.equal(got.get_tensor(f"{layer}.scales"), qw.scale.to(td)), layer
            assert torch.equal(got.get_tensor(f"{layer}.biases"), qw.offset.to(td)), layer
        for key in src.keys():
            if key.rpartition(".")[0] not in meta["layers"] or key.endswith(".bias"):
                assert torch.equal(got.get_tensor(key), src.get_tensor(key).to(td)), key
    if dtype == "float32":
        assert report["max_abs_error"] == 0.0  # fp32 scale/offset: the same weights
    else:  # scale and offset rounded once to fp16 (11 bits) / bf16 (8 bits)
        assert 0 < report["max_rel_error"] < (2**-9 if dtype == "float16" else 2**-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_folder_config_files_and_sizes(checkpoints, exported, bits):
    _, cases = checkpoints
    out, reports = exported
    name = f"int{bits}-float16"
    folder, ckpt, report = out / name, cases[f"int{bits}"], reports[name]
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             INFO_FILE]
    assert sorted(p.name for p in folder.iterdir()) == sorted(files) == report["files"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    cfg = json.loads((folder / "config.json").read_text())
    block = {"group_size": 32, "bits": bits, "mode": "affine"}
    assert cfg["quantization"] == cfg["quantization_config"] == block
    source = json.loads((ckpt / "config.json").read_text())
    assert cfg["rope_theta"] == source["rope_parameters"]["rope_theta"] and "rope_scaling" not in cfg
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True and cfg["dtype"] == "float16"
    assert {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config", "rope_theta", "dtype")} \
        == {k: v for k, v in source.items() if k != "dtype"}
    for f in ("tokenizer_config.json", "generation_config.json"):
        assert (folder / f).read_bytes() == (ckpt / f).read_bytes()
    compact = (folder / "tokenizer.json").read_text(encoding="utf-8")
    assert json.loads(compact) == json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    assert "\n" not in compact and len(compact.encode()) <= (ckpt / "tokenizer.json").stat().st_size
    assert report["folder_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["source_sha256"] == json.loads((ckpt / "qalora.json").read_text())["sha256"]["model.safetensors"]
    assert (info["quantization"], info["overrides"], info["quantized_layers"]) == (block, {}, 14)
    # Exact size: per layer out * in * bits / 8 bytes of codes + 2 * 2 bytes per group, plus the
    # fp16 embedding (300 x 64) and norms (5 x 64): nothing else is stored
    weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # 2 layers of q, o; k, v; gate, up, down
    groups = weights // 32
    assert report["weights_bytes"] == weights * bits // 8 + 4 * groups + 2 * (300 * 64 + 5 * 64)


def test_mixed_layers_have_their_own_entries(exported):
    out, reports = exported
    cfg = json.loads((out / "mixed-float16" / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"] == {
        "group_size": 32, "bits": 4, "mode": "affine",
        "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8, "mode": "affine"},
        "model.layers.1.self_attn.q_proj": {"group_size": 32, "bits": 2, "mode": "affine"}}
    assert len(reports["mixed-float16"]["overrides"]) == 2


def test_quantized_lm_head_is_untied(exported):
    out, reports = exported
    cfg = json.loads((out / "lm-head-float16" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and reports["lm-head-float16"]["tie_word_embeddings"] is False
    with safe_open(str(out / "lm-head-float16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.uint32 and "lm_head.scales" in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    assert any("lm_head is quantized" in n for n in reports["lm-head-float16"]["notes"])


def test_qwen_configs_pass_through(exported):
    out, _ = exported
    for name, theta in (("qwen2-float16", 50000.0), ("qwen3-float16", 50000.0)):
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["model_type"] == name.split("-")[0] and cfg["rope_theta"] == theta
    with safe_open(str(out / "qwen2-float16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").dtype == torch.float16


def test_sharded_folder(checkpoints, tmp_path, monkeypatch):
    """Past SHARD_BYTES the weights split into mlx-lm's shard files, with an index."""
    _, cases = checkpoints
    monkeypatch.setattr(mlx_export, "SHARD_BYTES", 20_000)
    report = export_mlx(cases["int4"], tmp_path / "sharded", progress=False)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    held = {}
    for s in shards:
        held.update({k: s for k in safetensors_table(tmp_path / "sharded" / s)[1]})
    assert held == index["weight_map"] and index["metadata"]["total_size"] == report["weights_bytes"]


def test_refusals_one_line_nothing_written(checkpoints, tmp_path):
    root, cases = checkpoints
    tok = tiny_tokenizer()
    g16 = _rtn(tmp_path, root / "fp-llama", "g16", 4, 16)
    wide = save_fp(tmp_path / "fp-wide", tiny_llama(hidden=192, inter=384), tok)
    g96 = _rtn(tmp_path, wide, "g96", 4, 96)
    before = sorted(p.name for p in tmp_path.iterdir())

    def refused(pattern, *args, **kwargs):
        with pytest.raises(QaloraError, match=pattern) as e:
            export_mlx(*args, progress=False, **kwargs)
        assert "\n" not in str(e.value)

    refused(r"14 of 14 quantized layers have group_size 96 .*MLX's quantized layers hold group sizes 32, 64, 128",
            g96, tmp_path / "a")
    refused(r"group_size 16 \(first: model\.layers\.0\..*group sizes 32, 64, 128", g16, tmp_path / "b")
    refused(r"dtype 'float64' is unknown; use one of float16, bfloat16, float32", cases["int3"], tmp_path / "c",
            dtype="float64")
    refused("already exists", cases["int3"], tmp_path / "g16")

    # offsets beyond fp16's range: refused in float16 (naming what works), written in float32
    big = load(cases["int3"], kernel="reference")
    layer = quant_layers(big)["model.layers.0.mlp.up_proj"]
    layer.offset.add_(1e5)
    save_checkpoint(big, tok, tmp_path / "big", {"source_model": "tiny", "bits": 3, "group_size": 32})
    before.append("big")
    refused(r"model\.layers\.0\.mlp\.up_proj has offsets reaching 1e\+05, beyond float16's range; export with "
            r"dtype='float32' or 'bfloat16'", tmp_path / "big", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # nothing written, no temporary folder
    assert export_mlx(tmp_path / "big", tmp_path / "e", dtype="float32", progress=False)["max_abs_error"] == 0.0


def test_cli_export_mlx(checkpoints, tmp_path, capsys):
    _, cases = checkpoints
    ckpt = cases["int2"]
    assert main(["export", "--model", str(ckpt), "--format", "mlx", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]["bits"] == 2
    assert json.loads((tmp_path / "m" / INFO_FILE).read_text())["dtype"] == "float16"
    assert main(["export", "--model", str(ckpt), "--format", "mlx", "--dtype", "bfloat16", "--out", str(tmp_path / "n"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "n" / INFO_FILE).read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    for argv, message in ((["--format", "mlx", "--dtype", "int8"], "dtype 'int8' is unknown"),
                          (["--format", "mlx", "--fallback", "f16"], "--fallback applies to --format gguf only"),
                          (["--format", "gguf", "--dtype", "float32"], "--dtype applies to --format mlx only")):
        assert main(["export", "--model", str(ckpt), *argv, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------- mlx-lm (child process)

def mlx_python() -> list[str] | None:
    """The interpreter that has mlx and mlx-lm: ``$QALORA_MLX_PYTHON``, ``/work/mlxenv/bin/python``,
    or this one when both are installed here; None when none has them."""
    for candidate in (os.environ.get("QALORA_MLX_PYTHON"), "/work/mlxenv/bin/python"):
        if candidate and Path(candidate).is_file():
            return [candidate]
    if importlib.util.find_spec("mlx") and importlib.util.find_spec("mlx_lm"):
        return [sys.executable]
    return None


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load, generate
    mx.set_default_device(mx.cpu)
    folders, prompts, ids, dest = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    arrays, info = {}, {}
    for name, folder in folders.items():
        model, tok = load(folder)
        layers = {}
        for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            if isinstance(m, nn.QuantizedLinear):
                w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
                arrays[f"{name}|deq|{path}"] = np.array(w.astype(mx.float32))
                layers[path] = [m.bits, m.group_size, str(m.scales.dtype)]
        for i, seq in enumerate(ids):
            logits = model(mx.array([seq]))[0]
            arrays[f"{name}|logits|{i}"] = np.array(logits.astype(mx.float32))
        info[name] = {"layers": layers, "tokens": [tok.encode(p) for p in prompts],
                      "reply": generate(model, tok, prompt=prompts[0], max_tokens=4),
                      "embed_dtype": str(model.model.embed_tokens.weight.dtype)}
    np.savez(dest, **arrays)
    print(json.dumps(info))
""")


@pytest.fixture(scope="module")
def mlx_loaded(checkpoints, exported, tmp_path_factory):
    """Every exported folder (plus a sharded one) loaded by mlx-lm in one child process."""
    python = mlx_python()
    if python is None:
        pytest.skip("mlx-lm is not available: pip install 'qalora[mlx]' (or make /work/mlxenv, see this file's "
                    "docstring, or set QALORA_MLX_PYTHON)")
    _, cases = checkpoints
    out, _ = exported
    folders = {name: str(out / name) for name in EXPORTS}
    mlx_export.SHARD_BYTES, keep = 20_000, mlx_export.SHARD_BYTES
    try:
        export_mlx(cases["int3"], out / "int3-sharded", progress=False)
    finally:
        mlx_export.SHARD_BYTES = keep
    folders["int3-sharded"] = str(out / "int3-sharded")
    tok = tiny_tokenizer()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    dest = tmp_path_factory.mktemp("mlx-child") / "loaded.npz"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run([*python, "-c", CHILD, json.dumps(folders), json.dumps(PROMPTS), json.dumps(ids), str(dest)],
                       check=False, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    with np.load(dest) as npz:
        arrays = {k: torch.from_numpy(npz[k]) for k in npz.files}
    return info, arrays, ids


def case_of(name: str) -> str:
    return "int3" if name == "int3-sharded" else EXPORTS[name][0]


def dtype_of(name: str) -> str:
    return "float16" if name == "int3-sharded" else EXPORTS[name][1]


# Logit tolerances against qalora's fp32 reference kernel (2 layers, |logit| up to ~3), from the
# max |Δ| over every case measured 2026-12-01 (mlx 0.32.4, CPU): float32 1.9e-6 -> 1e-4 (fp32
# rounding; 50x margin); float16 1.7e-2 (fp16 activations and fp16 scale/offset, 11-bit
# significand) -> 6e-2; bfloat16 1.2e-1 (8-bit significand) -> 4e-1 (3.5x margin each).
LOGIT_ATOL = {"float32": 1e-4, "float16": 6e-2, "bfloat16": 4e-1}


@pytest.mark.parametrize("name", [*EXPORTS, "int3-sharded"])
def test_mlx_lm_loads_and_matches_reference_logits(checkpoints, mlx_loaded, name):
    info, arrays, ids = mlx_loaded
    _, cases = checkpoints
    got = info[name]
    ref = load(cases[case_of(name)], kernel="reference")
    assert got["tokens"] == ids  # mlx-lm's tokenizer wrapper tokenizes as the HF tokenizer does
    assert isinstance(got["reply"], str) and got["embed_dtype"] == f"mlx.core.{dtype_of(name)}"
    layers = quant_layers(ref)
    assert {k: v[:2] for k, v in got["layers"].items()} == {n: [m.bits, m.group_size] for n, m in layers.items()}
    assert {v[2] for v in got["layers"].values()} == {f"mlx.core.{dtype_of(name)}"}
    worst = 0.0
    for i, seq in enumerate(ids):
        with torch.no_grad():
            want = ref(torch.tensor([seq])).logits[0]
        logits = arrays[f"{name}|logits|{i}"]
        worst = max(worst, float((logits - want).abs().max()))
        torch.testing.assert_close(logits, want, rtol=0, atol=LOGIT_ATOL[dtype_of(name)])
        if dtype_of(name) == "float32":
            assert torch.equal(logits.argmax(-1), want.argmax(-1))
    print(f"{name}: max |Δlogit| {worst:.3g}")


def dequantize_bound(qw: QuantizedWeight, dtype: str) -> torch.Tensor:
    """Per-weight bound on |mx.dequantize - ours| ``[out, in]``: scale and offset each rounded once
    to the dtype (relative ``u`` = 2^-11 fp16, 2^-8 bf16, 2^-24 fp32), then ``scales·q`` and the sum
    each rounded once in that dtype: at most ``3u·(|offset| + 2^b·|scale|)``; 4u leaves margin,
    plus the dtype's smallest subnormal step for tiny scales. Measured 2026-12-01 on INT3: float32
    exactly 0 (MLX's CPU dequantize is ``fl(fl(s·q) + b)`` like ours), float16 1.33u, bfloat16 1.42u."""
    u, tiny = {"float16": (2.0**-11, 2.0**-24), "bfloat16": (2.0**-8, 0.0), "float32": (2.0**-24, 0.0)}[dtype]
    per_group = 4 * u * (qw.offset.abs() + 2**qw.bits * qw.scale.abs()) + 2**qw.bits * tiny
    return per_group.repeat_interleave(qw.group_size, dim=1)


@pytest.mark.parametrize("name", [*EXPORTS, "int3-sharded"])
def test_mx_dequantize_equals_our_weights(checkpoints, mlx_loaded, name):
    _, arrays, _ = mlx_loaded
    _, cases = checkpoints
    layers = quant_layers(load(cases[case_of(name)], kernel="reference"))
    for layer, m in layers.items():
        qw = m.quantized_weight()
        theirs, ours = arrays[f"{name}|deq|{layer}"], qw.dequantize()
        bound = dequantize_bound(qw, dtype_of(name))
        assert bool(((theirs - ours).abs() <= bound).all()), (layer, float((theirs - ours).abs().max()))
        if dtype_of(name) != "float32":  # MLX's fp16/bf16 weight is ours rounded, not something else
            assert float((theirs - ours).abs().max()) > 0
