"""The plain-read safetensors reader returns what safetensors itself loads, dtype and shape included."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from qalora.errors import QaloraError
from qalora.safetensors_file import SafetensorsFile, load_tensors


def test_reader_equals_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 6), "a.qweight": torch.randint(0, 255, (4, 3), dtype=torch.uint8),
               "b": torch.randn(5).bfloat16(), "scalar": torch.tensor(2.5)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    got = load_tensors(path)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.get_slice("b").get_dtype() == "BF16" and f.get_slice("a.qweight").get_shape() == [4, 3]
        with pytest.raises(QaloraError, match="has no tensor 'c'"):
            f.get_tensor("c")


def test_written_header_reads_back_in_safetensors(tmp_path):
    from qalora.safetensors_file import header_bytes

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half()}
    path = tmp_path / "w.safetensors"
    with open(path, "wb") as f:
        f.write(header_bytes([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]))
        for t in tensors.values():
            f.write(t.numpy().tobytes())
    got = load_file(str(path))
    assert all(torch.equal(got[k], t) for k, t in tensors.items())
    with pytest.raises(QaloraError, match="which the dense base writer does not store"):
        header_bytes([("x", torch.complex64, (2,))], "the dense base writer")
