"""IQ4_NL and IQ4_XS: 4-bit indices into ggml's non-linear level table ``kvalues_iq4nl``.

Both run ggml's ``quantize_row_iq4_nl_impl`` with ``ntry = 7`` (``ggml_quantize_chunk`` calls
``quantize_iq4_nl``/``quantize_iq4_xs`` with or without weights): IQ4_NL on 32-element blocks, IQ4_XS
on 256-element super-blocks of eight 32-element sub-blocks whose scales get a 6-bit code.

Sub-blocks are laid out as ``(32, n_sub)`` float32 arrays (see :mod:`._common`), so each of the 16
candidate scales is a few whole-array passes. ``best_index_int8``'s binary search becomes a table
lookup: the midpoints between neighbouring levels all lie on multiples of 0.5, and near each of them
ggml's comparison ``x - v[k] < v[k+1] - x`` is exact, so the chosen level is a function of
``floor(2*x)`` alone (checked exhaustively around every midpoint).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import Kernel
from ._common import (
    F32, byte_field, dequantize_chunks, dot_columns, first_max_abs, half_column, nearest_int, replay_search, scratch, spread,
    seq_sum, split_nibbles,
)
from .blocks import BLOCK, QK_K, as_bytes

__all__ = ["KERNELS", "KVALUES_IQ4NL", "best_index"]

GROUP_MAX_EPS = F32(1e-15)
SUB = 32  # elements per (sub-)block
NTRY = 7

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_VALUES = KVALUES_IQ4NL.astype(F32)

# Level of every cell [c/2, (c+1)/2) of the line, ties going up as in best_index_int8, stored at
# index c + _SPAN. The scale search only meets |x| <= 134 (its inverse scales are at most 134/max|x|),
# so the table spans floor(2*x) in [-_SPAN, _SPAN); other lookups clamp into it first.
_SPAN = 272
_TWICE_MIDPOINTS = KVALUES_IQ4NL[:-1].astype(np.int32) + KVALUES_IQ4NL[1:]
_LEVEL_OF_CELL = np.searchsorted(_TWICE_MIDPOINTS, np.arange(-_SPAN, _SPAN), side="right").astype(np.uint8)
_VALUE_OF_CELL = _VALUES[_LEVEL_OF_CELL]
_CELL_LO, _CELL_HI = F32(-_SPAN), F32(_SPAN - 1)


def _cells(twice: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``floor(twice) + _SPAN`` as int32 table indices (``twice`` within the table's span)."""
    np.floor(twice, out=out, casting="unsafe")
    out += _SPAN
    return out


def best_index(x: np.ndarray) -> np.ndarray:
    """``best_index_int8(16, kvalues_iq4nl, x)`` elementwise, for any float32 ``x`` (NaN → 15, as in C)."""
    twice = scratch("iq4.bi", x.shape)
    with np.errstate(over="ignore"):
        np.multiply(x, F32(2.0), out=twice)
    np.fmin(twice, _CELL_HI, out=twice)  # fmin sends NaN to the top cell, where the C search ends
    np.fmax(twice, _CELL_LO, out=twice)
    return _LEVEL_OF_CELL[_cells(twice, scratch("iq4.cell", x.shape, np.int32))]


def _fit_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per sub-block scale of ``quantize_row_iq4_nl_impl`` for ``x``, ``w`` (32, n_sub); 0 for all-zero blocks."""
    nb = x.shape[1]
    amax, mx = first_max_abs(x)
    twice = scratch("iq4.twice", x.shape)
    cell = scratch("iq4.cells", x.shape, np.int32)
    q = scratch("iq4.q", x.shape)
    wq = scratch("iq4.wq", x.shape)
    # candidate 0 is -max/values[0], 1..15 ggml's itry = -7..7
    shape = (2 * NTRY + 2, nb)
    inv, sumqx, sumq2 = (scratch(f"iq4.{name}", shape, offset=2048) for name in ("inv", "sx", "s2"))
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(F32(1.0), -mx / _VALUES[0], out=inv[0])
        for k, itry in enumerate(range(-NTRY, NTRY + 1), 1):
            np.divide(F32(itry + int(KVALUES_IQ4NL[0])), mx, out=inv[k])
        inv *= F32(2.0)  # 2*(id*x) is exactly (2*id)*x, and no cell boundary lies where it could differ
        for k in range(shape[0]):
            np.multiply(inv[k], x, out=twice)
            np.take(_VALUE_OF_CELL, _cells(twice, cell), out=q, mode="clip")
            np.multiply(w, q, out=wq)  # C's w*q*x groups as (w*q)*x
            dot_columns(wq, x, out=sumqx[k])
            dot_columns(wq, q, out=sumq2[k])
    _, scale = replay_search(sumqx, sumq2, sumq2[0] > 0, "iq4")
    scale[~(amax >= GROUP_MAX_EPS)] = 0
    return scale


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1/d : 0``."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1.0) / d, F32(0.0))


def _weights(xs: np.ndarray, imatrix: Optional[np.ndarray], rows: int, super_block: int) -> np.ndarray:
    """``qw * sqrtf(sigma2 + x*x)`` with ``sigma2 = 2/super_block * sum(x*x)`` over the super-block, or ``x*x``."""
    sq = scratch("iq4.w", xs.shape)
    np.multiply(xs, xs, out=sq)
    if imatrix is None:
        return sq
    per = super_block // SUB
    nb = xs.shape[1] // per
    # the super-block's squares in element order: (element, sub-block) → (sub-block within, element, block)
    by_block = scratch("iq4.by_block", (per, SUB, nb))
    np.copyto(by_block, sq.reshape(SUB, nb, per).transpose(2, 0, 1))
    sigma2 = seq_sum(by_block.reshape(super_block, nb)) * F32(2.0 / super_block)
    sq += np.repeat(sigma2, per)
    np.sqrt(sq, out=sq)
    per_row = imatrix.size // SUB
    qw = scratch("iq4.qw", (SUB, rows, per_row))
    np.copyto(qw, imatrix.reshape(per_row, SUB).T[:, None, :])
    sq *= qw.reshape(xs.shape)
    return sq


def _sub_blocks(x: np.ndarray) -> np.ndarray:
    """Rows ``(rows, n)`` → ``(32, n_sub)``: column ``s`` is sub-block ``s`` in memory order."""
    xs = scratch("iq4.x", (SUB, x.size // SUB))
    np.copyto(xs, x.reshape(-1, SUB).T)
    return xs


def _scaled_rows(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """``inv[s] * x`` for every element of sub-block ``s``, in the rows' own (sub-block, element) order."""
    rows = x.reshape(-1, SUB)
    out = scratch("iq4.rows", rows.shape)
    np.multiply(inv[:, None], rows, out=out)
    return out


def _pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """``(n_sub, 32)`` levels → ``(n_sub, 16)`` bytes: element j low nibble, element j+16 high nibble."""
    return levels[:, :16] | (levels[:, 16:] << 4)


def _quantize_iq4_nl(x: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
    rows = x.shape[0]
    xs = _sub_blocks(x)
    scale = _fit_scales(xs, _weights(xs, imatrix, rows, SUB))
    blocks = np.empty(xs.shape[1], BLOCK[T.IQ4_NL])
    blocks["d"] = scale.astype(np.float16)
    blocks["qs"] = _pack_nibbles(best_index(_scaled_rows(x, _safe_inverse(scale))))
    return as_bytes(blocks, rows)


def _quantize_iq4_xs(x: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
    rows = x.shape[0]
    xs = _sub_blocks(x)
    per = QK_K // SUB
    nb = xs.shape[1] // per
    scales = _fit_scales(xs, _weights(xs, imatrix, rows, QK_K)).reshape(nb, per)
    _, max_scale = first_max_abs(np.ascontiguousarray(scales.T))
    d = -max_scale / F32(32.0)
    ls = np.clip(nearest_int(_safe_inverse(d)[:, None] * scales), F32(-32), F32(31))
    levels = best_index(_scaled_rows(x, _safe_inverse(d[:, None] * ls).reshape(-1)))
    code = (ls + F32(32)).astype(np.uint16)

    blocks = np.empty(nb, BLOCK[T.IQ4_XS])
    blocks["d"] = d.astype(np.float16)
    blocks["scales_h"] = np.bitwise_or.reduce((code >> 4) << np.arange(0, 2 * per, 2, dtype=np.uint16), axis=1)
    low = (code & 0xF).astype(np.uint8)
    blocks["scales_l"] = low[:, 0::2] | (low[:, 1::2] << 4)
    blocks["qs"] = _pack_nibbles(levels).reshape(nb, QK_K // 2)
    return as_bytes(blocks, rows)


def _values(qs: np.ndarray, groups: int) -> np.ndarray:
    """``(c, groups * 16)`` packed nibbles → ``(c, groups, 32)`` level values as float32 (element j
    of a 32-element sub-block in the low nibble of byte j, element j + 16 in its high nibble)."""
    c = qs.shape[0]
    levels = np.empty((c, groups, 2, 16), np.uint8)
    split_nibbles(qs.reshape(c, groups, 16), levels)
    # take wants intp indices: widen into a reused buffer (a fresh one per chunk costs page faults)
    index = scratch("iq4.index", (c, groups, SUB), np.intp)
    index[...] = levels.reshape(c, groups, SUB)
    return _VALUES.take(index, out=scratch("iq4.values", (c, groups, SUB)))


def _dequantize_iq4_nl(data: np.ndarray, n_per_row: int) -> np.ndarray:
    def fill(raw: np.ndarray, out: np.ndarray) -> None:
        np.multiply(spread(half_column(raw, 0), SUB).reshape(out.shape), _values(byte_field(raw, 2, 16), 1)[:, 0], out=out)

    return dequantize_chunks(data, 18, SUB, fill).reshape(-1, n_per_row)


def _dequantize_iq4_xs(data: np.ndarray, n_per_row: int) -> np.ndarray:
    per = QK_K // SUB

    def fill(raw: np.ndarray, out: np.ndarray) -> None:
        c = raw.shape[0]
        low = byte_field(raw, 4, 4)
        low = np.stack([low & 0xF, low >> 4], axis=2).reshape(c, per)
        high = (raw.view(np.uint16)[:, 1:2] >> np.arange(0, 2 * per, 2, dtype=np.uint16)) & 3
        dl = half_column(raw, 0) * ((low | (high << 4).astype(np.uint8)).astype(F32) - F32(32))
        np.multiply(spread(dl, SUB), _values(byte_field(raw, 8, 128), per), out=out.reshape(c, per, SUB))

    return dequantize_chunks(data, 136, QK_K, fill).reshape(-1, n_per_row)


KERNELS: dict[T, Kernel] = {
    T.IQ4_NL: Kernel(_quantize_iq4_nl, _dequantize_iq4_nl, uses_imatrix=True),
    T.IQ4_XS: Kernel(_quantize_iq4_xs, _dequantize_iq4_xs, uses_imatrix=True),
}
