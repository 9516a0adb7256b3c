"""What ``speed.py``'s parent and its children share: paths, the settings every row runs with,
and how a row reports a missing library."""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "speed.json"
RESULT_TAG = "SPEED_RESULT "
THREADS = 2
INSTALL = {"bitsandbytes": "pip install --no-deps bitsandbytes==0.50.0", "peft": "pip install peft==0.21.0",
           "llama_cpp": "pip install llama-cpp-python==0.3.36 (builds llama.cpp, ~12 min on 2 cores)"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row runs with (the batch, rank, alpha and optimizer come from qalora's config
    defaults, read in the child: ``LoraConfig()`` and ``TrainConfig()``)."""

    threads: int = THREADS
    warmup: int = 1            # untimed training steps
    steps: int = 5             # timed training steps (median)
    new_tokens: int = 128      # greedy tokens per sequence
    decode_batches: tuple[int, ...] = (1, 8)
    prefill_tokens: int = 512
    reps: int = 3              # timed repetitions of each prefill / generation (median)
    gptq_layers: int = 3
    gptq_samples: int | None = None  # None: QuantConfig.calib_samples

    @classmethod
    def quick(cls) -> Settings:
        return cls(steps=2, new_tokens=32, decode_batches=(1,), reps=1, gptq_layers=1, gptq_samples=16)


class Skip(Exception):
    """The row's library cannot be imported: reported as skipped."""


def require(module: str, what: str, install: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{what} not installed ({str(e).splitlines()[0]}; {install})") from None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rtn_checkpoint_path(work: Path, bits: int) -> Path:
    """Where ``speed.py`` keeps (and the profiles look for) the embedded model's ``bits``-bit g32
    RTN checkpoint inside ``--work``."""
    return Path(work) / f"int{bits}-g32-rtn"


def rtn_checkpoint(work: Path, bits: int = 4) -> Path:
    """That checkpoint, quantized now if it is not there yet (the profiles' input)."""
    path = rtn_checkpoint_path(work, bits)
    if not (path / "qalora.json").is_file():
        import qalora
        from qalora.config import QuantConfig

        qalora.quantize("default", path, QuantConfig(bits=bits, method="rtn"), progress=False)
    return path
