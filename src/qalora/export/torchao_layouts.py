"""The two ways ``export_torchao`` stores a quantized linear: torchao tensors built from our
``(codes, scale, offset)``, never re-quantized (``W = scale * q + offset`` per row and group of L).

``unpacked`` (default, every width): ``IntxUnpackedToInt8Tensor``, one code per int8, safetensors::

    qdata = q - 2^(b-1)        zero_point = -2^(b-1) - offset / scale     (fp64, rounded once to fp32)
    torchao: w = (qdata - zero_point) * scale                             1 + 8 / L bytes per weight

``packed`` (b <= 4: 2- and 3-bit codes fit the 4-bit layout losslessly): torchao 0.18's prototype
``Int4OpaqueTensor``, run by torch's CPU tinygemm kernel ``_weight_int4pack_mm_for_cpu``::

    qdata          uint8 [out, in/2]: two codes per byte, in the CPU kernel's layout (below)
    scale_and_zero fp32 [in/L, out, 2] = (scale, zero),  zero = offset + 8 * scale   (fp64, rounded once)
    kernel: w = (q - 8) * scale + zero = scale * q + offset                   1/2 + 8 / L bytes per weight

Why only these (torchao 0.18 + torch 2.13 on an x86 CPU, checked 2026-12-01): ``Int4TilePackedTo4dTensor``
and ``Int4Tensor`` need CUDA / mslk kernels (``aten::_weight_int4pack_mm`` has no CPU kernel);
``IntxOpaqueTensor`` needs KleidiAI (Arm) or torchao's C++ kernels (not loadable here) and int8
dynamic activations; ``Int8Tensor`` has per-row integer zeros. ``Int4OpaqueTensor`` is not in torchao's
safetensors allow-list, so a packed folder is a torch pickle (``pytorch_model.bin``), and its class is
registered for ``weights_only`` loading only once ``torchao.prototype.quantization.int4`` is imported.

The kernel's byte layout depends on the ATen CPU capability it dispatches to (``BLOCK_N`` rows per
block, ``torch/aten/src/ATen/native/cpu/int4mm_kernel.cpp``): a folder packed for one capability
gives wrong logits, silently, on another. ``pack_int4_cpu`` writes any of the three x86 layouts
(AVX2 and DEFAULT checked bit for bit against torch's packer; AVX512 from that source, unchecked
here). In fp32 the kernel runs its scalar path on x86: ~3x faster than the unpacked tensor's
dequantize-then-matmul for one row (decode), ~4x slower for 16 rows (prefill), measured 2026-12-01.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qalora.errors import QaloraError
from qalora.quant.weight import QuantizedWeight
from qalora.quiet import quiet_imports

# rows per block, and for a full block the row offset of its high nibbles (None: rows 2j, 2j+1 share byte j)
INT4_CPU_BLOCK_N = {"DEFAULT": 32, "AVX2": 32, "AVX512": 64}
INT4_CPU_SPLIT = {"DEFAULT": None, "AVX2": 16, "AVX512": 32}
PACKED_GROUP_SIZES = (32, 64, 128, 256)  # the CPU kernel's BLOCK_K
PACKED_ROW_MULTIPLE = 16  # the kernel runs blocks of 16, 32, 48 or 64 rows


def _torchao_quantization():
    """``torchao.quantization``, imported quietly on first use (an optional dependency)."""
    try:
        with quiet_imports():
            import torchao.quantization as tq
    except ImportError:
        raise QaloraError("the torchao export needs torchao; install it with: pip install 'qalora[export]'") from None
    return tq


def cpu_capability() -> str:
    """The ATen CPU capability this process dispatches to (``DEFAULT``, ``AVX2``, ``AVX512``, …)."""
    return torch.backends.cpu.get_cpu_capability()


def _check_capability(capability: str) -> None:
    if capability not in INT4_CPU_BLOCK_N:
        raise QaloraError(f"no packed int4 layout is known for CPU capability {capability!r}; use one of "
                          f"{', '.join(INT4_CPU_BLOCK_N)} or layout='unpacked'")


# --------------------------------------------------------------------------- CPU int4 layout

def _block_bytes(c: torch.Tensor, split: int | None) -> torch.Tensor:
    """One block of rows ``c [nb, K]`` -> its bytes ``[K, nb/2]`` (low nibble | high nibble << 4)."""
    lo, hi = (c[:split], c[split:]) if split is not None and c.shape[0] == 2 * split else (c[0::2], c[1::2])
    return (lo | (hi << 4)).T.to(torch.uint8)


def pack_int4_cpu(codes: torch.Tensor, capability: str) -> torch.Tensor:
    """Codes ``[N, K]`` in ``0 … 15`` -> uint8 ``[N, K/2]`` as ``_convert_weight_to_int4pack_for_cpu``
    writes them under ``capability``: rows in blocks of ``BLOCK_N``, block ``i`` at byte ``i·BLOCK_N·K/2``
    holding ``[K, nb/2]`` bytes; byte ``j`` of column ``k`` = row ``j`` | row ``j + split`` << 4 in a full
    AVX2 / AVX512 block, else rows ``2j`` | ``2j+1`` << 4. ``N`` a multiple of 16, ``K`` even."""
    _check_capability(capability)
    n, k = codes.shape
    if n % PACKED_ROW_MULTIPLE or k % 2:
        raise QaloraError(f"the int4 CPU layout needs rows % 16 == 0 and an even row length, got {n}x{k}")
    block, split = INT4_CPU_BLOCK_N[capability], INT4_CPU_SPLIT[capability]
    c = codes.to(torch.int32)
    parts = [_block_bytes(c[s:s + block], split).reshape(-1) for s in range(0, n, block)]
    return torch.cat(parts).view(n, k // 2)


def unpack_int4_cpu(packed: torch.Tensor, capability: str) -> torch.Tensor:
    """Inverse of :func:`pack_int4_cpu`: uint8 ``[N, K/2]`` -> uint8 codes ``[N, K]``."""
    _check_capability(capability)
    n, half = packed.shape
    block, split = INT4_CPU_BLOCK_N[capability], INT4_CPU_SPLIT[capability]
    flat, rows = packed.reshape(-1), []
    for s in range(0, n, block):
        nb = min(block, n - s)
        b = flat[s * half:(s + nb) * half].view(2 * half, nb // 2).T  # [nb/2, K]
        lo, hi = b & 15, b >> 4
        full = split is not None and nb == 2 * split
        rows.append(torch.cat([lo, hi]) if full else torch.stack([lo, hi], dim=1).reshape(nb, 2 * half))
    return torch.cat(rows)


# --------------------------------------------------------------------------- unpacked (IntxUnpackedToInt8Tensor)

def torchao_qparams(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our ``(codes, scale, offset)`` in torchao's convention ``w = (qdata - zero_point) * scale``.

    Args:
        codes: integer ``[out, in]`` in ``0 … 2^b - 1``.
        scale, offset: ``[out, in / L]``.
    Returns:
        ``qdata`` int8 ``[out, in]`` = ``codes - 2^(b-1)``; ``scale`` fp32 ``[out, in / L]``;
        ``zero_point`` fp32 ``[out, in / L]`` = ``-2^(b-1) - offset / scale`` (fp64, rounded
        once). Degenerate groups (scale 0, or ``offset / scale`` not finite in fp32) become codes
        0, scale 1, ``zero_point = -2^(b-1) - offset``: every weight equals ``offset``, as before.
    """
    half = 2 ** (bits - 1)
    s64, o64 = scale.double(), offset.double()
    zero = (-half - o64 / s64).float()
    bad = (scale == 0) | ~torch.isfinite(zero)
    qdata = codes.to(torch.int16) - half
    if bool(bad.any()):
        zero = torch.where(bad, (-half - o64).float(), zero)
        s64 = torch.where(bad, torch.ones_like(s64), s64)
        group = codes.shape[1] // scale.shape[1]
        qdata = torch.where(bad.repeat_interleave(group, dim=1), torch.full_like(qdata, -half), qdata)
    return qdata.to(torch.int8), s64.float(), zero


def torchao_weight(qw: QuantizedWeight):
    """An ``IntxUnpackedToInt8Tensor`` ``[out, in]`` (fp32, block ``(1, L)``) holding ``qw``."""
    tq = _torchao_quantization()
    qdata, scale, zero = torchao_qparams(qw.codes(), qw.scale, qw.offset, qw.bits)
    return tq.IntxUnpackedToInt8Tensor(qdata, scale, zero, getattr(torch, f"int{qw.bits}"), (1, qw.group_size),
                                       torch.float32, None)


# --------------------------------------------------------------------------- packed (Int4OpaqueTensor)

def tinygemm_scale_and_zero(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``scale, offset [out, in/L]`` -> fp32 ``[in/L, out, 2]`` = ``(scale, offset + 8·scale)``: the kernel's
    ``w = (q - 8)·scale + zero`` is our ``scale·q + offset`` (zero in fp64, rounded once to fp32)."""
    zero = (offset.double() + 8 * scale.double()).float()
    if not bool(torch.isfinite(zero).all()):
        raise QaloraError("offset + 8 * scale overflows fp32 in some group; use layout='unpacked'")
    return torch.stack([scale.float().T, zero.T], dim=-1).contiguous()


def packed_weight(qw: QuantizedWeight, capability: str):
    """An ``Int4OpaqueTensor`` ``[out, in]`` (fp32, block ``[1, L]``) holding ``qw`` (b <= 4) in the
    int4 CPU layout of ``capability``."""
    if reason := packed_refusal(qw.bits, qw.group_size, qw.out_features):
        raise QaloraError(reason)
    with quiet_imports():
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    codes = qw.codes()
    packed = pack_int4_cpu(codes, capability)
    torch_packs = capability == cpu_capability()  # torch's own packer is the authority for this machine's layout
    if torch_packs and not torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)):
        raise QaloraError(f"torch {torch.__version__} packs int4 for {capability} differently from qalora; "
                          "use layout='unpacked'")
    return Int4OpaqueTensor(packed, tinygemm_scale_and_zero(qw.scale, qw.offset), [1, qw.group_size],
                            torch.Size([qw.out_features, qw.in_features]))


def packed_refusal(bits: int, group_size: int, out_features: int | None = None) -> str | None:
    """Why a layer (or, without ``out_features``, any layer) cannot take the packed layout (``None``: it can)."""
    if bits > 4:
        return f"the packed layout holds codes of up to 4 bits, not {bits}; use layout='unpacked'"
    if group_size not in PACKED_GROUP_SIZES:
        return (f"the packed layout needs group_size {', '.join(map(str, PACKED_GROUP_SIZES))} (the CPU int4 "
                f"kernel's), not {group_size}; use layout='unpacked'")
    if out_features is not None and out_features % PACKED_ROW_MULTIPLE:
        return f"the packed layout needs out_features % 16 == 0, not {out_features}; use layout='unpacked'"
    return None


# --------------------------------------------------------------------------- the registry

def _unpacked_reader(tensor, qw: QuantizedWeight, capability):
    return lambda r0, r1: tensor[r0:r1].dequantize()


def _packed_reader(tensor, qw: QuantizedWeight, capability):
    """Rows ``r0:r1`` of the kernel's ``(q - 8)·scale + zero`` in fp32 (computed in fp64 and rounded
    once: torch's kernel fuses it into an FMA), from the bytes written: their codes (unpacked again)
    must be ``qw``'s."""
    q = unpack_int4_cpu(tensor.qdata, capability)
    if not torch.equal(q, qw.codes()):
        raise QaloraError(f"the packed int4 bytes do not unpack to the layer's codes ({capability} layout)")
    group = qw.group_size

    def rows(r0: int, r1: int) -> torch.Tensor:
        sz = tensor.scale_and_zero[:, r0:r1]  # [in/L, rows, 2]
        scale, zero = (sz[..., i].T.double().repeat_interleave(group, dim=1) for i in (0, 1))
        return ((q[r0:r1].double() - 8) * scale + zero).float()  # rounded once, as the kernel's FMA does

    return rows


@dataclass(frozen=True)
class Layout:
    """How one layout builds, reads back and describes a layer (see the module docstring)."""

    name: str
    tensor: str  # torchao class of each quantized weight
    weights_file: str
    build: Callable  # (QuantizedWeight, capability) -> torchao tensor
    reader: Callable  # (tensor, qw, capability) -> (r0, r1) -> fp32 dense rows, as torchao computes them
    convention: str


LAYOUTS = {
    "unpacked": Layout("unpacked", "IntxUnpackedToInt8Tensor", "model.safetensors", lambda qw, cap: torchao_weight(qw),
                       _unpacked_reader, "qdata = q - 2^(b-1), zero_point = -2^(b-1) - offset / scale, fp32"),
    "packed": Layout("packed", "Int4OpaqueTensor", "pytorch_model.bin", packed_weight, _packed_reader,
                     "two codes per byte in the CPU int4 layout, scale_and_zero = (scale, offset + 8 * scale), fp32"),
}
DEFAULT_LAYOUT = "unpacked"  # portable and safetensors; 'packed' is tied to one CPU capability (module docstring)
PACKED_LOAD = "import torchao.prototype.quantization.int4  # before from_pretrained: registers Int4OpaqueTensor"


def get_layout(layout: str) -> Layout:
    if layout not in LAYOUTS:
        raise QaloraError(f"layout {layout!r} is not known; use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]
