"""Training checkpoints: written atomically, the last two kept, read back for an exact resume.

``ADIR/run.json``                 the run's identity (method, base fingerprint, data, configs)
``ADIR/checkpoints/step-NNNNNN/`` ``adapter.safetensors`` + ``state.pt`` (optimizers, scheduler,
                                  RNG, step) — a folder appears only complete (temp + rename)
``ADIR/checkpoints/latest``       name of the newest complete checkpoint (replaced atomically)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qalora.errors import QaloraError

KEEP = 2


def checkpoint_dir(adir: Path) -> Path:
    return Path(adir) / "checkpoints"


def save_train_state(adir: Path, step: int, adapter: dict, optim_state: dict) -> Path:
    root = checkpoint_dir(adir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        save_file(adapter, str(tmp / "adapter.safetensors"))
        torch.save({"step": step, "optim": optim_state,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "state.pt")
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(adir: Path) -> Path | None:
    root = checkpoint_dir(adir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "adapter.safetensors").is_file() or not (path / "state.pt").is_file():
        raise QaloraError(f"the latest checkpoint {str(path)!r} is incomplete; remove its 'latest' pointer to "
                          "fall back to an older one")
    return path


def load_train_state(path: Path) -> tuple[dict, dict]:
    """``(adapter tensors, state dict)`` of one checkpoint folder."""
    try:
        adapter = load_file(str(path / "adapter.safetensors"))
        state = torch.load(path / "state.pt", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing to the user
        raise QaloraError(f"checkpoint {str(path)!r} is corrupt ({e.__class__.__name__}: {e})") from None
    return adapter, state
