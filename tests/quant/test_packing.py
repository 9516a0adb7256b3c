import pytest
import torch

from qalora.errors import QaloraError
from qalora.quant.packing import pack, packed_len, unpack

SHAPES = [(1, 1), (3, 5), (7, 33), (4, 64), (2, 3, 17), (16, 576), (5, 1536), (1, 7), (9, 8), (2, 0)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_exact(bits, shape):
    g = torch.Generator().manual_seed(hash((bits, shape)) % 2**31)
    q = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (*shape[:-1], packed_len(shape[-1], bits))
    assert torch.equal(unpack(p, shape[-1], bits), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_extreme_codes(bits):
    for value in (0, 2**bits - 1):
        q = torch.full((3, 40), value, dtype=torch.uint8)
        assert torch.equal(unpack(pack(q, bits), 40, bits), q)


def test_packed_sizes_are_bits_over_8():
    assert packed_len(4096, 2) == 1024
    assert packed_len(4096, 3) == 1536
    assert packed_len(4096, 4) == 2048
    assert packed_len(4096, 5) == 2560
    assert packed_len(4096, 6) == 3072
    assert packed_len(4096, 8) == 4096
    assert packed_len(5, 3) == 3  # padded to one unit of 8 codes


def test_known_layouts():
    # 4-bit: low nibble first
    assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    # 2-bit: q0 | q1<<2 | q2<<4 | q3<<6
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    # 3-bit: 24-bit little-endian word of 8 codes
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(v) << (3 * k) for k, v in enumerate(q[0]))
    assert pack(q, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]
    # 5-bit: 40-bit little-endian word of 8 codes; 6-bit: 24-bit word of 4 codes
    for bits, codes in ((5, [31, 1, 17, 0, 30, 5, 9, 22]), (6, [63, 1, 40, 7])):
        word = sum(v << (bits * k) for k, v in enumerate(codes))
        nbytes = len(codes) * bits // 8
        assert pack(torch.tensor([codes], dtype=torch.uint8), bits).tolist() == \
            [[(word >> (8 * k)) & 0xFF for k in range(nbytes)]]


def test_rows_are_independent():
    q = torch.randint(0, 8, (6, 21), dtype=torch.uint8)
    p = pack(q, 3)
    assert torch.equal(pack(q[2:4], 3), p[2:4])
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    assert torch.equal(unpack(p[perm], 21, 3), q[perm])


def test_bad_input():
    with pytest.raises(QaloraError, match="bits 7 cannot be packed; use one of 2, 3, 4, 5, 6, 8"):
        pack(torch.zeros(2, 2, dtype=torch.uint8), 7)
    with pytest.raises(TypeError):
        pack(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 8, 4)
