"""The 32-element block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.

Without an importance matrix these are ggml's ``quantize_row_*_ref``: one scale (and min) per block
from the block's extremes, then a rounding pass. They are elementwise except for the extremes, which
are order-independent, so a chunk is laid out as ``(32, n_blocks)`` columns and every step is one
whole-array operation. The importance-matrix paths (``quantize_row_*_impl``) reuse the K-quant
searches (``make_qx_quants``, ``make_qkx3_quants``) with per-row ``sigma2``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import Kernel
from ._common import F32, first_max_abs, row_sigma2, safe_reciprocal
from .blocks import BLOCK, as_blocks, as_bytes

QK = 32


def _columns(x: np.ndarray) -> np.ndarray:
    """Blocks as columns: ``(32, n_blocks)``, so per-block extremes are elementwise ops across rows."""
    return np.ascontiguousarray(x.reshape(-1, QK).T)


def _first_extreme(xt: np.ndarray, reduce: np.ufunc) -> np.ndarray:
    """``if (v < min) min = v`` from ±FLT_MAX: the extreme value, and for a zero extreme the first
    zero met (``-0.0`` and ``0.0`` compare equal, so C keeps whichever comes first)."""
    ext = reduce.reduce(xt, axis=0)
    zero = ext == 0
    if zero.any():
        zb = xt[:, zero]
        first = np.argmax(zb == 0, axis=0)
        ext[zero] = zb[first, np.arange(zb.shape[1])]
    return ext


def _to_int8(v: np.ndarray) -> np.ndarray:
    """C's ``(int8_t)float`` for values the kernels keep within int8: truncation toward zero.

    numpy's cast compiles to the same x86 conversion as ggml's, so NaN (from NaN input) gives 0 in both.
    """
    return v.astype(np.int8)


def _roundf_int8(v: np.ndarray) -> np.ndarray:
    """C's ``(int8_t)roundf(v)``: half away from zero (``np.rint`` rounds half to even).

    With ``t = trunc(v)``, ``v - t`` and its double are exact, and truncating the double adds ±1
    exactly when the fraction reaches ±0.5.
    """
    t = _to_int8(v)
    frac = v - t
    frac *= F32(2)
    return t + _to_int8(frac)


def _nibbles(levels: np.ndarray) -> np.ndarray:
    """Levels ``(n_blocks, 32)`` → ggml's packing ``(n_blocks, 16)``: element j low, j+16 high nibble."""
    lv = levels.astype(np.uint8, copy=False) & np.uint8(0x0F)
    return lv[:, :16] | (lv[:, 16:] << 4)


def _high_bits(levels: np.ndarray) -> np.ndarray:
    """Bit 4 of each level of ``(n_blocks, 32)`` gathered into one little-endian uint32 (bit j = element j)."""
    bits = (levels.astype(np.uint8, copy=False) >> 4) & np.uint8(1)
    return np.ascontiguousarray(np.packbits(bits, axis=1, bitorder="little")).view("<u4").reshape(-1)


# ---- without an importance matrix: quantize_row_*_ref ---------------------------------------


# The extremes need blocks as columns; the elementwise rest runs on blocks as rows, which spares
# transposing the small integer results back (a byte-wise transpose costs more than the arithmetic).


def _symmetric_ref(x: np.ndarray, qtype: T, half_range: int) -> np.ndarray:
    xt = _columns(x)
    d = first_max_abs(xt)[1] / F32(-half_range)
    v = x.reshape(-1, QK) * safe_reciprocal(d)[:, None]
    v += F32(half_range + 0.5)
    # MIN(top, (int8_t)v) == (int8_t)min(v, top) for the v ≥ 0 these blocks produce; float min is faster
    np.minimum(v, F32(2 * half_range - 1), out=v)
    levels = _to_int8(v)
    out = np.empty(xt.shape[1], BLOCK[qtype])
    out["d"] = d
    out["qs"] = _nibbles(levels)
    if qtype is T.Q5_0:
        out["qh"] = _high_bits(levels)
    return as_bytes(out, x.shape[0])


def _affine_ref(x: np.ndarray, qtype: T, n_levels: int) -> np.ndarray:
    xt = _columns(x)
    lo = _first_extreme(xt, np.minimum)
    hi = _first_extreme(xt, np.maximum)
    d = (hi - lo) / F32(n_levels - 1)
    v = x.reshape(-1, QK) - lo[:, None]
    v *= safe_reciprocal(d)[:, None]
    v += F32(0.5)
    if qtype is T.Q4_1:
        np.minimum(v, F32(n_levels - 1), out=v)
    levels = _to_int8(v)
    out = np.empty(xt.shape[1], BLOCK[qtype])
    out["d"] = d
    out["m"] = lo
    out["qs"] = _nibbles(levels)
    if qtype is T.Q5_1:
        out["qh"] = _high_bits(levels)
    return as_bytes(out, x.shape[0])


def _q8_0(x: np.ndarray, _qw: Optional[np.ndarray]) -> np.ndarray:
    xt = _columns(x)
    d = np.maximum.reduce(np.abs(xt), axis=0) / F32(127)
    out = np.empty(xt.shape[1], BLOCK[T.Q8_0])
    out["d"] = d
    out["qs"] = _roundf_int8(x.reshape(-1, QK) * safe_reciprocal(d)[:, None])
    return as_bytes(out, x.shape[0])


# ---- with an importance matrix: quantize_row_*_impl ------------------------------------------


def _weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])`` with the row's ``sigma2``, as columns ``(32, n_blocks)``."""
    sigma2 = row_sigma2(x)
    w = np.sqrt(sigma2[:, None] + x * x)
    w *= qw[None, :]
    return _columns(w)


def _symmetric_impl(x: np.ndarray, qw: np.ndarray, qtype: T, half_range: int) -> np.ndarray:
    from .kquants_symmetric import make_qx_quants

    xt = _columns(x)
    scale, levels = make_qx_quants(xt, half_range, 1, _weights(x, qw))
    levels = levels.T
    out = np.empty(xt.shape[1], BLOCK[qtype])
    out["d"] = scale
    out["qs"] = _nibbles(levels)
    if qtype is T.Q5_0:
        out["qh"] = _high_bits(levels)
    return as_bytes(out, x.shape[0])


def _affine_impl(x: np.ndarray, qw: np.ndarray, qtype: T, n_levels: int) -> np.ndarray:
    from .kquants_affine import make_qkx3_quants

    xt = _columns(x)
    scale, the_min, levels = make_qkx3_quants(xt, n_levels - 1, _weights(x, qw), -0.9, 0.05, 36, False)
    levels = levels.T
    out = np.empty(xt.shape[1], BLOCK[qtype])
    out["d"] = scale
    out["m"] = -the_min
    out["qs"] = _nibbles(levels)
    if qtype is T.Q5_1:
        out["qh"] = _high_bits(levels)
    return as_bytes(out, x.shape[0])


def _symmetric(qtype: T, half_range: int):
    def quantize(x: np.ndarray, qw: Optional[np.ndarray]) -> np.ndarray:
        if qw is None:
            return _symmetric_ref(x, qtype, half_range)
        return _symmetric_impl(x, qw, qtype, half_range)

    return quantize


def _affine(qtype: T, n_levels: int):
    def quantize(x: np.ndarray, qw: Optional[np.ndarray]) -> np.ndarray:
        if qw is None:
            return _affine_ref(x, qtype, n_levels)
        return _affine_impl(x, qw, qtype, n_levels)

    return quantize


# ---- dequantization ---------------------------------------------------------------------------


def _levels(b: np.ndarray) -> np.ndarray:
    """Unpack the 32 levels of each block (low nibbles, then high nibbles, plus bit 4 from qh)."""
    qs = b["qs"]
    lv = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)
    if "qh" in b.dtype.names:
        qh = b["qh"][:, None] >> np.arange(QK, dtype=np.uint32)
        lv |= ((qh & 1) << 4).astype(np.int32)
    return lv


def _dequantize(qtype: T, offset: int):
    def dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
        b = as_blocks(data, qtype)
        d = b["d"].astype(F32)[:, None]
        if qtype is T.Q8_0:
            y = b["qs"].astype(F32) * d
        else:
            y = (_levels(b) - offset).astype(F32) * d
            if "m" in b.dtype.names:
                y += b["m"].astype(F32)[:, None]
        return y.reshape(data.shape[0], n_per_row)

    return dequantize


KERNELS = {
    T.Q4_0: Kernel(_symmetric(T.Q4_0, 8), _dequantize(T.Q4_0, 8), uses_imatrix=True),
    T.Q5_0: Kernel(_symmetric(T.Q5_0, 16), _dequantize(T.Q5_0, 16), uses_imatrix=True),
    T.Q4_1: Kernel(_affine(T.Q4_1, 16), _dequantize(T.Q4_1, 0), uses_imatrix=True),
    T.Q5_1: Kernel(_affine(T.Q5_1, 32), _dequantize(T.Q5_1, 0), uses_imatrix=True),
    T.Q8_0: Kernel(_q8_0, _dequantize(T.Q8_0, 0)),
}
