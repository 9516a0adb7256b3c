"""Tune a GGUF in place: import the embedded Q4_1 file, train LoTA-QAF codes only, merge exactly,
write the file back like its source. Only code bits may differ from the source file, and gguf-py's
own dequantization of the written file is the merged checkpoint's weight, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from qalora.checkpoint import load
from qalora.config import LoraConfig, TrainConfig
from qalora.formats import gguf_types
from qalora.formats.gguf_file import read_gguf
from qalora.formats.gguf_import import SOURCE_FILE, export_like, import_gguf
from qalora.formats.gguf_names import inverse_rotary_order
from qalora.merging.command import merge
from qalora.training.loop import train

pytestmark = [pytest.mark.embedded, pytest.mark.usefixtures("one_thread")]


def test_lota_codes_only_on_an_imported_gguf_lands_back_in_its_own_type(tmp_path):
    from qalora.default_model import gguf_path

    src = gguf_path()
    import_gguf(src, tmp_path / "ckpt")
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}? Answer:", "completion": f" {2 * i}."} for i in range(24)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(method="lota", data=str(tmp_path / "d.jsonl"), steps=2, batch_size=2, max_seq_len=32,
                      eval_every=2, save_every=2, eval_batches=1)
    # a low threshold, so that two steps of t-SignSGD already move codes
    train(tmp_path / "ckpt", tmp_path / "a", cfg, LoraConfig(rank=4, lota_omega=0.5, lota_codes_only=True),
          progress=False)
    report = merge(tmp_path / "ckpt", tmp_path / "a", tmp_path / "m", progress=False)
    assert report["changes"]["codes_changed"] and not report["changes"]["scales_changed"]
    assert report["max_abs_offset_change"] == 0.0
    r = export_like(tmp_path / "m", src, tmp_path / "tuned.gguf")
    assert r["rewritten"] and r["size"] == src.stat().st_size

    before, after = read_gguf(src), read_gguf(tmp_path / "tuned.gguf")
    assert before.metadata() == after.metadata() and list(before.tensors) == list(after.tensors)
    side = json.loads((tmp_path / "m" / SOURCE_FILE).read_text())["layers"]
    merged = load(tmp_path / "m", kernel="reference")
    for name in before.names():
        if name not in r["rewritten"]:
            assert np.array_equal(before.raw(name), after.raw(name)), name
    for module, rec in side.items():
        if rec["tensor"] not in r["rewritten"]:
            continue
        old, new = before.decoded(rec["tensor"]), after.decoded(rec["tensor"])
        for key in old.source:          # d and m: the very fp16 values of the source
            assert np.array_equal(old.source[key].view(np.uint16), new.source[key].view(np.uint16)), (module, key)
        moved = new.codes.astype(np.int16) - old.codes.astype(np.int16)
        assert np.abs(moved).max() == 1 and new.codes.max() <= 15
        info = after.tensor_info(rec["tensor"])
        w = gguf_dequantize(after.raw(rec["tensor"]).reshape(info.rows, -1), GGMLQuantizationType[info.type_name])
        order = rec.get("row_order")
        if order:
            w = w[inverse_rotary_order(info.rows, order["heads"])]
        layer = merged.get_submodule(module)
        ours = layer.quantized_weight().dequantize()
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), ours), module
        assert np.array_equal(gguf_types.dequantize(new), gguf_dequantize(after.raw(rec["tensor"]).reshape(
            info.rows, -1), GGMLQuantizationType[info.type_name]).astype(np.float32))
