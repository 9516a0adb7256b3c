"""The adapter folder: written by ``qalora train``, read by ``merge``, ``generate``, ``eval``.

    ADIR/adapter.safetensors   "<module>.<key>" fp32 tensors of every kind (lora_A.weight,
                               lora_B.weight, log_scale, lota_A, lota_B)
    ADIR/adapter_config.json   format "qalora-adapter", format_version, method, kinds, rank,
                               alpha, dropout, lota_omega, targets, group_size, base_bits,
                               base_sha256, sha256 of adapter.safetensors, trainable parameters,
                               bits of adapter state, losses …

Both directions live here, with one check (:func:`check_adapter`) that every reader applies:
the config is complete (an adapter without its recorded hashes is refused, never read
unverified), the weights file's SHA-256 is the recorded one, the kinds are the method's, the tensors are exactly those the kinds
define (shapes checked when they are loaded into a model), finite, and ternary tensors hold
only -1, 0, 1. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qalora.adapters.kinds.registry import get_kind, ordered
from qalora.adapters.methods import get_method, method_kinds
from qalora.errors import QaloraError
from qalora.io import is_sha256, read_json, sha256_file, write_json

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "qalora-adapter"
FORMAT_VERSION = 2
REQUIRED = ("method", "kinds", "rank", "alpha", "targets", "modules", "group_size", "base_sha256")


def lora_config_of(cfg: dict):
    """The :class:`~qalora.config.LoraConfig` an adapter was trained with."""
    from qalora.config import LoraConfig

    kinds = set(cfg["kinds"])
    return LoraConfig(rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg.get("dropout", 0.0), targets=cfg["targets"],
                      train_scales="scales" in kinds and cfg["method"] != "peqa",
                      with_qalora="qalora" in kinds and cfg["method"] == "lota", lota_omega=cfg.get("lota_omega"),
                      lota_codes_only=bool(cfg.get("lota_codes_only", False)))


def state_counts(state: dict[str, torch.Tensor], ternary: set[str]) -> dict:
    """Trainable parameters and bits of adapter state: float parameters at 32 bits, ternary ones
    at 2 bits (their packed size; log2(3) = 1.58 bits of information)."""
    n_tern = sum(t.numel() for k, t in state.items() if k in ternary)
    n_float = sum(t.numel() for k, t in state.items() if k not in ternary)
    return {"trainable_parameters": n_float + n_tern, "float_parameters": n_float, "ternary_parameters": n_tern,
            "adapter_state_bits": 32 * n_float + 2 * n_tern}


def write_adapter(adir: str | os.PathLike, state: dict[str, torch.Tensor], config: dict, files=None) -> dict:
    """Write ``state`` and ``config`` (completed with the format fields) into ``adir``; each file
    appears whole (temporary name + rename). Returns the config written. ``files``: the command's
    :class:`~qalora.io.FileCache`, told the weights' SHA-256 computed here."""
    adir = Path(adir)
    config = {"format": ADAPTER_FORMAT, "format_version": FORMAT_VERSION,
              **{k: v for k, v in config.items() if k != "sha256"}}
    tmp = adir / f".{ADAPTER_FILE}.tmp"
    config["sha256"] = {ADAPTER_FILE: "0" * 64}
    check_adapter(config, state, adir)
    save_file(state, str(tmp), metadata={"format": ADAPTER_FORMAT})
    config["sha256"] = {ADAPTER_FILE: sha256_file(tmp)}
    if files is not None:
        files.remember(tmp, config["sha256"][ADAPTER_FILE])
    os.replace(tmp, adir / ADAPTER_FILE)
    write_json(adir / ADAPTER_CONFIG, config)
    return config


def check_adapter(cfg: dict, state: dict[str, torch.Tensor] | None, adir: Path) -> None:
    """Refuse a config or tensors that no kind could have written (one line naming what is wrong)."""
    where = str(adir / ADAPTER_CONFIG)
    if cfg.get("format") != ADAPTER_FORMAT:
        raise QaloraError(f"{where!r} has format {cfg.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise QaloraError(f"{where!r} has format_version {cfg.get('format_version')!r}; this qalora reads "
                          f"version {FORMAT_VERSION} (retrain the adapter with this version)")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise QaloraError(f"{where!r} is corrupt (lacks {', '.join(missing)})")
    recorded = cfg.get("sha256")
    if not is_sha256(recorded.get(ADAPTER_FILE) if isinstance(recorded, dict) else None):
        raise QaloraError(f"{where!r} has no sha256 of {ADAPTER_FILE}; it was not written by qalora or was edited")
    if not is_sha256(cfg["base_sha256"]):
        raise QaloraError(f"{where!r} has no valid base_sha256; it was not written by qalora or was edited")
    get_method(cfg["method"])
    try:
        kinds = ordered(cfg["kinds"])
        expected = method_kinds(cfg["method"], lora_config_of(cfg))
    except (QaloraError, TypeError, ValueError) as e:
        raise QaloraError(f"{where!r} is corrupt ({e})") from None
    if set(kinds) != set(expected):
        raise QaloraError(f"{where!r} is corrupt: kinds {list(kinds)} are not those of method {cfg['method']!r}")
    if state is not None:
        check_tensors(cfg, state, adir)


def check_tensors(cfg: dict, state: dict[str, torch.Tensor], adir: Path) -> None:
    """Refuse tensors that are not exactly those of the (already checked) config's kinds, a
    non-finite value, or a ternary tensor holding anything but -1, 0, 1."""
    kinds = ordered(cfg["kinds"])
    keys = {f"{m}.{k}": kind for m in cfg["modules"] for kind in map(get_kind, kinds) for k in kind.state_keys}
    if set(state) != set(keys):
        extra, lack = sorted(set(state) - set(keys)), sorted(set(keys) - set(state))
        raise QaloraError(f"adapter weights in {str(adir)!r} do not match its config: missing {lack[:2]}, "
                          f"unexpected {extra[:2]}")
    for key, t in state.items():
        if not torch.isfinite(t).all():
            raise QaloraError(f"adapter tensor {key} in {str(adir)!r} holds non-finite values")
        if key.rsplit(".", 1)[-1] in keys[key].ternary and not ((t == -1) | (t == 0) | (t == 1)).all():
            raise QaloraError(f"adapter tensor {key} in {str(adir)!r} is ternary but holds values other than -1, 0, 1")


def adapter_sha256(cfg: dict) -> str:
    """The recorded SHA-256 of an adapter's weights file (``cfg`` checked by :func:`check_adapter`)."""
    return cfg["sha256"][ADAPTER_FILE]


def read_adapter_config(adir: str | os.PathLike) -> dict:
    adir = Path(adir).expanduser()
    if not adir.is_dir():
        raise QaloraError(f"adapter {str(adir)!r} is not a folder (expected the --out folder of 'qalora train')")
    cfg = read_json(adir / ADAPTER_CONFIG, "adapter config")
    check_adapter(cfg, None, adir)
    return cfg


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise QaloraError(f"adapter weights {str(path)!r} are corrupt ({e})") from None


def read_adapter(adir: str | os.PathLike, files=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of an adapter folder, both checked (``files``: a
    :class:`~qalora.io.FileCache`; a file this command already hashed is not hashed again)."""
    adir = Path(adir).expanduser()
    cfg = read_adapter_config(adir)
    path = adir / ADAPTER_FILE
    if not path.is_file():
        raise QaloraError(f"adapter weights {str(path)!r} are missing")
    if (files.sha256(path) if files is not None else sha256_file(path)) != adapter_sha256(cfg):
        raise QaloraError(f"adapter weights {str(path)!r} are corrupt (sha256 differs from {ADAPTER_CONFIG})")
    state = files.tensors(path, _adapter_tensors) if files is not None else _adapter_tensors(path)
    check_tensors(cfg, state, adir)  # the config itself was checked by read_adapter_config
    return cfg, state


def check_base(cfg: dict, base_sha256: str | None, adir, model) -> None:
    """Refuse a base other than the one the adapter was trained on (or one without a fingerprint)."""
    if not base_sha256 or cfg["base_sha256"] != base_sha256:
        raise QaloraError(f"adapter {str(adir)!r} was trained on another base (base_sha256 "
                          f"{str(cfg['base_sha256'])[:12]}… vs {str(base_sha256)[:12]}… of {str(model)!r}); "
                          "use the base it was trained on")


def attach(model, cfg: dict, state: dict[str, torch.Tensor]) -> list[str]:
    """Attach the adapter ``(cfg, state)`` to ``model`` (its base, already loaded), unmerged."""
    from qalora.adapters.attach import add_adapters, load_adapter_state

    names = add_adapters(model, cfg["method"], lora_config_of(cfg))
    load_adapter_state(model, state)
    return names


def load_adapted(model, adapter_dir, compute_dtype: str = "fp32", files=None):
    """``(model, tokenizer, adapter config)``: the base ``model`` loaded as the adapter's method
    needs it (qalora checkpoint, NF4-quantized or fp model), with the adapter attached unmerged.
    Refuses an adapter trained on another base (its recorded SHA-256 differs). ``files``: the
    command's :class:`~qalora.io.FileCache`."""
    from qalora.adapters.base import load_base

    cfg, state = read_adapter(adapter_dir, files)
    base = load_base(cfg["method"], model, compute_dtype, files)
    check_base(cfg, base.sha256, adapter_dir, model)
    attach(base.model, cfg, state)
    return base.model.eval(), base.tokenizer, cfg
