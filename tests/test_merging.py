"""The exact merge: offsets absorb the adapter, codes and scales stay, logits agree; the file
API writes a loadable checkpoint with its report, or refuses and writes nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_tokenizer
from qalora.adapters.attach import adapter_layers, add_adapters, load_adapter_state
from qalora.checkpoint import load, save_checkpoint
from qalora.config import LoraConfig, QuantConfig, TrainConfig
from qalora.errors import QaloraError
from qalora.io import sha256_file
from qalora.merging.verify import compare_logits, verify_merge
from qalora.adapters.layer import AdaptedLinear
from qalora.merging.command import REPORT_FILE, merge
from qalora.adapters.kinds.qalora import qalora_delta
from qalora.merging.exact import merge_layer as merge_qalora_layer
from qalora.merging.surgery import merge_model_inplace, shared_copy
from qalora.nn.quant_linear import QuantLinear
from qalora.patch import set_kernel
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight
from qalora.quant.model import quantize_model
from qalora.training.loop import train

LORA = LoraConfig(rank=4, alpha=8)
QA = [("What is two plus two?", "Four."), ("Name a colour.", "Blue."), ("Say hello.", "Hello there!"),
      ("What do bees make?", "Honey."), ("Capital of France?", "Paris."), ("Count to three.", "One, two, three.")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints (4-bit g32 seed 0; seed 1; g64), an fp folder, a QA-LoRA adapter trained 3
    steps at lr 1e-2 (so B is non-zero) and a LoRA adapter trained 1 step."""
    root = tmp_path_factory.mktemp("merge")
    tok = tiny_tokenizer()
    for name, seed, group in (("q4", 0, 32), ("other", 1, 32), ("g64", 0, 64)):
        m = tiny_llama(seed)
        quantize_model(m, QuantConfig(bits=4, group_size=group, method="rtn"), progress=False)
        save_checkpoint(m, tok, root / name, {"bits": 4, "group_size": group, "method": "rtn", "source_model": "tiny"})
    tiny_llama(0).save_pretrained(root / "fp")
    tok.save_pretrained(root / "fp")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{q} (#{i})", "input": "", "output": a}) + "\n"
                            for i, (q, a) in enumerate(QA * 4)))
    run = dict(data=str(data), batch_size=4, lr=1e-2, max_seq_len=64, eval_every=3, save_every=3, eval_batches=1)
    train(root / "q4", root / "adapter", TrainConfig(steps=3, **run), LORA, progress=False)
    train(root / "fp", root / "lora", TrainConfig(method="lora", steps=1, **run), LORA, progress=False)
    return root


def quant_layer(out=32, inp=128, bits=3, L=32, seed=0):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.1
    codes, s, o = rtn_quantize(w, bits, L)
    return QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, s, o, bits, L), kernel="reference")


def adapted_tiny(bits: int, seed: int = 1):
    """A quantized tiny Llama with QA-LoRA on every projection and random (non-zero) B."""
    model = tiny_llama()
    quantize_model(model, QuantConfig(bits=bits, group_size=32, method="rtn"), progress=False)
    base = shared_copy(model)
    torch.manual_seed(seed)
    add_adapters(model, "qalora", LORA)
    for layer in adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return base, model.eval()


def merge_offsets(offset, A, B, s, L):
    """QA-LoRA's merged offsets as the merge computes them: fp64 sum, one rounding."""
    return (offset.double() + qalora_delta(A, B, s, L)).to(offset.dtype)


def test_merge_offsets_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    out_f, groups, r, L, s = 6, 3, 4, 32, 16 / 4
    offset, A, B = torch.randn(out_f, groups, generator=g), torch.randn(r, groups, generator=g), torch.randn(out_f, r, generator=g)
    naive = torch.empty_like(offset)
    for o in range(out_f):
        for j in range(groups):
            acc = sum(float(B[o, k]) * float(A[k, j]) for k in range(r))  # Python floats: float64
            naive[o, j] = float(offset[o, j]) + acc * s / L
    got = merge_offsets(offset, A, B, s, L)
    # equal: both sum in float64 and round to fp32 once (a differing last float64 bit would
    # change the fp32 result only at a rounding tie, ~2^-29 per element)
    assert torch.equal(got, naive) and got.dtype == torch.float32
    with pytest.raises(ValueError, match="do not chain"):
        merge_offsets(offset, A.t(), B, s, L)


def test_layer_merge_changes_only_offsets(files):
    model = load(files / "q4", kernel="reference")  # "auto" would pick bf16 int4 for 3 rows
    add_adapters(model, "qalora", LORA)
    load_adapter_state(model, load_file(str(files / "adapter" / "adapter.safetensors")))
    changed = 0
    for name, layer in adapter_layers(model).items():
        assert layer.lora_B.weight.abs().sum() > 0, name  # trained: B moved off zero
        before = layer.base.offset.clone()
        merged = merge_qalora_layer(layer)
        assert merged.qweight is layer.base.qweight and merged.scale is layer.base.scale  # the same tensors
        assert torch.equal(merged.qweight, layer.base.qweight) and torch.equal(merged.scale, layer.base.scale)
        assert torch.equal(layer.base.offset, before)  # the unmerged layer is untouched
        changed += not torch.equal(merged.offset, before)
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=1e-5)  # fp32 reassociation only
    assert changed == len(adapter_layers(model))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_merged_logits_match_unmerged(bits):
    base, model = adapted_tiny(bits)
    merged = shared_copy(model)
    names = merge_model_inplace(merged)
    assert len(names) == 14 and not any(isinstance(m, AdaptedLinear) for m in merged.modules())
    tok = tiny_tokenizer()
    set_kernel(merged, "auto")
    report = verify_merge(model, merged, tok)
    ref, i4 = report["reference"], report["int4"]
    # observed fp32 max |diff| 2.4e-6 / 2.2e-6 / 2.1e-6 at 2 / 3 / 4 bits (logits are O(1))
    assert ref["max_abs_logit_diff"] <= 1e-4 and ref["top1_agreement"] == 1.0 and ref["compute_dtype"] == "fp32"
    assert ref["n_tokens"] > 50
    # the adapter itself moves logits far more than the merge does (observed ~0.3-0.5)
    assert compare_logits(base, model, tok)["max_abs_logit_diff"] > 1e3 * ref["max_abs_logit_diff"]
    # bf16 int4 kernel: the merged offsets' bf16 zero points round differently from the
    # unmerged ones; observed max 0.031 / 0.027 / 0.040, mean ~0.004
    assert i4 is not None and i4["compute_dtype"] == "bf16" and i4["kernel"] == "int4"
    assert i4["max_abs_logit_diff"] < 0.15 and i4["mean_abs_logit_diff"] < 0.02 and i4["top1_agreement"] >= 0.95
    assert all(m.kernel == "auto" for m in merged.modules() if isinstance(m, QuantLinear))  # kernels restored


def test_zero_adapter_merge_is_bit_identical_and_idempotent():
    base = quant_layer()
    offset = base.offset.clone()
    once = merge_qalora_layer(AdaptedLinear(base, ("qalora",), LoraConfig(rank=4)))           # B starts at zero
    twice = merge_qalora_layer(AdaptedLinear(once, ("qalora",), LoraConfig(rank=4)))
    assert torch.equal(once.offset, offset) and torch.equal(twice.offset, offset)
    # model level: a merged model has nothing left to merge
    _, model = adapted_tiny(4)
    assert merge_model_inplace(model) and merge_model_inplace(model) == []


def test_merge_order_does_not_matter_beyond_rounding():
    g = torch.Generator().manual_seed(1)
    offset = torch.randn(8, 4, generator=g)
    a1, b1, a2, b2 = (torch.randn(*s, generator=g) for s in ((2, 4), (8, 2), (3, 4), (8, 3)))
    ab = merge_offsets(merge_offsets(offset, a1, b1, 2.0, 32), a2, b2, 2.0, 32)
    ba = merge_offsets(merge_offsets(offset, a2, b2, 2.0, 32), a1, b1, 2.0, 32)
    both = merge_offsets(offset, torch.cat([a1, a2]), torch.cat([b1, b2], 1), 2.0, 32)
    torch.testing.assert_close(ab, ba, rtol=0, atol=1e-6)  # two fp32 roundings vs one: a few ulp
    torch.testing.assert_close(ab, both, rtol=0, atol=1e-6)


def test_merge_files_end_to_end(files, capsys):
    out = files / "merged"
    report = merge(files / "q4", files / "adapter", out)
    assert "qalora merge: 14 qalora adapters merged" in capsys.readouterr().out
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("reference", "int4", "tolerance", "layers_merged", "codes_and_scales_unchanged"):
        assert key in saved
    assert saved["layers_merged"] == 14 and saved["codes_and_scales_unchanged"] is True
    assert saved["reference"]["max_abs_logit_diff"] <= 1e-4 and saved["int4"]["compute_dtype"] == "bf16"
    assert saved["max_abs_offset_change"] > 0
    meta = json.loads((out / "qalora.json").read_text())
    assert meta["bits"] == 4 and meta["group_size"] == 32 and meta["method"] == "rtn"
    assert meta["merged_adapter"]["method"] == "qalora" and meta["merged_adapter"]["rank"] == 4
    assert len(meta["merged_adapter"]["sha256"]) == 64
    base_w, merged_w = load_file(str(files / "q4" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert base_w.keys() == merged_w.keys()
    for k in base_w:
        same = torch.equal(base_w[k], merged_w[k])
        assert same != k.endswith(".offset"), k  # only offsets differ, every one of them
    # the loaded merged checkpoint computes what the unmerged base + adapter computes
    merged = load(out, kernel="reference")
    unmerged = load(files / "q4", kernel="reference")
    add_adapters(unmerged, "qalora", LORA)
    load_adapter_state(unmerged, load_file(str(files / "adapter" / "adapter.safetensors")))
    again = compare_logits(unmerged.eval(), merged, tiny_tokenizer())
    assert again["max_abs_logit_diff"] <= 1e-4


def _no_output(path):
    assert not path.exists()
    assert not list(path.parent.glob(f"*{path.name}.tmp-*"))  # no staging folder (ours or save_checkpoint's)


def test_refusals_write_nothing(files):
    out = files / "refused"
    cases = [
        ("other", "adapter", "trained on another base"),
        ("g64", "adapter", "trained on a group_size 32 grid .* has group_size 64"),
        ("q4", "lora", "method 'lora'.*does not merge exactly.*--requantize rtn\\|gptq"),
        ("q4", "nowhere", "is not a folder"),
    ]
    for base, adapter, msg in cases:
        with pytest.raises(QaloraError, match=msg):
            merge(files / base, files / adapter, out, progress=False)
        _no_output(out)
    broken = files / "broken"
    broken.mkdir()
    with pytest.raises(QaloraError, match="adapter config .* is missing"):
        merge(files / "q4", broken, out, progress=False)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(QaloraError, match="adapter config .* is corrupt"):
        merge(files / "q4", broken, out, progress=False)
    cfg = json.loads((files / "adapter" / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**cfg, "format": "peft"}))
    with pytest.raises(QaloraError, match="format 'peft'"):
        merge(files / "q4", broken, out, progress=False)
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QaloraError, match="adapter weights .* are missing"):
        merge(files / "q4", broken, out, progress=False)
    _no_output(out)
    exists = files / "exists"
    exists.mkdir()
    with pytest.raises(QaloraError, match="already exists"):
        merge(files / "q4", files / "adapter", exists, progress=False)
    assert not any(exists.iterdir())


def test_merge_beyond_tolerance_writes_nothing(files, monkeypatch):
    import qalora.merging.command as merge_mod

    real = merge_mod.verify_merge

    def drifted(*args, **kwargs):
        report = real(*args, **kwargs)
        report["reference"]["max_abs_logit_diff"] = 3e-3
        return report

    monkeypatch.setattr(merge_mod, "verify_merge", drifted)
    out = files / "drifted"
    with pytest.raises(QaloraError, match="exceeds the tolerance 0.0001"):
        merge(files / "q4", files / "adapter", out, progress=False)
    _no_output(out)


def test_failure_while_writing_leaves_nothing(files, monkeypatch):
    """The report is written after the checkpoint files, inside the same staging folder."""
    import qalora.merging.command as merge_mod

    def full_disk(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_mod, "write_json", full_disk)
    out = files / "half"
    with pytest.raises(OSError, match="No space"):
        merge(files / "q4", files / "adapter", out, progress=False)
    _no_output(out)


# ---------------------------------------------------------------------------------------------
# fp64 checks: per-layer exactness in ulps, the fp32 noise floor, the auto tolerance
# ---------------------------------------------------------------------------------------------

def test_weight_error_is_half_an_ulp_and_catches_a_wrong_merge():
    from qalora.merging.verify import MAX_WEIGHT_ULPS, layer_weight_error, weight_errors

    model = adapted_tiny(3)[1]
    merged = shared_copy(model)
    names = merge_model_inplace(merged)
    report = weight_errors(model, merged, names)
    assert 0 < report["max_weight_err_ulps"] <= MAX_WEIGHT_ULPS
    layer = model.get_submodule(names[0])
    wrong = merge_qalora_layer(layer)
    wrong.offset = wrong.offset + 1e-6 * wrong.offset.abs().max()   # a few ulps off
    assert layer_weight_error(layer, wrong)[1] > 1.0


def test_storage_floor_leaves_the_model_as_it_was():
    from qalora.merging.verify import fp64_checks

    model = adapted_tiny(3)[1]
    merged = shared_copy(model)
    merge_model_inplace(merged)
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    fp64_checks(model, merged, tiny_tokenizer())
    after = merged.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_float64_block_restores_every_tensor_bit_for_bit():
    from qalora.merging.verify import float64

    model = adapted_tiny(3)[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with float64(model):
        assert all(t.dtype == torch.float64 for t in model.parameters())
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_noise_floor_and_fp64_diff_are_small_but_measured():
    from qalora.merging.verify import auto_tolerance, fp64_checks

    model = adapted_tiny(3)[1]
    merged = shared_copy(model)
    merge_model_inplace(merged)
    out = fp64_checks(model, merged, tiny_tokenizer())
    assert 0 < out["fp32_noise_floor"] < 1e-4           # fp32 vs fp64 of one tiny model
    assert 0 <= out["fp64_max_abs_logit_diff"] < 1e-5   # only the fp32 storage of offset'
    assert 0 < out["fp32_storage_floor"] < 1e-5          # random sub-ulp moves of the offsets
    assert out["fp64_max_abs_logit_diff"] <= 4 * out["fp32_storage_floor"]
    assert auto_tolerance(None) == 1e-4 and auto_tolerance(1e-3) == 4e-3 and auto_tolerance(1e-6) == 1e-4
    assert auto_tolerance(None, 1e-3) == 1e-3 and auto_tolerance(1e-3, 1e-2) == 1e-2


def test_merge_report_has_the_fp64_figures(files):
    merge(files / "q4", files / "adapter", files / "merged_fp64", progress=False)
    report = json.loads((files / "merged_fp64" / REPORT_FILE).read_text())
    assert report["weights"]["max_weight_err_ulps"] <= 0.5 + 1e-6
    assert report["tolerance"] == 1e-4 and report["fp32_tolerance"] >= 1e-4 and report["fp64_tolerance"] >= 1e-4
    assert report["fp32_storage_floor"] > 0
    assert report["fp32_noise_floor"] > 0 and report["fp64_max_abs_logit_diff"] < 1e-5


def test_merge_refuses_offsets_that_are_not_the_exact_sum(files, monkeypatch):

    import qalora.merging.exact as exact
    real = exact.merged_triple

    def inexact(layer, name):
        codes, scale, offset = real(layer, name)
        return codes, scale, offset * (1 + 1e-5)

    monkeypatch.setattr(exact, "merged_triple", inexact)
    out = files / "inexact"
    with pytest.raises(QaloraError, match="ulp of its offsets"):
        merge(files / "q4", files / "adapter", out, progress=False)
    _no_output(out)


def test_merge_error_beyond_tolerance_in_fp64_writes_nothing(files, monkeypatch):
    import qalora.merging.command as merge_mod

    monkeypatch.setattr(merge_mod, "fp64_checks", lambda *a: {"fp32_noise_floor": 1e-6, "fp64_max_abs_logit_diff": 2e-4,
                                                          "fp32_storage_floor": 1e-6})
    out = files / "drifted64"
    with pytest.raises(QaloraError, match=r"2.00e-04 \(fp64\) exceeds the tolerance 0.0001"):
        merge(files / "q4", files / "adapter", out, progress=False)
    _no_output(out)


@pytest.mark.parametrize("method, switches", [("peqa", {}), ("qalora", {"train_scales": True}),
                                              ("lota", {"lota_omega": 1.0}), ("lota", {"with_qalora": True, "lota_omega": 1.0})],
                         ids=["peqa", "qalora+scales", "lota", "lota+qalora"])
def test_every_exact_method_merges_end_to_end(files, method, switches):
    data = files / "data.jsonl"
    run = dict(data=str(data), batch_size=4, lr=1e-2, max_seq_len=64, eval_every=3, save_every=3, eval_batches=1)
    name = method + "".join(f"-{k}" for k in switches)
    adir, out = files / f"a-{name}", files / f"m-{name}"
    cfg = train(files / "q4", adir, TrainConfig(method=method, steps=3, **run), LoraConfig(rank=4, alpha=8, **switches),
                progress=False)
    report = merge(files / "q4", adir, out, progress=False)
    c = report["changes"]
    assert report["kinds"] == cfg["kinds"] and report["weights"]["max_weight_err_ulps"] <= 0.5 + 1e-6
    assert (c["codes_changed"] > 0) == (method == "lota") and (c["scales_changed"] > 0) == ("scales" in cfg["kinds"])
    assert report["fp64_max_abs_logit_diff"] <= report["fp64_tolerance"]
    merged = load(out, kernel="reference")  # loads (hash verified) as a plain quantized model
    assert not any(isinstance(m, AdaptedLinear) for m in merged.modules())
    # refusals: the lossy path, another base, a corrupted ternary tensor, kinds that are not the method's
    with pytest.raises(QaloraError, match=f"is a '{method}' adapter: it merges exactly"):
        from qalora.merging.requantize import requantize
        requantize(files / "fp", adir, files / "never", QuantConfig(bits=4, method="rtn"), progress=False)
    with pytest.raises(QaloraError, match="trained on another base"):
        merge(files / "other", adir, files / "never", progress=False)
    _no_output(files / "never")


def test_corrupt_adapters_are_refused(files, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from qalora.adapters.format import read_adapter

    run = dict(data=str(files / "data.jsonl"), batch_size=4, lr=1e-2, max_seq_len=64, eval_every=1, save_every=1,
               eval_batches=1)
    adir = tmp_path / "lota"
    train(files / "q4", adir, TrainConfig(method="lota", steps=1, **run), LoraConfig(rank=4, alpha=8), progress=False)
    cfg = json.loads((adir / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(adir, bad)
    state = load_file(str(adir / "adapter.safetensors"))
    key = next(k for k in state if k.endswith("lota_A"))
    save_file({**state, key: state[key] * 2}, str(bad / "adapter.safetensors"))
    with pytest.raises(QaloraError, match="adapter.safetensors' are corrupt \\(sha256 differs from adapter_config.json"):
        read_adapter(bad)  # edited weights: the recorded hash no longer matches
    for edited in ({k: v for k, v in cfg.items() if k != "sha256"}, {**cfg, "sha256": {"adapter.safetensors": None}}):
        (bad / "adapter_config.json").write_text(json.dumps(edited))
        with pytest.raises(QaloraError, match="has no sha256 of adapter.safetensors; it was not written by qalora"):
            read_adapter(bad)  # never read unverified
    cfg = {**cfg, "sha256": {"adapter.safetensors": sha256_file(bad / "adapter.safetensors")}}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QaloraError, match=f"adapter tensor {key} .* is ternary but holds values other than -1, 0, 1"):
        read_adapter(bad)  # a hash that matches does not make the content valid
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "kinds": ["lota", "scales"]}))
    with pytest.raises(QaloraError, match="do not match its config: missing \\['model.layers.0.mlp.down_proj.log_scale'"):
        read_adapter(bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "kinds": ["qalora"]}))
    with pytest.raises(QaloraError, match="kinds \\['qalora'\\] are not those of method 'lota'"):
        read_adapter(bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "format_version": 1}))
    with pytest.raises(QaloraError, match="has format_version 1; this qalora reads version 2"):
        read_adapter(bad)


def test_on_kernel_drops_only_the_repacked_weights_it_built():
    """After a verification pass on the int4 kernel no layer keeps its int4 layout (the merge would
    otherwise hold two models' worth of it), and a layer that had one before keeps it."""
    from qalora.merging.verify import on_kernel
    from qalora.patch import quant_layers

    model = tiny_llama()
    quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    layers = list(quant_layers(model).values())
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    keep = layers[0]
    set_kernel(model, "int4")
    with torch.no_grad():
        model(ids)
    if not keep.has_kernel_state("int4"):
        pytest.skip("the int4 kernel does not run on this machine")
    for q in layers[1:]:
        q.drop_kernel_state()
    set_kernel(model, "reference")
    with on_kernel("int4", model), torch.no_grad():
        model(ids)
        assert all(q.has_kernel_state("int4") for q in layers)
    assert keep.has_kernel_state("int4") and not any(q.has_kernel_state("int4") for q in layers[1:])
    assert all(q.kernel == "reference" for q in layers)
