"""Import a GGUF (llama.cpp) file as a qalora checkpoint, and write the checkpoint back "like" it.

No dequantize → requantize happens in either direction: a GGUF block type *is* a per-group affine
grid (``gguf_types``), so its codes, scale and offset become a ``QuantLinear``'s buffers as they
are, and its stored parameters (fp16 ``d``/``m``/``dmin``, integer ``sc``/``mins``) are kept
beside them so the exact bytes can be rebuilt.

Import (``import_gguf(path, out)``)::

    read_gguf(path) ─ hf_config_dict ─► empty transformers model (meta device, fp32)
      blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight  (block-quantized)
          decode → codes uint8 [out, in], scale/offset fp32 [out, in/L], source {d, m, ...}
          rows → HF order (``hf_rows = gguf_rows[row_order]``, llama's Q/K) → QuantLinear
      everything else (embeddings, norms, lm_head, biases): float32 (F32/F16/BF16 widened,
          a quantized one dequantized); never written back, the source bytes are kept
    OUT/  the ordinary checkpoint (``checkpoint.write_checkpoint``: model.safetensors,
          qalora.json, config, tokenizer with the GGUF's chat template), plus two sidecars:
          gguf_storage.safetensors  ``<hf module>.<key>``: each projection's ``source`` arrays,
                                    rows in HF order like the checkpoint's scale/offset
          gguf_source.json          source path, SHA-256, size; per projection its GGUF tensor,
                                    type, rows/cols and row order (None or rotary + heads)

The sidecars are written into the same staging folder before ``qalora.json``, which records
their SHA-256s under ``gguf_source`` (with the source's SHA-256): the checkpoint still appears
atomically, ``load`` and its weights-hash check are untouched, and export verifies the sidecars.

Export (``export_like(checkpoint, source, out)``): per projection, the checkpoint's current codes
(unpacked) and the stored source params are put back in GGUF row order and ``gguf_types.encode``d;
the layer's scale/offset must equal what those params give (``decode``'s derivation, bit for bit),
otherwise the triple changed in a way the type cannot store and export refuses, naming the layer.
Tensors whose bytes equal the source's are kept; ``gguf_file.write_like`` copies the rest.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from qalora.checkpoint import META_FILE, read_meta, read_tensors, write_checkpoint
from qalora.errors import QaloraError
from qalora.formats import gguf_types
from qalora.formats.gguf_file import FLOAT_TYPES, GGUFTensors, read_gguf, write_like
from qalora.formats.gguf_names import hf_config_dict, inverse_rotary_order, tensor_map
from qalora.formats.gguf_types import GGUF_TYPES
from qalora.io import atomic_dir, read_json, sha256_file, write_json
from qalora.nn.quant_linear import QuantLinear
from qalora.patch import set_submodule
from qalora.quant.packing import unpack
from qalora.quant.weight import QuantizedWeight

METHOD = "gguf-import"
STORAGE_FILE = "gguf_storage.safetensors"
SOURCE_FILE = "gguf_source.json"
SIDECARS = (STORAGE_FILE, SOURCE_FILE)
_PROJECTION = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def _err(msg: str) -> QaloraError:
    return QaloraError(" ".join(msg.split()))


# --------------------------------------------------------------------------- import

def _read(path: Path) -> tuple[GGUFTensors, dict, dict]:
    """``(file, transformers config dict, {gguf name: HFTensor})``; errors as one-line QaloraError."""
    try:
        g = read_gguf(path)
        meta = g.metadata()
        return g, hf_config_dict(meta, g.names()), tensor_map(meta, g.tensors)
    except ValueError as e:
        raise _err(str(e)) from None


def _float_tensor(g: GGUFTensors, name: str) -> np.ndarray:
    """A non-projection tensor as fp32: F32/F16/BF16 widened, a block type dequantized."""
    info = g.tensor_info(name)
    if info.type_name in FLOAT_TYPES:
        return g.float_array(name)
    if info.type_name in GGUF_TYPES:
        return gguf_types.dequantize(g.decoded(name))
    raise _err(f"GGUF tensor {name!r} has type {info.type_name}; accepted: {', '.join((*FLOAT_TYPES, *GGUF_TYPES))}")


def _row_order_record(order, rows: int, head_dim: int) -> dict | None:
    """``None`` or ``{"kind": "rotary", "heads": n}``, checked to rebuild ``order`` exactly."""
    if order is None:
        return None
    heads = rows // head_dim
    if not np.array_equal(inverse_rotary_order(rows, heads), order):
        raise _err(f"row order of a {rows}-row tensor is not the rotary order of {heads} heads")
    return {"kind": "rotary", "heads": heads}


def _row_order(record: dict | None, rows: int) -> np.ndarray | None:
    return None if record is None else inverse_rotary_order(rows, int(record["heads"]))


def _projection(g: GGUFTensors, name: str, target, bias) -> tuple[QuantLinear, dict]:
    """``(QuantLinear in HF row order, {key: source array in HF row order})``."""
    info = g.tensor_info(name)
    if info.type_name not in GGUF_TYPES or len(info.shape) != 2:
        raise _err(f"GGUF projection {name!r} has type {info.type_name} shape {info.shape}; "
                   f"accepted: 2-D {', '.join(GGUF_TYPES)}")
    dec = g.decoded(name)
    bt = GGUF_TYPES[info.type_name]
    codes, scale, offset = (torch.from_numpy(np.ascontiguousarray(target.apply(a)))
                            for a in (dec.codes, dec.scale, dec.offset))
    qw = QuantizedWeight.from_codes(codes, scale, offset, bt.bits, bt.group_size)
    layer = QuantLinear.from_quantized(qw, bias)
    return layer, {k: np.ascontiguousarray(target.apply(v)) for k, v in dec.source.items()}


def _build_model(cfg: dict):
    from qalora.quiet import import_transformers

    import_transformers()  # torchao's import noise silenced, as in checkpoint.load
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _fill(model, g: GGUFTensors, tmap: dict, head_dim: int, progress: bool):
    """Put every GGUF tensor into ``model``; returns ``(storage arrays, per-layer records)``."""
    floats = {t.hf_name: torch.from_numpy(np.ascontiguousarray(t.apply(_float_tensor(g, n))))
              for n, t in tmap.items() if not _PROJECTION.fullmatch(n)}
    storage, layers = {}, {}
    for i, (name, target) in enumerate(tmap.items()):
        if not _PROJECTION.fullmatch(name):
            continue
        module = target.hf_name.removesuffix(".weight")
        layer, source = _projection(g, name, target, floats.pop(f"{module}.bias", None))
        set_submodule(model, module, layer)
        storage.update({f"{module}.{k}": v for k, v in source.items()})
        info = g.tensor_info(name)
        layers[module] = {"tensor": name, "type": info.type_name, "rows": info.rows, "cols": info.cols,
                          "row_order": _row_order_record(target.row_order, info.rows, head_dim)}
        if progress and len(layers) % 30 == 0:
            print(f"qalora: imported {len(layers)} projections ({i + 1}/{len(tmap)} tensors)", flush=True)
    result = model.load_state_dict(floats, strict=False, assign=True)
    if result.unexpected_keys:
        raise _err(f"GGUF tensors have no place in the model: {result.unexpected_keys[:3]}")
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise _err(f"the GGUF lacks tensors the model needs: {missing[:3]}")
    return storage, layers


def _tokenizer(path: Path, metadata: dict):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = metadata.get("tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


def import_gguf(path, out, progress: bool = False) -> dict:
    """Import GGUF ``path`` as a new qalora checkpoint folder ``out`` (atomic); returns its
    ``qalora.json``. Projections keep their exact codes/scale/offset (bits and group size of
    their type); see the module docstring for the sidecars."""
    path = Path(path).resolve()
    g, cfg, tmap = _read(path)
    if progress:
        print(f"qalora: importing {path.name} ({len(tmap)} tensors)", flush=True)
    model = _build_model(cfg).eval()
    storage, layers = _fill(model, g, tmap, int(cfg["head_dim"]), progress)
    if not layers:
        raise _err(f"GGUF {str(path)!r} has no block-quantized projections; accepted: {', '.join(GGUF_TYPES)}")
    tok = _tokenizer(path, g.metadata())
    types = Counter(r["type"] for r in layers.values())
    main = GGUF_TYPES[types.most_common(1)[0][0]]
    source = {"file": str(path), "sha256": sha256_file(path), "size": path.stat().st_size}
    meta = {"source_model": str(path), "method": METHOD, "bits": main.bits, "group_size": main.group_size,
            "gguf_types": dict(types)}
    with atomic_dir(out) as tmp:
        save_numpy(storage, str(tmp / STORAGE_FILE), metadata={"format": "np", "qalora": "gguf-storage"})
        write_json(tmp / SOURCE_FILE, {**source, "storage": STORAGE_FILE, "layers": layers})
        meta["gguf_source"] = {**source, "sidecars": {f: sha256_file(tmp / f) for f in SIDECARS}}
        return write_checkpoint(model, tok, tmp, meta)


def save_imported(model, tokenizer, out, like) -> dict:
    """Save ``model`` (an imported checkpoint's model, codes possibly changed) as a new checkpoint
    ``out`` that keeps checkpoint ``like``'s GGUF meta and sidecars, so ``export_like`` works on it."""
    like = Path(like)
    meta = _gguf_meta(like)
    keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "layers", "sha256")}
    with atomic_dir(out) as tmp:
        for f in SIDECARS:
            shutil.copyfile(like / f, tmp / f)
        return write_checkpoint(model, tokenizer, tmp, keep)


# --------------------------------------------------------------------------- export

def _gguf_meta(ckpt: Path) -> dict:
    """``qalora.json`` of an imported checkpoint whose sidecars match their recorded SHA-256s."""
    meta = read_meta(ckpt)
    rec = meta.get("gguf_source")
    if not isinstance(rec, dict) or not isinstance(rec.get("sidecars"), dict):
        raise _err(f"checkpoint {str(ckpt)!r} was not imported from a GGUF (method {meta.get('method')!r}); "
                   f"accepted: a checkpoint written by import_gguf")
    for f in SIDECARS:
        if not (ckpt / f).is_file() or sha256_file(ckpt / f) != rec["sidecars"].get(f):
            raise _err(f"checkpoint {str(ckpt)!r}: {f} is missing or differs from the SHA-256 in {META_FILE}")
    return meta


def _check_source(source: Path, rec: dict) -> None:
    if not source.is_file():
        raise _err(f"source GGUF {str(source)!r} does not exist; expected the file the checkpoint was imported from")
    if sha256_file(source) != rec["sha256"]:
        raise _err(f"source GGUF {str(source)!r}: SHA-256 differs from the imported file's "
                   f"({rec['sha256'][:12]}…, {Path(rec['file']).name}); pass that file")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _encode_layer(module: str, rec: dict, spec: dict, state: dict, storage: dict) -> np.ndarray:
    """Raw GGUF bytes ``[rows, row_bytes]`` of one projection from the checkpoint's current codes."""
    bt = GGUF_TYPES[rec["type"]]
    rows, cols = rec["rows"], rec["cols"]
    if (spec.get("bits"), spec.get("group_size"), spec.get("in_features"), spec.get("out_features")) != \
            (bt.bits, bt.group_size, cols, rows):
        raise _err(f"checkpoint layer {module!r} is no longer {rec['type']} [{rows}, {cols}]; "
                   f"export_like writes layers back in their imported type only")
    codes = unpack(state[f"{module}.qweight"], cols, bt.bits).numpy()
    scale, offset = (state[f"{module}.{k}"].float().numpy() for k in ("scale", "offset"))
    source = {k[len(module) + 1:]: v for k, v in storage.items() if k.rsplit(".", 1)[0] == module}
    order = _row_order(rec["row_order"], rows)
    back = None if order is None else np.argsort(order)  # gguf_rows = hf_rows[back]
    if back is not None:
        codes, scale, offset = codes[back], scale[back], offset[back]
        source = {k: v[back] for k, v in source.items()}
    raw = gguf_types.encode(rec["type"], np.ascontiguousarray(codes), source)
    derived = gguf_types.decode(rec["type"], raw, cols)
    if not (_same_bits(derived.scale, np.ascontiguousarray(scale)) and _same_bits(derived.offset, np.ascontiguousarray(offset))):
        raise _err(f"checkpoint layer {module!r}: scale/offset are not what its {rec['type']} parameters give; "
                   f"only codes may change for export_like (new d/m is not supported yet)")
    return raw


def export_like(checkpoint_dir, source_gguf, out_path) -> dict:
    """Write ``out_path``: ``source_gguf`` with every imported projection re-encoded from the
    checkpoint's current codes; tensors whose bytes are unchanged are copied as they are.
    Returns ``{"rewritten": [gguf names], "kept": n, "size": bytes, "sha256": hex}``."""
    ckpt, source, out = Path(checkpoint_dir), Path(source_gguf), Path(out_path)
    meta = _gguf_meta(ckpt)
    _check_source(source, meta["gguf_source"])
    side = read_json(ckpt / SOURCE_FILE, "GGUF import record")
    storage = load_numpy(str(ckpt / STORAGE_FILE))
    state = read_tensors(ckpt, meta)
    g = read_gguf(source)
    replaced = {}
    for module, rec in side["layers"].items():
        if module not in meta["layers"]:
            raise _err(f"checkpoint layer {module!r} (GGUF {rec['tensor']}) is not a quantized layer any more")
        raw = _encode_layer(module, rec, meta["layers"][module], state, storage)
        if not np.array_equal(raw.reshape(-1), g.raw(rec["tensor"])):
            replaced[rec["tensor"]] = raw
    try:
        write_like(g, out, replaced)
    except ValueError as e:
        raise _err(str(e)) from None
    return {"rewritten": sorted(replaced), "kept": len(g.tensors) - len(replaced),
            "size": out.stat().st_size, "sha256": sha256_file(out)}


__all__ = ["import_gguf", "export_like", "save_imported", "METHOD", "STORAGE_FILE", "SOURCE_FILE"]
