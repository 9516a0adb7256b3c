"""Exact codecs between GGUF (llama.cpp) quantized block types and qalora's per-group affine form.

qalora's canonical form of a quantized weight ``W [rows, cols]``, split along ``cols`` into
contiguous groups of ``L`` weights (``g = i // L``)::

    W[o, i] = scale[o, g] * q[o, i] + offset[o, g]      q: unsigned integer code, scale/offset: fp32

Every type below is such a grid. ``decode`` splits raw GGUF bytes into ``codes`` (the unsigned
``q``), fp32 ``scale``/``offset`` and the type's own stored parameters (``source``), from which
``encode`` writes the bytes back bit for bit. ``d``, ``m``, ``dmin`` are fp16; ``sc``/``mins``
are the K-quants' integer sub-block multipliers.

=====  =====  ====  ===  ===============  ================  =============================================
type   block  L     z    scale            offset            free in storage
=====  =====  ====  ===  ===============  ================  =============================================
Q4_0   32     32    8    d                -8 d              one fp16 d per 32; offset tied to scale
Q4_1   32     32    -    d                m                 fp16 d and fp16 m per 32, independent
Q5_0   32     32    16   d                -16 d             one fp16 d per 32; offset tied to scale
Q5_1   32     32    -    d                m                 fp16 d and fp16 m per 32, independent
Q8_0   32     32    128  d                -128 d            one fp16 d per 32 (stored q is int8 = code-128)
Q4_K   256    32    -    d sc_j           -(dmin m_j)       fp16 d, dmin per 256; sc_j, m_j in 0..63 per 32
Q5_K   256    32    -    d sc_j           -(dmin m_j)       as Q4_K, 5-bit codes
Q6_K   256    16    32   d sc_j           -32 d sc_j        fp16 d per 256; int8 sc_j per 16; offset tied
=====  =====  ====  ===  ===============  ================  =============================================

Exactness of ``dequantize`` against ``gguf.quants.dequantize`` (both fp32, no fused multiply-add):

* Q4_1, Q5_1, Q4_K, Q5_K: gguf-py evaluates ``(d*sc)*q - dmin*m`` / ``d*q + m``; we evaluate the
  very same products and ``x + (-y)``, which IEEE defines as ``x - y``. Identical bits, signed
  zeros included.
* Q4_0, Q5_0, Q8_0, Q6_K (tied zero ``z``): gguf-py computes ``s * (q - z)``, we ``s*q + (-z*s)``.
  Every term is exact: ``s`` is fp16 (11 significant bits) or fp16 times an int8 (<= 18 bits),
  ``q`` has <= 8 bits (Q6_K: 6, so <= 24 bits in all), ``-z*s`` is a power-of-two scaling, and
  the true result ``s*(q-z)`` is itself representable, so the final add does not round either.
  The one difference is the sign of an exact zero: where ``q == z`` and ``s < 0`` gguf-py gives
  ``-0.0`` and the canonical sum ``+0.0`` (equal under ``==``; ``np.array_equal`` holds).
* Non-finite fp16 ``d`` (inf/NaN, never written by llama.cpp) is outside the guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

_F16 = np.dtype("<f2")


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type as an affine grid (see the module table).

    ``layout``: the block's fields in byte order, ``(name, nbytes)``; fp16 fields are little-endian.
    ``code_parts``: how the code's bits are stored, low bits first, ``(field, width, chunk)``: the
    field is read in runs of ``chunk`` bytes, and bit plane ``k`` (bits ``k*width ..``) of every
    byte of a run holds the next ``chunk`` codes (see ``_unpack``).
    ``params``: which parameters set scale/offset: ``"d"`` (tied zero), ``"dm"``, ``"k_min"``, ``"k_int8"``.
    ``signed``: the stored code is ``int8``; the canonical code is ``stored + 128``.
    """

    name: str
    ggml_type: GGMLQuantizationType
    block_weights: int
    block_bytes: int
    group_size: int
    bits: int
    zero: int | None
    free: str
    params: str
    layout: tuple[tuple[str, int], ...]
    code_parts: tuple[tuple[str, int, int], ...]
    signed: bool = False


def _make(name, block_weights, group_size, zero, free, params, layout, code_parts, signed=False) -> BlockType:
    return BlockType(name=name, ggml_type=GGMLQuantizationType[name], block_weights=block_weights,
                     block_bytes=sum(n for _, n in layout), group_size=group_size,
                     bits=sum(w for _, w, _ in code_parts), zero=zero, free=free, params=params,
                     layout=tuple(layout), code_parts=tuple(code_parts), signed=signed)


GGUF_TYPES: dict[str, BlockType] = {bt.name: bt for bt in (
    _make("Q4_0", 32, 32, 8, "fp16 d per 32; offset = -8 d", "d",
          [("d", 2), ("qs", 16)], [("qs", 4, 16)]),
    _make("Q4_1", 32, 32, None, "fp16 d, fp16 m per 32", "dm",
          [("d", 2), ("m", 2), ("qs", 16)], [("qs", 4, 16)]),
    _make("Q5_0", 32, 32, 16, "fp16 d per 32; offset = -16 d", "d",
          [("d", 2), ("qh", 4), ("qs", 16)], [("qs", 4, 16), ("qh", 1, 1)]),
    _make("Q5_1", 32, 32, None, "fp16 d, fp16 m per 32", "dm",
          [("d", 2), ("m", 2), ("qh", 4), ("qs", 16)], [("qs", 4, 16), ("qh", 1, 1)]),
    _make("Q8_0", 32, 32, 128, "fp16 d per 32; offset = -128 d", "d",
          [("d", 2), ("qs", 32)], [("qs", 8, 32)], signed=True),
    _make("Q4_K", 256, 32, None, "fp16 d, dmin per 256; sc, m in 0..63 per 32", "k_min",
          [("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)], [("qs", 4, 32)]),
    _make("Q5_K", 256, 32, None, "fp16 d, dmin per 256; sc, m in 0..63 per 32", "k_min",
          [("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)], [("qs", 4, 32), ("qh", 1, 32)]),
    _make("Q6_K", 256, 16, 32, "fp16 d per 256; int8 sc per 16; offset = -32 d sc", "k_int8",
          [("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)], [("ql", 4, 64), ("qh", 2, 32)]),
)}

# source entries per params kind: fp16 per block, integers per group with their accepted range
_FP16_KEYS = {"d": ("d",), "dm": ("d", "m"), "k_min": ("d", "dmin"), "k_int8": ("d",)}
_INT_KEYS = {"d": {}, "dm": {}, "k_min": {"sc": (0, 63, np.uint8), "mins": (0, 63, np.uint8)},
             "k_int8": {"sc": (-128, 127, np.int8)}}


@dataclass
class Decoded:
    """A decoded GGUF tensor: ``codes`` uint8 ``[rows, cols]`` (0..2**bits-1), ``scale`` and
    ``offset`` fp32 ``[rows, cols // L]``, and ``source``, the stored parameters ``encode`` needs:
    fp16 ``d`` (and ``m`` / ``dmin``) ``[rows, cols // block_weights]``; K-quants' ``sc`` (uint8
    0..63, Q6_K: int8) and ``mins`` (uint8 0..63) ``[rows, cols // L]``."""

    type_name: str
    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    source: dict[str, np.ndarray]


def block_type(type_name: str) -> BlockType:
    """The registry entry for ``type_name`` ("Q4_0", ...); ValueError if unsupported."""
    bt = GGUF_TYPES.get(type_name) if isinstance(type_name, str) else None
    if bt is None:
        raise ValueError(f"unknown GGUF block type {type_name!r}; accepted: {', '.join(GGUF_TYPES)}")
    return bt


def _check_cols(bt: BlockType, cols: int) -> int:
    if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols <= 0 or cols % bt.block_weights:
        raise ValueError(f"cols={cols!r} is not a positive multiple of {bt.block_weights} (the {bt.name} block)")
    return int(cols) // bt.block_weights


# ---- bit planes --------------------------------------------------------------------------------

def _shifts(width: int) -> np.ndarray:
    return np.arange(0, 8, width, dtype=np.uint8).reshape(-1, 1)


def _unpack(packed: np.ndarray, width: int, chunk: int) -> np.ndarray:
    """uint8 ``[..., n]`` → uint8 ``[..., n * 8 // width]``: each run of ``chunk`` bytes yields
    ``8 // width`` runs of ``chunk`` values, bit plane ``k`` (bits ``k*width..``) first to last.
    (Q4_0 nibbles: chunk 16 → low nibbles are weights 0..15, high 16..31; Q5_0 qh: width 1, chunk 1
    → bit ``i % 8`` of byte ``i // 8`` is weight ``i``; Q6_K qh: width 2, chunk 32.)"""
    lead = packed.shape[:-1]
    runs = packed.reshape(*lead, -1, 1, chunk)
    return ((runs >> _shifts(width)) & np.uint8((1 << width) - 1)).reshape(*lead, -1)


def _pack(values: np.ndarray, width: int, chunk: int) -> np.ndarray:
    """Inverse of ``_unpack``: uint8 ``[..., m]`` (values < 2**width) → ``[..., m * width // 8]``."""
    lead = values.shape[:-1]
    planes = values.reshape(*lead, -1, 8 // width, chunk) << _shifts(width)
    return np.bitwise_or.reduce(planes, axis=-2).reshape(*lead, -1)


def _unpack_kscales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte field ``[..., 12]`` → six-bit ``sc``, ``mins`` ``[..., 8]``. Bytes 0-3 hold
    sc_0..3 in bits 0-5, bytes 4-7 mins_0..3; bytes 8-11 hold the low nibbles of sc_4..7 (bits 0-3)
    and mins_4..7 (bits 4-7), whose top two bits sit in bits 6-7 of bytes 0-3 / 4-7."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 2) & 48)], axis=-1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 2) & 48)], axis=-1)
    return sc, mins


def _pack_kscales(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Inverse of ``_unpack_kscales`` (a bijection: 16 six-bit values ↔ 12 bytes)."""
    a = sc[..., :4] | ((sc[..., 4:] & 48) << 2)
    b = mins[..., :4] | ((mins[..., 4:] & 48) << 2)
    c = (sc[..., 4:] & 15) | ((mins[..., 4:] & 15) << 4)
    return np.concatenate([a, b, c], axis=-1)


# ---- fields ↔ codes / parameters ---------------------------------------------------------------

def _split_fields(bt: BlockType, blocks: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 ``[rows, nb, block_bytes]`` → ``{field: uint8 [rows, nb, nbytes]}``."""
    fields, at = {}, 0
    for name, n in bt.layout:
        fields[name] = blocks[..., at:at + n]
        at += n
    return fields


def _codes_from_fields(bt: BlockType, fields: dict[str, np.ndarray]) -> np.ndarray:
    """``[rows, nb, block_weights]`` unsigned codes."""
    codes, shift = None, 0
    for name, width, chunk in bt.code_parts:
        part = _unpack(fields[name], width, chunk) << np.uint8(shift)
        codes = part if codes is None else codes | part
        shift += width
    return codes ^ np.uint8(0x80) if bt.signed else codes  # int8 byte x → x + 128


def _fields_from_codes(bt: BlockType, codes: np.ndarray) -> dict[str, np.ndarray]:
    stored = codes ^ np.uint8(0x80) if bt.signed else codes
    out, shift = {}, 0
    for name, width, chunk in bt.code_parts:
        out[name] = _pack((stored >> np.uint8(shift)) & np.uint8((1 << width) - 1), width, chunk)
        shift += width
    return out


def _source_from_fields(bt: BlockType, fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows, nb = fields["d"].shape[:2]
    src = {k: np.ascontiguousarray(fields[k]).view(_F16)[..., 0].astype(np.float16) for k in _FP16_KEYS[bt.params]}
    if bt.params == "k_min":
        sc, mins = _unpack_kscales(fields["scales"])
        src["sc"], src["mins"] = sc.reshape(rows, -1), mins.reshape(rows, -1)
    elif bt.params == "k_int8":
        src["sc"] = np.ascontiguousarray(fields["scales"]).view(np.int8).reshape(rows, -1)
    return src


def _fields_from_source(bt: BlockType, src: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows, nb = src["d"].shape
    out = {k: src[k].astype(_F16)[..., None].view(np.uint8) for k in _FP16_KEYS[bt.params]}
    if bt.params == "k_min":
        out["scales"] = _pack_kscales(src["sc"].reshape(rows, nb, -1), src["mins"].reshape(rows, nb, -1))
    elif bt.params == "k_int8":
        out["scales"] = src["sc"].reshape(rows, nb, -1).view(np.uint8)
    return out


def _affine(bt: BlockType, src: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """fp32 ``scale``, ``offset`` ``[rows, groups]`` from the stored parameters. Products are
    formed as gguf-py forms them (``d * sc``, ``dmin * m``), so they round identically."""
    rows, nb = src["d"].shape
    d = src["d"].astype(np.float32)
    if bt.params == "d":
        return d, np.float32(-bt.zero) * d  # power-of-two multiple: exact
    if bt.params == "dm":
        return d, src["m"].astype(np.float32)
    sc = src["sc"].reshape(rows, nb, -1).astype(np.float32)
    scale = (d[..., None] * sc).reshape(rows, -1)
    if bt.params == "k_int8":
        return scale, np.float32(-bt.zero) * scale
    dm = src["dmin"].astype(np.float32)[..., None] * src["mins"].reshape(rows, nb, -1).astype(np.float32)
    return scale, -dm.reshape(rows, -1)  # gguf-py subtracts dm; adding -dm is the same IEEE op


# ---- public API --------------------------------------------------------------------------------

def decode(type_name: str, raw: np.ndarray, cols: int) -> Decoded:
    """Raw GGUF bytes uint8 ``[rows, cols // block_weights * block_bytes]`` → ``Decoded``."""
    bt = block_type(type_name)
    nb = _check_cols(bt, cols)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise ValueError(f"raw dtype {getattr(raw, 'dtype', type(raw).__name__)} is not accepted; expected uint8")
    if raw.ndim != 2 or raw.shape[1] != nb * bt.block_bytes:
        raise ValueError(f"raw shape {tuple(raw.shape)} does not match {bt.name} with cols={cols}; "
                         f"expected (rows, {nb * bt.block_bytes})")
    rows = raw.shape[0]
    fields = _split_fields(bt, raw.reshape(rows, nb, bt.block_bytes))
    codes = _codes_from_fields(bt, fields).reshape(rows, int(cols))
    src = _source_from_fields(bt, fields)
    scale, offset = _affine(bt, src)
    return Decoded(bt.name, codes, scale, offset, src)


def _check_codes(bt: BlockType, codes: np.ndarray) -> np.ndarray:
    if not isinstance(codes, np.ndarray) or codes.dtype.kind not in "iu" or codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D integer array [rows, cols]; got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} of shape {getattr(codes, 'shape', None)}")
    _check_cols(bt, codes.shape[1])
    if codes.size:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 1 << bt.bits:
            bad = lo if lo < 0 else hi
            raise ValueError(f"code {bad} out of range for {bt.name}; accepted 0..{(1 << bt.bits) - 1}")
    return codes.astype(np.uint8)


def _check_source(bt: BlockType, source: dict, rows: int, nb: int) -> dict[str, np.ndarray]:
    out = {}
    for key in _FP16_KEYS[bt.params]:
        v = source.get(key) if isinstance(source, dict) else None
        if not isinstance(v, np.ndarray) or v.dtype != np.float16 or v.shape != (rows, nb):
            raise ValueError(f"source[{key!r}] must be float16 of shape {(rows, nb)} for {bt.name}; got "
                             f"{getattr(v, 'dtype', type(v).__name__)} {getattr(v, 'shape', '')}")
        out[key] = v
    groups = nb * bt.block_weights // bt.group_size
    for key, (lo, hi, dtype) in _INT_KEYS[bt.params].items():
        v = source.get(key)
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "iu" or v.shape != (rows, groups):
            raise ValueError(f"source[{key!r}] must be integers of shape {(rows, groups)} for {bt.name}; got "
                             f"{getattr(v, 'dtype', type(v).__name__)} {getattr(v, 'shape', '')}")
        if v.size and (int(v.min()) < lo or int(v.max()) > hi):
            bad = int(v.min()) if int(v.min()) < lo else int(v.max())
            raise ValueError(f"source[{key!r}] value {bad} out of range for {bt.name}; accepted {lo}..{hi}")
        out[key] = v.astype(dtype)
    return out


def encode(type_name: str, codes: np.ndarray, source: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of ``decode``: codes ``[rows, cols]`` and ``source`` → raw uint8
    ``[rows, cols // block_weights * block_bytes]``. ``encode(d.type_name, d.codes, d.source)``
    returns the decoded bytes exactly (scale/offset are derived, never read)."""
    bt = block_type(type_name)
    codes = _check_codes(bt, codes)
    rows, cols = codes.shape
    nb = cols // bt.block_weights
    src = _check_source(bt, source, rows, nb)
    fields = {**_fields_from_source(bt, src), **_fields_from_codes(bt, codes.reshape(rows, nb, bt.block_weights))}
    return np.concatenate([fields[name] for name, _ in bt.layout], axis=-1).reshape(rows, nb * bt.block_bytes)


def dequantize(decoded: Decoded) -> np.ndarray:
    """fp32 ``[rows, cols]`` = ``scale * q + offset`` per group: one fp32 multiply, then one fp32
    add (two numpy ops, never fused). Bit-exact to gguf-py up to the sign of zero (module docstring)."""
    bt = block_type(decoded.type_name)
    codes, scale, offset = decoded.codes, decoded.scale, decoded.offset
    rows, cols = codes.shape
    groups = _check_cols(bt, cols) * bt.block_weights // bt.group_size
    for name, v in (("scale", scale), ("offset", offset)):
        if v.shape != (rows, groups):
            raise ValueError(f"{name} shape {tuple(v.shape)} does not match codes {(rows, cols)}; "
                             f"expected {(rows, groups)} for {bt.name}")
    q = codes.reshape(rows, groups, bt.group_size).astype(np.float32)
    w = scale.astype(np.float32)[..., None] * q
    w = w + offset.astype(np.float32)[..., None]
    return w.reshape(rows, cols)
