"""torchao layouts: the CPU int4 byte layout (``pack_int4_cpu``) equals torch's own packer under this
machine's ATen CPU capability and every lower one (bit for bit), round-trips under all three, and
differs between them (a packed folder is tied to one capability); ``Int4OpaqueTensor`` weights built
from our codes hold them exactly, and the kernel computes our weights within fp32 rounding."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("torchao")

from qalora.errors import QaloraError
from qalora.export.torchao_layouts import (
    INT4_CPU_BLOCK_N,
    LAYOUTS,
    cpu_capability,
    pack_int4_cpu,
    packed_refusal,
    packed_weight,
    tinygemm_scale_and_zero,
    unpack_int4_cpu,
)
from qalora.quant.weight import QuantizedWeight

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [16, 32, 48, 64, 80, 96, 112, 128, 192, 208]  # full blocks of 32 / 64 rows and every tail size
COLS = [32, 64, 96, 576]
CAPABILITY_ORDER = ["DEFAULT", "AVX2", "AVX512"]  # ATEN_CPU_CAPABILITY can lower a machine's, never raise it


def random_codes(n, k, bits=4, seed=0):
    return torch.randint(0, 2**bits, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def packed_bound(scale, offset, group_size):
    """Per-weight bound on |w_kernel - w_qalora| ``[out, in]``. The kernel computes
    ``fl(fl((q - 8)·scale) + zero)`` with ``zero = fl(offset + 8·scale)``, qalora ``fl(fl(q·scale) + offset)``;
    the five roundings add up to ``2^-24 · (3|offset| + 62·scale) < 2^-22 · (|offset| + 16·scale)``
    (``|q - 8| <= 8``, ``q <= 15``); 2^-21 leaves a factor 2 (an FMA only removes roundings)."""
    return (2.0**-21 * (offset.abs() + 16 * scale.abs())).repeat_interleave(group_size, dim=1)


def kernel_weights(t):
    """The dense ``[out, in]`` weight torch's int4 CPU kernel computes from ``t``: ``x = I`` makes each
    output a single product ``1 · w`` plus exact zeros, so this is the kernel's own dequantization."""
    return torch.nn.functional.linear(torch.eye(t.shape[1]), t).T


@pytest.mark.parametrize("n, k", list(itertools.product(ROWS, COLS)))
def test_pack_equals_torch_on_this_machine(n, k):
    codes = random_codes(n, k, seed=n * 1000 + k)
    assert torch.equal(pack_int4_cpu(codes, cpu_capability()),
                       torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))


CHILD = textwrap.dedent("""
    import itertools, json, sys, torch
    from qalora.export.torchao_layouts import pack_int4_cpu
    want, rows, cols = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    assert torch.backends.cpu.get_cpu_capability() == want, torch.backends.cpu.get_cpu_capability()
    g = torch.Generator().manual_seed(0)
    for n, k in itertools.product(rows, cols):
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        assert torch.equal(pack_int4_cpu(codes, want), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)), (n, k)
    print("ok", want)
""")


def test_pack_equals_torch_under_every_lower_capability():
    """``ATEN_CPU_CAPABILITY`` makes a fresh process dispatch as a lesser CPU: DEFAULT (and AVX2 on an
    AVX512 machine) checked against torch's packer there. AVX512 is checked only on AVX512 machines."""
    here = CAPABILITY_ORDER.index(cpu_capability()) if cpu_capability() in CAPABILITY_ORDER else 0
    for cap in CAPABILITY_ORDER[:here]:
        r = subprocess.run([sys.executable, "-c", CHILD, cap, json.dumps(ROWS), json.dumps(COLS)], check=False,
                           capture_output=True, text=True,
                           env={**os.environ, "ATEN_CPU_CAPABILITY": cap.lower(), "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0 and r.stdout.split() == ["ok", cap], r.stderr[-2000:]


@pytest.mark.parametrize("capability", list(INT4_CPU_BLOCK_N))
def test_round_trip_every_capability(capability):
    for n, k in itertools.product(ROWS, COLS):
        codes = random_codes(n, k, seed=n + k)
        packed = pack_int4_cpu(codes, capability)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (n, k // 2)
        assert torch.equal(unpack_int4_cpu(packed, capability), codes.to(torch.uint8))


def test_layouts_differ_between_capabilities():
    """A 64-row weight packs three different ways: bytes packed for one capability are misread by another."""
    codes = random_codes(64, 32)
    packs = {cap: pack_int4_cpu(codes, cap) for cap in INT4_CPU_BLOCK_N}
    for a, b in itertools.combinations(packs, 2):
        assert not torch.equal(packs[a], packs[b]), (a, b)
    # a 16-row weight is one partial block everywhere: the same bytes under every capability
    small = random_codes(16, 32)
    assert len({tuple(pack_int4_cpu(small, cap).flatten().tolist()) for cap in INT4_CPU_BLOCK_N}) == 1


def random_weight(bits, group_size, out_f=80, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = torch.rand(out_f, in_f // group_size, generator=g) * 0.02 + 1e-4
    offset = torch.randn(out_f, in_f // group_size, generator=g) * 0.5  # |offset| >> scale: merged offsets
    return QuantizedWeight.from_codes(codes, scale, offset, bits, group_size)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_packed_weight_holds_codes_and_kernel_computes_our_weights(bits, group_size):
    qw = random_weight(bits, group_size, seed=bits * 100 + group_size)
    t = packed_weight(qw, cpu_capability())
    assert type(t).__name__ == "Int4OpaqueTensor" and t.dtype == torch.float32 and list(t.block_size) == [1, group_size]
    assert t.qdata.dtype == torch.uint8 and tuple(t.qdata.shape) == (80, 128)
    assert torch.equal(unpack_int4_cpu(t.qdata, cpu_capability()), qw.codes())
    assert tuple(t.scale_and_zero.shape) == (256 // group_size, 80, 2) and t.scale_and_zero.dtype == torch.float32
    assert torch.equal(t.scale_and_zero[..., 0], qw.scale.T)
    ours, bound = qw.dequantize(), packed_bound(qw.scale, qw.offset, group_size)
    theirs = kernel_weights(t)
    assert bool(((theirs - ours).abs() <= bound).all())
    # the exporter's model of the kernel (fp64, rounded once): bit-identical here (the kernel uses an FMA);
    # one fp32 ulp allowed for a build whose kernel rounds the product separately
    model = LAYOUTS["packed"].reader(t, qw, cpu_capability())(0, 80)
    torch.testing.assert_close(model, theirs, rtol=2.0**-23, atol=0)

    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    y = torch.nn.functional.linear(x, t)
    want = x.double() @ ours.double().T
    # per output: the weights' rounding (|x| @ bound) plus fp32 summation of 256 products, <= K·2^-24·Σ|x·w|
    tol = x.abs().double() @ bound.double().T + 256 * 2.0**-24 * (x.abs().double() @ ours.abs().double().T)
    assert bool(((y.double() - want).abs() <= tol).all())


def test_zero_scale_group_keeps_its_offset():
    """``scale == 0``: the kernel's ``(q - 8)·0 + (offset + 0)`` is exactly ``offset``, as qalora's."""
    codes = random_codes(16, 64, seed=3).to(torch.uint8)
    scale = torch.full((16, 2), 0.01)
    scale[3, 1] = 0.0
    offset = torch.randn(16, 2)
    qw = QuantizedWeight.from_codes(codes, scale, offset, 4, 32)
    w = kernel_weights(packed_weight(qw, cpu_capability()))
    assert torch.equal(w[3, 32:], offset[3, 1].expand(32))


def test_refusals():
    assert "up to 4 bits, not 8" in packed_refusal(8, 32)
    assert "group_size 32, 64, 128, 256" in packed_refusal(4, 16)
    assert "out_features % 16 == 0, not 300" in packed_refusal(4, 32, 300)
    assert packed_refusal(3, 64, 192) is None and packed_refusal(2, 256) is None
    with pytest.raises(QaloraError, match="rows % 16 == 0"):
        pack_int4_cpu(random_codes(8, 32), "AVX2")
    with pytest.raises(QaloraError, match="no packed int4 layout is known for CPU capability 'SVE256'"):
        unpack_int4_cpu(torch.zeros(16, 16, dtype=torch.uint8), "SVE256")
    with pytest.raises(QaloraError, match="overflows fp32"):
        tinygemm_scale_and_zero(torch.full((16, 1), 1e38), torch.full((16, 1), 3e38))
    with pytest.raises(QaloraError, match="out_features % 16"):
        packed_weight(random_weight(4, 32, out_f=24, in_f=64), "AVX2")
