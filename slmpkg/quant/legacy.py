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
from ._common import F32, byte_field, dequantize_chunks, half_column, row_sigma2, safe_reciprocal, sign_extend, split_nibbles, spread
from .blocks import BLOCK

QK = 32


def _columns(x: np.ndarray) -> np.ndarray:
    """Blocks as columns: ``(32, n_blocks)``, so per-block extremes are elementwise ops across rows."""
    return np.ascontiguousarray(x.reshape(-1, QK).T)


# ---- without an importance matrix: quantize_row_*_ref ---------------------------------------
#
# numpy is fast along long contiguous rows and slow along a block's short last axis (each short row
# costs a loop of its own). So a chunk is first rearranged into "lanes": groups of four consecutive
# values moved as one 16-byte complex128 (a quarter of the cost of an element-wise transpose), giving
# ``(8, n_blocks * 4)`` where row k holds elements 4k..4k+3 of every block. Extremes are then
# reductions across eight rows, per-block scales are repeated four times to line up, and the integer
# levels come back to block order as 4-byte groups.

LANES = QK // 4


def _lanes(xb: np.ndarray) -> np.ndarray:
    """``(n_blocks, 32)`` → ``(8, n_blocks * 4)`` float32 lanes (see above)."""
    return np.ascontiguousarray(xb.view(np.complex128).T).view(F32).reshape(LANES, -1)


def _per_block(v4: np.ndarray, combine: np.ufunc) -> np.ndarray:
    """Fold the four values each block has in a lane row, ``(n_blocks * 4,)`` → ``(n_blocks,)``."""
    c = v4.reshape(-1, 4)
    return combine(combine(c[:, 0], c[:, 1]), combine(c[:, 2], c[:, 3]))


def _extremes(lanes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and smallest value of each block."""
    hi = _per_block(np.maximum.reduce(lanes, axis=0), np.maximum)
    lo = _per_block(np.minimum.reduce(lanes, axis=0), np.minimum)
    return hi, lo


def _signed_extreme(xb: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` from 0: the first value of largest
    magnitude, ``+0.0`` for an all-zero block. Only blocks holding both ``a`` and ``-a`` need a look
    for which comes first."""
    out = np.where(hi >= -lo, hi, lo)
    tied = np.flatnonzero((hi == -lo) & (hi > 0))
    if tied.size:
        rows = xb[tied]
        out[tied] = rows[np.arange(tied.size), np.argmax(np.abs(rows) == hi[tied, None], axis=1)]
    out[out == 0] = F32(0.0)  # C only ever stores a nonzero value
    return out


def _first_zero_sign(xb: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """``if (v < min) min = v`` from ±FLT_MAX keeps the first zero met when the extreme is zero
    (``-0.0`` and ``0.0`` compare equal); give such blocks that zero's sign."""
    zero = np.flatnonzero(ext == 0)
    if zero.size:
        rows = xb[zero]
        ext[zero] = rows[np.arange(zero.size), np.argmax(rows == 0, axis=1)]
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


_ONES = np.uint64(0x0101010101010101)
_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)


def _cap(levels: np.ndarray, bits: int) -> np.ndarray:
    """``MIN(2**bits - 1, level)`` in place for levels in ``[0, 2**bits]``, eight bytes per operation:
    bit ``bits`` is set only in a level equal to ``2**bits``, and subtracting it gives ``2**bits - 1``
    (numpy's float ``minimum`` is several times slower than this)."""
    w = levels.view(np.uint64)
    w -= (w >> np.uint64(bits)) & _ONES
    return levels


def _nibbles(lane_levels: np.ndarray, wide: bool) -> np.ndarray:
    """Lane levels (uint8 ``(8, n_blocks * 4)``) → ggml's 16 bytes per block as uint32 lanes
    ``(4, n_blocks)``: element j in the low nibble, j+16 in the high one. ``wide`` levels (5-bit)
    lose their bit 4 here."""
    w = lane_levels.view(np.uint64)  # rows 0-3 hold elements 0-15, rows 4-7 elements 16-31
    low, high = w[: LANES // 2], w[LANES // 2 :]
    if wide:
        low, high = low & _LOW_NIBBLES, high & _LOW_NIBBLES
    return (low | (high << np.uint64(4))).view(np.uint32).reshape(LANES // 2, -1)


def _blocks(n_blocks: int, qtype: T) -> np.ndarray:
    """An uninitialized ``(n_blocks, block bytes)`` output for ``qtype``."""
    return np.empty((n_blocks, BLOCK[qtype].itemsize), np.uint8)


def _put_half(out: np.ndarray, offset: int, values: np.ndarray) -> None:
    """Store ``values`` as the fp16 at byte ``offset`` of every block."""
    out.view(np.uint16)[:, offset // 2] = values.astype(np.float16).view(np.uint16)


def _put_lanes(out: np.ndarray, offset: int, lanes: np.ndarray) -> None:
    """Store uint32 lanes ``(k, n_blocks)`` as the ``4k`` bytes at ``offset`` of every block, in order."""
    out[:, offset : offset + 4 * lanes.shape[0]].view(np.uint32)[...] = lanes.T


def _pack(qtype: T, n_rows: int, d: np.ndarray, levels: np.ndarray, m: Optional[np.ndarray] = None) -> np.ndarray:
    """Blocks of a 4/5-bit type from scales ``d`` (and mins ``m``) and lane levels, as ``(n_rows, row bytes)``."""
    out = _blocks(d.shape[0], qtype)
    _put_half(out, 0, d)
    if m is not None:
        _put_half(out, 2, m)
    wide = qtype in (T.Q5_0, T.Q5_1)
    if wide:  # qh sits just before qs
        out[:, -QK // 2 - 4 : -QK // 2].view(np.uint32)[:, 0] = _high_bits(levels)
    _put_lanes(out, out.shape[1] - QK // 2, _nibbles(levels, wide))
    return out.reshape(n_rows, -1)


def _lanes_of_columns(levels: np.ndarray) -> np.ndarray:
    """Integer levels laid out as columns ``(32, n_blocks)`` → uint8 lanes ``(8, n_blocks * 4)``."""
    nb = levels.shape[1]
    return np.ascontiguousarray(levels.astype(np.uint8).reshape(LANES, 4, nb).transpose(0, 2, 1)).reshape(LANES, -1)


def _high_bits(lane_levels: np.ndarray) -> np.ndarray:
    """Bit 4 of each of a block's 32 levels gathered into one uint32 (bit j = element j)."""
    bits = ((lane_levels.view(np.uint32) >> np.uint32(4)) & np.uint32(0x01010101)).reshape(LANES, -1)
    nibble = (bits | (bits >> np.uint32(7)) | (bits >> np.uint32(14)) | (bits >> np.uint32(21))) & np.uint32(0xF)
    out = nibble[0].copy()
    for k in range(1, LANES):
        out |= nibble[k] << np.uint32(4 * k)
    return out


def _symmetric_ref(x: np.ndarray, qtype: T, half_range: int) -> np.ndarray:
    xb = x.reshape(-1, QK)
    lanes = _lanes(xb)
    d = _signed_extreme(xb, *_extremes(lanes)) / F32(-half_range)
    lanes *= np.repeat(safe_reciprocal(d), 4)
    lanes += F32(half_range + 0.5)
    # MIN(top, (int8_t)v): the levels land in [0, 2 * half_range]
    levels = _cap(_to_int8(lanes).view(np.uint8), half_range.bit_length())
    return _pack(qtype, x.shape[0], d, levels)


def _affine_ref(x: np.ndarray, qtype: T, n_levels: int) -> np.ndarray:
    xb = x.reshape(-1, QK)
    lanes = _lanes(xb)
    hi, lo = _extremes(lanes)
    hi, lo = _first_zero_sign(xb, hi), _first_zero_sign(xb, lo)
    d = (hi - lo) / F32(n_levels - 1)
    lanes -= np.repeat(lo, 4)
    lanes *= np.repeat(safe_reciprocal(d), 4)
    lanes += F32(0.5)
    levels = _to_int8(lanes).view(np.uint8)
    if qtype is T.Q4_1:
        _cap(levels, 4)
    return _pack(qtype, x.shape[0], d, levels, lo)


def _q8_0(x: np.ndarray, _qw: Optional[np.ndarray]) -> np.ndarray:
    xb = x.reshape(-1, QK)
    lanes = _lanes(xb)
    hi, lo = _extremes(lanes)
    amax = np.maximum(hi, -lo) + F32(0.0)  # C's fabsf gives +0.0 for a block of -0.0
    d = amax / F32(127)
    lanes *= np.repeat(safe_reciprocal(d), 4)
    out = _blocks(xb.shape[0], T.Q8_0)
    _put_half(out, 0, d)
    _put_lanes(out, 2, _roundf_int8(lanes).view(np.uint32).reshape(LANES, -1))
    return out.reshape(x.shape[0], -1)


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
    return _pack(qtype, x.shape[0], scale, _lanes_of_columns(levels))


def _affine_impl(x: np.ndarray, qw: np.ndarray, qtype: T, n_levels: int) -> np.ndarray:
    from .kquants_affine import make_qkx3_quants

    xt = _columns(x)
    scale, the_min, levels = make_qkx3_quants(xt, n_levels - 1, _weights(x, qw), -0.9, 0.05, 36, False)
    return _pack(qtype, x.shape[0], scale, _lanes_of_columns(levels), -the_min)


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


def _dequantize(qtype: T):
    """``y = d * (level - offset)`` or ``y = d * level + m``, as ggml's ``dequantize_row_*``."""
    size = BLOCK[qtype].itemsize
    affine = qtype in (T.Q4_1, T.Q5_1)
    wide = qtype in (T.Q5_0, T.Q5_1)
    qs_at = size - QK // 2

    def fill(raw: np.ndarray, out: np.ndarray) -> None:
        d = spread(half_column(raw, 0), QK).reshape(out.shape)
        if qtype is T.Q8_0:
            out[...] = byte_field(raw, 2, QK).view(np.int8)
            out *= d
            return
        levels = np.empty(out.shape, np.uint8)
        split_nibbles(byte_field(raw, qs_at, QK // 2)[:, None, :], levels)
        if wide:  # bit j of qh is bit 4 of level j
            high = np.unpackbits(byte_field(raw, qs_at - 4, 4), axis=1, bitorder="little")
            levels.view(np.uint64)[...] |= high.view(np.uint64) << np.uint64(4)
        if affine:
            out[...] = levels
            out *= d
            out += spread(half_column(raw, 2), QK).reshape(out.shape)
        else:
            out[...] = sign_extend(levels, 5 if wide else 4)
            out *= d

    def dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
        return dequantize_chunks(data, size, QK, fill).reshape(-1, n_per_row)

    return dequantize


KERNELS = {
    T.Q4_0: Kernel(_symmetric(T.Q4_0, 8), _dequantize(T.Q4_0), uses_imatrix=True),
    T.Q5_0: Kernel(_symmetric(T.Q5_0, 16), _dequantize(T.Q5_0), uses_imatrix=True),
    T.Q4_1: Kernel(_affine(T.Q4_1, 16), _dequantize(T.Q4_1), uses_imatrix=True),
    T.Q5_1: Kernel(_affine(T.Q5_1, 32), _dequantize(T.Q5_1), uses_imatrix=True),
    T.Q8_0: Kernel(_q8_0, _dequantize(T.Q8_0)),
}
