"""qalora.io.FileCache: one hash per file identity, one tokenizer per content, fresh tensor objects."""

import os

import torch
from safetensors.torch import load_file, save_file

import qalora.io as qio
from conftest import tiny_tokenizer
from qalora.io import FileCache, file_key, sha256_file


def test_hash_once_per_identity_and_again_after_a_rewrite(tmp_path, monkeypatch):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    calls = []
    real = qio.sha256_file
    monkeypatch.setattr(qio, "sha256_file", lambda p, *a: calls.append(str(p)) or real(p, *a))
    files = FileCache()
    assert files.sha256(f) == files.sha256(f) == sha256_file(f)
    assert len(calls) == 1
    os.replace(f, tmp_path / "b.bin")                          # a rename keeps the identity
    assert files.sha256(tmp_path / "b.bin") == sha256_file(tmp_path / "b.bin") and len(calls) == 1
    (tmp_path / "b.bin").write_bytes(b"y" * 1001)              # a rewrite gets a new entry
    assert files.sha256(tmp_path / "b.bin") == sha256_file(tmp_path / "b.bin") and len(calls) == 2


def test_remembered_digest_is_served_without_hashing(tmp_path, monkeypatch):
    f = tmp_path / "w"
    f.write_bytes(b"abc")
    files = FileCache()
    files.remember(f, "0" * 64)
    monkeypatch.setattr(qio, "sha256_file", lambda *a: (_ for _ in ()).throw(AssertionError("hashed")))
    assert files.sha256(f) == "0" * 64
    assert file_key(f) == file_key(str(f))


def test_one_tokenizer_per_content(tmp_path):
    tok = tiny_tokenizer()
    for d in ("a", "b"):
        tok.save_pretrained(tmp_path / d)
    loads = []
    files = FileCache()

    def load(folder):
        loads.append(folder)
        return object()

    assert files.tokenizer(tmp_path / "a", load) is files.tokenizer(tmp_path / "b", load)
    assert len(loads) == 1
    cfg = tmp_path / "b" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "x": 1}', 1))  # other content: its own load
    assert files.tokenizer(tmp_path / "b", load) is not files.tokenizer(tmp_path / "a", load)
    assert len(loads) == 2


def test_tensors_read_once_with_fresh_tensor_objects(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path))
    reads = []
    files = FileCache()

    def read(p):
        reads.append(p)
        return load_file(str(p))

    a, b = files.tensors(path, read), files.tensors(path, read)
    assert len(reads) == 1 and a["w"] is not b["w"]
    assert a["w"].untyped_storage().data_ptr() == b["w"].untyped_storage().data_ptr()
    a["w"].data = a["w"].data.double()                          # rebinding one leaves the other as it was
    assert b["w"].dtype == torch.float32 and torch.equal(b["w"], torch.arange(6.0).reshape(2, 3))
    assert files.counts() == {"hashed": 0, "tokenizers": 0, "tensor_files": 1}


_TRY_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("held")
    else:
        print("free")
"""


def test_locked_excludes_another_process_until_the_block_ends(tmp_path):
    """While one process is inside ``locked(report)`` another cannot take the same lock (the
    calls that merge rows into one report run one at a time); after the block it can."""
    import subprocess
    import sys

    from qalora.io import locked

    report = tmp_path / "tasks.json"
    lock = tmp_path / ".tasks.json.lock"

    def other() -> str:
        return subprocess.run([sys.executable, "-c", _TRY_LOCK, str(lock)], capture_output=True, text=True,
                              check=True).stdout.strip()

    with locked(report):
        assert lock.exists() and other() == "held"
    assert other() == "free"
