"""Export an adapter on its own as a llama.cpp LoRA adapter GGUF: what ``llama-cli --lora``,
``llama_cpp.Llama(lora_path=...)`` and Ollama's ``ADAPTER`` line load over a base GGUF.

    export_gguf_lora("adapter", "adapter.gguf")          # -> report dict
    # base: qalora export --format gguf --model QDIR --out base.gguf (the checkpoint it was trained on)

The adapter as a plain LoRA (``A' [r, in]``, ``B' [out, r]``, scaling ``alpha / r``; QA-LoRA's
``A' = repeat_interleave(A, L, dim=1) / L``, see :mod:`qalora.export.peft`, whose kind rules
apply: kinds that change codes or scales are refused). llama.cpp's conventions (its
``convert_lora_to_gguf.py`` and ``src/llama-adapter.cpp``):

- metadata: ``general.architecture`` = the base GGUF's (``llama`` for Llama and Mistral,
  ``qwen2``, ``qwen3``: :mod:`qalora.export.gguf_arch`; llama.cpp refuses a mismatch),
  ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (f32); the
  runtime scales by ``alpha / rank`` with ``rank = ne[0]`` of ``lora_b``;
- tensors ``<base tensor>.lora_a`` / ``.lora_b`` (e.g. ``blk.0.attn_q.weight.lora_a``), F32;
  numpy ``[r, in]`` for ``lora_a`` and ``[out, r]`` for ``lora_b`` (ggml ``ne = [in, r]`` and
  ``[r, out]``: llama.cpp checks ``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]``, ``a.ne[1] == b.ne[0]``);
- Q and K rows in llama.cpp's rotary order (Llama/Mistral only; Qwen keeps HF's order): the base GGUF's ``attn_q`` / ``attn_k`` rows are
  ``W[order]`` (``gguf_blocks.rotary_row_order``), and ``(B' A')[order] = B'[order] A'``, so the
  rows of ``lora_b`` are permuted the same way, ``lora_a`` not.

Also written: ``general.name`` and ``qalora.base_sha256`` / ``qalora.adapter_sha256`` (the base
checkpoint and adapter this file came from; llama.cpp ignores keys it does not read). The file is
written to a temporary name in the output folder and renamed when complete.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from qalora.adapters.format import adapter_sha256
from qalora.errors import QaloraError
from qalora.export.gguf_arch import arch_for
from qalora.export.gguf_blocks import rotary_row_order
from qalora.export.peft import read_lora_adapter, trained_base
from qalora.io import atomic_file, check_new_output

def lora_tensor_names(modules, config) -> dict[str, tuple[str, int | None]]:
    """``{module: (llama.cpp base tensor name, heads for the rotary row order or None)}``, e.g.
    ``model.layers.0.self_attn.q_proj -> ("blk.0.attn_q.weight", n_head)`` for Llama/Mistral
    (Qwen2/Qwen3 keep HF's row order: ``None``), as the base GGUF writes them
    (:mod:`qalora.export.gguf_arch`). Refuses modules without a llama.cpp tensor, and an
    ``lm_head`` whose base GGUF has none (tied embeddings)."""
    spec = arch_for(config)
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    out = {}
    for m in modules:
        name = names.get_name(m + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise QaloraError(f"adapter module {m!r} has no llama.cpp tensor; the GGUF LoRA export writes Llama "
                              "attention and MLP projections")
        if name == "output.weight" and getattr(config, "tie_word_embeddings", False):
            raise QaloraError(f"adapter module {m!r} adapts a tied lm_head, which a llama.cpp base has no tensor for")
        out[m] = (name, spec.rotary_heads(name, config))
    return out


def gguf_lora_tensors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config) -> list[tuple[str, np.ndarray]]:
    """``[(name, fp32 array)]`` in block order: ``<tensor>.lora_a`` = ``A' [r, in]`` and
    ``<tensor>.lora_b`` = ``B' [out, r]``, its rows in rotary order for ``attn_q`` / ``attn_k``."""
    names = lora_tensor_names(pairs, config)
    tensors = []
    for module in sorted(pairs, key=lambda m: _block_order(names[m][0])):
        a, b = pairs[module]
        name, heads = names[module]
        if heads:
            b = b[torch.from_numpy(rotary_row_order(b.shape[0], heads))]
        tensors.append((name + ".lora_a", a.float().contiguous().numpy()))
        tensors.append((name + ".lora_b", b.float().contiguous().numpy()))
    return tensors


def _block_order(name: str) -> tuple[int, str]:
    part = name.split(".")
    return (int(part[1]) if part[0] == "blk" else 10**9, name)


def export_gguf_lora(adapter_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                     model: str | os.PathLike | None = None, name: str | None = None, progress: bool = True) -> dict:
    """Write the adapter ``adapter_dir`` as a llama.cpp LoRA GGUF ``out_path`` (new file).

    Args:
        model: the base it was trained on (qalora checkpoint, or a lora/qlora adapter's HF
            folder), read for its config (layers, heads); default the adapter's recorded
            ``base_path``. Checked by fingerprint.
        name: ``general.name`` (default: the adapter folder's name).
    Returns:
        the report: path, bytes, tensor count, rank, alpha, modules, base and adapter SHA-256.
    """
    from transformers import AutoConfig

    start = time.perf_counter()
    out = check_new_output(out_path)
    adir = Path(adapter_dir).expanduser()
    cfg, pairs = read_lora_adapter(adir)
    base = trained_base(cfg, model, adir)
    config = AutoConfig.from_pretrained(base)
    spec = arch_for(config)  # refuses model types the GGUF exporter does not write, in one line
    tensors = gguf_lora_tensors(pairs, config)

    writer = gguf.GGUFWriter(path=None, arch=spec.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["alpha"]))
    writer.add_name(name or adir.resolve().name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_string("qalora.base_sha256", cfg["base_sha256"])
    writer.add_string("qalora.adapter_sha256", adapter_sha256(cfg))
    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array)
    with atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    report = {"path": str(out), "file_bytes": out.stat().st_size, "tensors": len(tensors), "modules": len(pairs),
              "method": cfg["method"], "kinds": list(cfg["kinds"]), "rank": cfg["rank"], "alpha": cfg["alpha"],
              "base": str(base), "base_sha256": cfg["base_sha256"], "adapter_sha256": adapter_sha256(cfg),
              "seconds": round(time.perf_counter() - start, 2)}
    if progress:
        print(f"wrote {out} ({report['file_bytes'] / 2**20:.2f} MiB): llama.cpp LoRA adapter, {len(pairs)} modules, "
              f"r {cfg['rank']}, alpha {cfg['alpha']:g} ({cfg['method']}); load it over the GGUF of {str(base)!r}",
              flush=True)
    return report
