"""The adapter folder ``qalora train`` writes, read back: config, tensors, and a model with the
adapter attached (unmerged) on the base it was trained on.

    ADIR/adapter.safetensors   <module>.lora_A.weight, <module>.lora_B.weight (fp32)
    ADIR/adapter_config.json   format "qalora-adapter", method, rank, alpha, dropout, targets,
                               group_size, base_sha256, trainable parameters, losses, …
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qalora.errors import QaloraError
from qalora.io import read_json

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "qalora-adapter"
REQUIRED = ("method", "rank", "alpha", "targets", "group_size", "base_sha256")


def read_adapter_config(adir: str | os.PathLike) -> dict:
    adir = Path(adir).expanduser()
    if not adir.is_dir():
        raise QaloraError(f"adapter {str(adir)!r} is not a folder (expected the --out folder of 'qalora train')")
    cfg = read_json(adir / ADAPTER_CONFIG, "adapter config")
    if cfg.get("format") != ADAPTER_FORMAT:
        raise QaloraError(f"{str(adir / ADAPTER_CONFIG)!r} has format {cfg.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise QaloraError(f"{str(adir / ADAPTER_CONFIG)!r} is corrupt (lacks {', '.join(missing)})")
    return cfg


def read_adapter_tensors(adir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(adir).expanduser() / ADAPTER_FILE
    if not path.is_file():
        raise QaloraError(f"adapter weights {str(path)!r} are missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise QaloraError(f"adapter weights {str(path)!r} are corrupt ({e})") from None


def load_adapted(model: str | os.PathLike | None, adapter_dir: str | os.PathLike):
    """``(model, tokenizer, adapter config)``: the base ``model`` loaded as the adapter's method
    needs it (qalora checkpoint, NF4-quantized or fp model), with the adapter attached unmerged.
    Refuses an adapter trained on another base (its recorded SHA-256 differs)."""
    from qalora.adapters import add_adapters, load_adapter_state
    from qalora.config import LoraConfig
    from qalora.training.base import load_base

    cfg = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    base = load_base(cfg["method"], model)
    if base.sha256 != cfg["base_sha256"]:
        raise QaloraError(f"adapter {str(adapter_dir)!r} was trained on another base (base_sha256 "
                          f"{str(cfg['base_sha256'])[:12]}… vs {base.sha256[:12]}… of {str(model)!r})")
    add_adapters(base.model, cfg["method"], LoraConfig(rank=cfg["rank"], alpha=cfg["alpha"],
                                                       dropout=cfg.get("dropout", 0.0), targets=cfg["targets"]))
    load_adapter_state(base.model, tensors)
    return base.model.eval(), base.tokenizer, cfg
