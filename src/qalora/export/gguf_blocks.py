"""GGUF tensor data from qalora's quantized weights: pure array functions, no file I/O.

GGUF ``Q4_1`` (llama.cpp ``block_q4_1``) stores a row as blocks of 32 consecutive weights,
20 bytes each::

    bytes 0-1   d   fp16 (little-endian)
    bytes 2-3   m   fp16
    bytes 4-19  qs  byte j = q[j] | q[j + 16] << 4        (j = 0 … 15, q in 0 … 15)
    w[k] = d * q[k] + m                                    (computed in fp32 by ggml)

qalora's ``W~[o, i] = scale[o, g] * q[o, i] + offset[o, g]`` with groups of ``L`` contiguous
columns maps onto it exactly when ``L`` is a multiple of 32: every block lies in one group, so
``d = scale[o, g]`` and ``m = offset[o, g]`` (float offsets are what Q4_1 stores: a merged
offset needs no re-quantization). 2-, 3- and 4-bit codes are all valid 4-bit codes, so INT2,
INT3 and INT4 weights are written exactly up to the fp16 rounding of ``d`` and ``m``.
"""

from __future__ import annotations

import numpy as np
import torch

from qalora.errors import QaloraError

Q4_1_BLOCK = 32      # weights per block
Q4_1_BYTES = 20      # bytes per block: fp16 d, fp16 m, 16 bytes of nibbles
_F16_MAX = float(np.finfo(np.float16).max)


def _np(x, dtype=None) -> np.ndarray:
    """A CPU numpy view/copy of a torch tensor or array-like."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x if dtype is None else x.astype(dtype, copy=False)


def q4_1_unsupported(bits: int, group_size: int, in_features: int) -> str | None:
    """Why a ``bits``/``group_size`` weight cannot be written as Q4_1, or ``None`` if it can."""
    if bits > 4:
        return f"{bits}-bit codes do not fit Q4_1's 4-bit codes (2-, 3- and 4-bit weights do)"
    if group_size % Q4_1_BLOCK or in_features % Q4_1_BLOCK:
        return (f"group_size {group_size} (in_features {in_features}) is not a multiple of the "
                f"{Q4_1_BLOCK}-weight Q4_1 block; use 32, 64, 128 or 256")
    return None


def _check(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, group_size: int, name: str) -> None:
    if codes.ndim != 2:
        raise QaloraError(f"{name}: codes must be [out, in], got shape {codes.shape}")
    out_f, in_f = codes.shape
    top = int(codes.max()) if codes.size else 0
    why = (f"its codes reach {top}, above Q4_1's 4-bit maximum 15 (2-, 3- and 4-bit weights fit, 8-bit do not)"
           if top > 15 else q4_1_unsupported(4, group_size, in_f))
    if why is not None:
        raise QaloraError(f"{name} cannot be written as GGUF Q4_1: {why}; "
                          "export with fallback='f16' to write it dequantized as F16 instead")
    if in_f % group_size:
        raise QaloraError(f"{name}: group_size {group_size} does not divide in_features {in_f}")
    for what, t in (("scale", scale), ("offset", offset)):
        if t.shape != (out_f, in_f // group_size):
            raise QaloraError(f"{name}: {what} has shape {t.shape}, expected {(out_f, in_f // group_size)}")
        big = float(np.abs(t).max()) if t.size else 0.0
        if not np.isfinite(big) or big > _F16_MAX:
            raise QaloraError(f"{name}: {what} reaches {big:g}, beyond fp16's range ({_F16_MAX:g}) that Q4_1 "
                              "stores d and m in")


def q4_1_blocks(codes, scale, offset, group_size: int, name: str = "weight") -> np.ndarray:
    """Pack a group-wise quantized weight into GGUF Q4_1 blocks.

    Args:
        codes: ``[out, in]`` integer codes, each < 16 (uint8; 2/3/4-bit qalora codes).
        scale, offset: ``[out, in / L]`` (fp32); become fp16 ``d`` and ``m`` of every block of
            their group.
        group_size: ``L``, a multiple of 32.
        name: named in errors.
    Returns:
        uint8 ``[out, in / 32 * 20]``: row ``o`` holds its ``in / 32`` blocks in column order
        (the byte layout ``GGUFWriter.add_tensor(..., raw_dtype=Q4_1)`` and llama.cpp expect).
    Raises:
        QaloraError: codes above 15, a group size not a multiple of 32, or a scale/offset
            outside fp16's range (never rounded silently).
    """
    codes, scale, offset = _np(codes), _np(scale, np.float32), _np(offset, np.float32)
    _check(codes, scale, offset, group_size, name)
    out_f, in_f = codes.shape
    nb = in_f // Q4_1_BLOCK
    per_group = group_size // Q4_1_BLOCK
    q = codes.astype(np.uint8, copy=False).reshape(out_f, nb, Q4_1_BLOCK)        # [out, nb, 32]
    blocks = np.empty((out_f, nb, Q4_1_BYTES), dtype=np.uint8)
    for lo, t in ((0, scale), (2, offset)):                                         # d, then m
        half = np.repeat(t.astype("<f2"), per_group, axis=1)                      # [out, nb]
        blocks[..., lo:lo + 2] = half.view(np.uint8).reshape(out_f, nb, 2)
    blocks[..., 4:] = q[..., :16] | (q[..., 16:] << 4)                            # [out, nb, 16]
    return blocks.reshape(out_f, nb * Q4_1_BYTES)


def q4_1_weights(codes, scale, offset, group_size: int) -> np.ndarray:
    """``[out, in]`` fp32 weights a Q4_1 reader computes from ``q4_1_blocks(...)``:
    ``fp16(scale) * q + fp16(offset)`` in fp32, the same operations as ggml and gguf-py."""
    codes, scale, offset = _np(codes), _np(scale, np.float32), _np(offset, np.float32)
    out_f, in_f = codes.shape
    d = scale.astype(np.float16).astype(np.float32)[:, :, None]                  # [out, G, 1]
    m = offset.astype(np.float16).astype(np.float32)[:, :, None]
    q = codes.reshape(out_f, in_f // group_size, group_size).astype(np.float32)   # [out, G, L]
    return ((d * q) + m).reshape(out_f, in_f)


def to_f16(w, name: str = "weight") -> tuple[np.ndarray, float]:
    """``w`` as fp16 and the max abs rounding error (refuses values beyond fp16's range)."""
    w = _np(w, np.float32)
    big = float(np.abs(w).max()) if w.size else 0.0
    if not np.isfinite(big) or big > _F16_MAX:
        raise QaloraError(f"{name} reaches {big:g}, beyond fp16's range ({_F16_MAX:g}); it cannot be stored as F16")
    h = w.astype(np.float16)
    return h, max_abs_diff(h, w)


def max_abs_diff(a, b) -> float:
    a, b = _np(a, np.float32), _np(b, np.float32)
    return float(np.abs(a - b).max()) if a.size else 0.0


def rotary_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's HF converter gives Q (``n_head``) and K (``n_kv_head``) weights.

    Hugging Face Llama rotates the two halves of each head (``rotate_half``); llama.cpp rotates
    interleaved pairs. The converter reorders rows as
    ``w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)``,
    i.e. ``w_gguf = w_hf[order]``. Rows move whole, so a quantized row keeps its codes, scales
    and offsets (groups run along the input dimension).
    """
    if rows % (2 * n_head):
        raise QaloraError(f"{rows} rows do not split into {n_head} heads of even size")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
