"""The "scale + min" K-quants (Q2_K, Q4_K, Q5_K) of ggml, byte for byte, in vectorized numpy.

Each super-block of 256 values is cut into sub-blocks of 16 (Q2_K) or 32 (Q4_K, Q5_K) that are fitted
as ``x ≈ scale * L + min``. ggml fits one sub-block at a time; here a chunk's sub-blocks are laid out
as columns of an ``(elements, sub_blocks)`` float32 array, so every step of ggml's per-sub-block search
is one numpy operation over all sub-blocks, and each C summation loop is an ``np.add.reduce`` over
axis 0, which adds rows in order in float32 exactly like the C loop (given two or more columns: see
``seq_sum``). Expressions keep C's evaluation order, and ``nearest_int`` is C's rounding trick
wherever its argument is not provably within ``np.rint``'s agreement range.

The candidate scales of the search (``make_qkx2_quants``/``make_qkx3_quants``) cannot be evaluated
side by side: a winning candidate moves the offset the next candidates are computed from. They are
evaluated in turn, each across all sub-blocks; only the per-sub-block winner's parameters are kept,
and its levels are recomputed once at the end.

Without an importance matrix ggml runs ``quantize_row_qX_K_ref`` (``make_qkx2_quants`` and a linear
6-bit or 4-bit quantization of the sub-block scales); with one it runs ``quantize_row_qX_K_impl``
(``make_qkx3_quants`` and ``make_qp_quants`` for the sub-block scales). The search functions are public
because the legacy types' importance-matrix paths reuse them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import Kernel
from ._common import F32, bit_fields, byte_field, dequantize_chunks, half_column, nearest_int_bits, seq_sum, split_nibbles, spread
from .blocks import BLOCK, QK_K, as_bytes

__all__ = ["KERNELS", "make_qkx2_quants", "make_qkx3_quants", "make_qp_quants"]

_SAFE_ROUND = F32(4194303.0)  # |v| up to this, the mantissa trick equals np.rint
_GROUP_MAX_EPS = F32(1e-15)


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``GGML_FP32_TO_FP16(v)`` and its value back in float32 (overflow gives inf, silently, as in C)."""
    with np.errstate(over="ignore"):
        half = np.asarray(v, F32).astype(np.float16)
    return half, half.astype(F32)


def _seeded_sum(v: np.ndarray) -> np.ndarray:
    """``float s = v[0]; for (i = 1...) s += v[i];`` over axis 0.

    ``np.add.reduce`` starts from ``+0.0``, which differs from starting at ``v[0]`` only for a column
    of nothing but ``-0.0`` (C keeps ``-0.0``). The sign shows in the legacy types' fp16 min.
    """
    total = np.add.reduce(v, axis=0)
    zero = np.flatnonzero(total == 0)
    if zero.size:
        part = v[:, zero]
        negative = np.logical_and.reduce((part == 0) & np.signbit(part), axis=0)
        total[zero[negative]] = F32(-0.0)
    return total


def _running_min(x: np.ndarray, xmin: np.ndarray) -> np.ndarray:
    """``min = x[0]; for (i) if (x[i] < min) min = x[i]; if (min > 0) min = 0;`` over axis 0.

    ``xmin`` is ``x.min(axis=0)``. A zero minimum keeps the sign of the column's first zero (np.min
    may pick either); the sign shows in the legacy types' fp16 min.
    """
    m = np.minimum(xmin, F32(0.0))
    zero = np.flatnonzero(xmin == 0)
    if zero.size:
        part = x[:, zero]
        first = part[np.argmax(part == 0, axis=0), np.arange(zero.size)]
        m[zero] = np.where(np.signbit(first), F32(-0.0), F32(0.0))
    return m


# Most columns searched together. The search's numpy calls carry a fixed cost each, so bigger groups
# are faster until the working arrays fall out of cache: measured best around 128k-256k elements.
_GROUP_ELEMENTS = 1 << 18

# rows of the per-candidate record _AffineSearch keeps; the first three are the running best's too
_ERR, _STEP, _MIN, _SCALE, _ISCALE, _FROM = range(6)


class _AffineSearch:
    """``make_qkx2_quants``/``make_qkx3_quants`` over the columns of ``x`` (one sub-block per column).

    Every candidate's error, fitted min and scale, and the iscale and min its levels came from are
    written to a record; the loop itself only carries each column's best error, current min and
    winning step, and the winner's record is looked up once at the end. Per-column vectors are
    stacked wherever one numpy call can serve several of them: on these short vectors the per-call
    overhead, not the arithmetic, is what costs.
    """

    def __init__(self, x: np.ndarray, w: np.ndarray, nmax: int, use_mad: bool):
        self.x, self.w, self.nmax, self.use_mad = x, w, F32(nmax), use_mad
        self.extremes = np.stack((x.min(axis=0), x.max(axis=0)))
        self.levels = np.empty_like(x)
        self.tmp = np.empty_like(x)
        self.ends = np.empty_like(self.extremes)

    def quantize_levels(self, iscale: np.ndarray, m: np.ndarray) -> np.ndarray:
        """``L = clamp(nearest_int(iscale * (x - m)), 0, nmax)``.

        The argument is monotone in ``x`` within a column, so each column's extremes bound it before
        the full array is touched: they tell whether ``np.rint`` is exact (C's rounding trick is not
        ``rint`` beyond 2**22 or on inf/NaN) and whether a clamp can change anything. (Clamping only
        the columns that need it loses to clamping all once more than ~1% of them do.)
        """
        x, nmax, ends, out = self.x, self.nmax, self.ends, self.levels
        np.subtract(self.extremes, m, out=ends)
        ends *= iscale
        lo, hi = ends.min(), ends.max()
        np.subtract(x, m, out=out)
        out *= iscale
        if not (-_SAFE_ROUND <= lo and hi <= _SAFE_ROUND):
            out[...] = np.clip(nearest_int_bits(out), 0, int(nmax))
        else:
            np.rint(out, out=out)
            if lo < -0.5 or hi >= nmax + F32(0.5):
                out.clip(F32(0.0), nmax, out=out)
        return out

    def error(self, scale: np.ndarray, m: np.ndarray, levels: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``sum_i w * f(scale*L + m - x)``, f = |.| or square.

        ``einsum`` multiplies its operands left to right, rounding each product, and adds the rows
        of each column in order: ``(d*d)*w`` is C's ``w * (diff*diff)`` (a product commutes), so
        the square, the weighting and the sum are one pass.
        """
        d = np.multiply(levels, scale, out=self.tmp)
        d += m
        d -= self.x
        if self.use_mad:
            np.abs(d, out=d)
            return np.einsum("ij,ij->j", self.w, d, out=out)
        return np.einsum("ij,ij,ij->j", d, d, self.w, out=out)

    def run(
        self, rmin: float, rdelta: float, nstep: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, w, nmax = self.x, self.w, self.nmax
        nb = x.shape[1]
        xmin, xmax = self.extremes
        steps = nstep + 1 if nstep >= 1 else 0
        record = np.empty((steps + 1, 6, nb), F32)
        record[:, _STEP] = np.arange(steps + 1, dtype=F32)[:, None]
        # sums[:3] = sum_l2, sum_l, sum_xl are refilled per candidate; sums[3] = sum_x is fixed
        sums = np.empty((4, nb), F32)
        sum_w = _seeded_sum(w)
        sums[3] = _seeded_sum(np.multiply(w, x, out=self.tmp))
        w_and_x = sums[[3, 3]]
        w_and_x[0] = sum_w
        # rows: det, numerator of this_min, numerator of this_scale
        terms = np.empty((3, nb), F32)
        squares = np.empty((3, nb), F32)
        with np.errstate(all="ignore"):
            first = record[0]
            m = first[_MIN]
            m[...] = _running_min(x, xmin)
            flat = xmax <= m  # constant column: C returns before searching
            # an infinite width makes a flat column's iscale exactly 0, hence its levels 0
            top = np.where(flat, F32(np.inf), xmax)
            np.divide(nmax, top - m, out=first[_ISCALE])
            np.divide(F32(1.0), first[_ISCALE], out=first[_SCALE])
            first[_FROM] = m
            self.error(first[_SCALE], m, self.quantize_levels(first[_ISCALE], m), out=first[_ERR])
            # a flat column never takes a candidate; neither does a NaN error, which no '<' beats
            first[_ERR, flat | np.isnan(first[_ERR])] = -np.inf
            best = first[:_SCALE].copy()  # error, step, min
            for k in range(1, steps + 1):
                cand = record[k]
                m = best[2]
                np.copyto(cand[_FROM], m)
                np.divide(F32(rmin) + F32(rdelta) * F32(k - 1) + nmax, top - m, out=cand[_ISCALE])
                levels = self.quantize_levels(cand[_ISCALE], m)
                # C's w*l, w*l*l and w*l*x[i], each column's terms added in order from 0.0f
                np.einsum("ij,ij,ij->j", w, levels, levels, out=sums[0])
                np.einsum("ij,ij->j", w, levels, out=sums[1])
                np.einsum("ij,ij,ij->j", w, levels, x, out=sums[2])
                np.multiply(w_and_x, sums[0], out=terms[:2])
                np.multiply(sum_w, sums[2], out=terms[2])
                terms -= np.multiply(sums[1:], sums[1], out=squares)
                np.divide(terms[1:], terms[0], out=cand[_MIN : _SCALE + 1])
                positive = cand[_MIN] > 0
                if positive.any():
                    cand[_MIN, positive] = 0
                    cand[_SCALE, positive] = (sums[2] / sums[0])[positive]
                self.error(cand[_SCALE], cand[_MIN], levels, out=cand[_ERR])
                won = cand[_ERR] < best[0]
                won &= terms[0] > 0
                if won.any():
                    best = np.where(won, cand[:_SCALE], best)
            final = record[best[1].astype(np.intp), :, np.arange(nb)].T
            final[_SCALE, flat] = 0
            levels = self.quantize_levels(final[_ISCALE], final[_FROM])
        return final[_SCALE], -final[_MIN], levels


def _search(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the search over at most ``_GROUP_ELEMENTS`` elements' worth of columns at a time."""
    n, nb = x.shape
    if nb == 1:  # see seq_sum: a second, identical column keeps every reduction sequential
        scale, the_min, levels = _search(
            np.repeat(x, 2, axis=1), np.repeat(w, 2, axis=1), nmax, rmin, rdelta, nstep, use_mad
        )
        return scale[:1], the_min[:1], levels[:, :1]
    group = max(2, _GROUP_ELEMENTS // n)
    if nb <= group:
        return _AffineSearch(x, w, nmax, use_mad).run(rmin, rdelta, nstep)
    scale = np.empty(nb, F32)
    the_min = np.empty(nb, F32)
    levels = np.empty((n, nb), F32)
    for a in range(0, nb, group):
        b = min(a + group, nb)
        part = _AffineSearch(
            np.ascontiguousarray(x[:, a:b]), np.ascontiguousarray(w[:, a:b]), nmax, use_mad
        ).run(rmin, rdelta, nstep)
        scale[a:b], the_min[a:b], levels[:, a:b] = part
    return scale, the_min, levels


def make_qkx2_quants(
    x: np.ndarray,
    nmax: int,
    weights: np.ndarray,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` on every column of float32 ``x`` ``[n, n_blocks]``.

    Returns ``(scale[n_blocks], the_min[n_blocks], L[n, n_blocks])`` with ``x ≈ scale*L - the_min``;
    ``L`` is float32 holding the integer levels ``0..nmax``.
    """
    return _search(x, weights, nmax, rmin, rdelta, nstep, use_mad)


def make_qkx3_quants(
    x: np.ndarray,
    nmax: int,
    weights: Optional[np.ndarray],
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx3_quants``: as :func:`make_qkx2_quants`, weights ``None`` meaning ``x*x``.

    (The two C functions differ only in their ``max == min`` versus ``max <= min`` test, which agree
    for non-NaN input since ``min <= max``.)
    """
    w = x * x if weights is None else weights
    return _search(x, w, nmax, rmin, rdelta, nstep, use_mad)


_QP_STEPS = np.array([-4, -3, -2, -1, 1, 2, 3, 4], dtype=F32)


def make_qp_quants(x: np.ndarray, nmax: int, quant_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qp_quants`` (levels from 0, no offset) on every column of ``x`` ``[n, n_blocks]``.

    Returns ``(scale[n_blocks], L[n, n_blocks])``; ``L`` is float32 holding what C stores in its
    ``uint8_t`` array (so a negative level shows up wrapped, as 256 + level).
    """
    n, nb = x.shape
    if nb == 1:  # see seq_sum
        twice = np.repeat(x, 2, axis=1), np.repeat(quant_weights, 2, axis=1)
        scale, levels = make_qp_quants(twice[0], nmax, twice[1])
        return scale[:1], levels[:, :1]
    w = quant_weights
    nmax_f = F32(nmax)
    with np.errstate(all="ignore"):
        peak = np.maximum(x.max(axis=0), F32(0.0))
        empty = peak < _GROUP_MAX_EPS
        peak[empty] = 1  # any finite value: these columns are zeroed at the end
        # the first guess and the eight trial scales do not depend on each other: all at once
        iscales = np.empty((9, nb), F32)
        np.divide(nmax_f, peak, out=iscales[0])
        np.divide((F32(0.1) * _QP_STEPS + nmax_f)[:, None], peak, out=iscales[1:])
        trial = nearest_int_bits(iscales[:, None, :] * x)
        trial[0] &= 0xFF  # the first guess goes through C's uint8_t unclamped
        np.minimum(trial[1:], nmax, out=trial[1:])
        diff = x - (F32(1.0) / iscales)[:, None, :] * trial.astype(F32)
        mse = np.add.reduce((w * diff) * diff, axis=1)
        # C keeps the first strictly smaller mse: argmin's first minimum, once NaNs (which never
        # win, and which nothing beats once they are the running best) are mapped to -inf/+inf
        nan = np.isnan(mse)
        mse[0, nan[0]] = -np.inf
        mse[1:][nan[1:]] = np.inf
        iscale = iscales[np.argmin(mse, axis=0), np.arange(nb)]
        ints = np.minimum(nearest_int_bits(iscale * x), nmax)
        lev = ints.astype(F32)
        levels = (ints & 0xFF).astype(F32)
        wx = w * x
        sumlx = seq_sum(wx * lev)
        suml2 = seq_sum((w * lev) * lev)
        _refine_levels(x, w, wx, levels, sumlx, suml2, nmax)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    scale[empty] = 0
    levels[:, empty] = 0
    return scale, levels


def _refine_levels(
    x: np.ndarray,
    w: np.ndarray,
    wx: np.ndarray,
    levels: np.ndarray,
    sumlx: np.ndarray,
    suml2: np.ndarray,
    nmax: int,
) -> None:
    """``make_qp_quants``' final passes, updating ``levels``, ``sumlx`` and ``suml2`` in place.

    C visits the elements of a column one by one, and a level it accepts changes the sums the next
    elements see. Changes are rare, so every element's proposal is computed at once from the current
    sums; up to each column's first accepted change those are exactly what C computes. That change is
    applied, and the column resumes after it in the next round. A pass ends when no column accepts
    anything further; as in C, up to five passes run, and a column that changed nothing in a pass is
    at a fixed point (more passes leave it alone).
    """
    n, nb = x.shape
    row = np.arange(n)[:, None]
    for _ in range(5):
        start = np.zeros(nb, np.intp)  # per column, the first element not yet visited in this pass
        changed = False
        while True:
            slx = sumlx - wx * levels
            sl2 = suml2 - (w * levels) * levels
            new_int = np.minimum(nearest_int_bits((x * sl2) / slx), nmax)
            new = new_int.astype(F32)
            slx_new = slx + wx * new
            sl2_new = sl2 + (w * new) * new
            take = np.minimum(slx, sl2) > 0  # both > 0 (NaN fails either way)
            take &= new != levels
            take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
            take &= row >= start
            cols = np.flatnonzero(take.any(axis=0))
            if cols.size == 0:
                break
            i = np.argmax(take[:, cols], axis=0)
            levels[i, cols] = new_int[i, cols] & 0xFF
            sumlx[cols] = slx_new[i, cols]
            suml2[cols] = sl2_new[i, cols]
            start[:] = n
            start[cols] = i + 1
            changed = True
        if not changed:
            break


def _positive_max(v: np.ndarray) -> np.ndarray:
    """``best = 0; for (j) if (v[j] > best) best = v[j];`` along axis 1 (+0.0 unless some v > 0)."""
    top = v.max(axis=1)
    return np.where(top > 0, top, F32(0.0))


def _sub_blocks(x: np.ndarray, size: int) -> np.ndarray:
    """Rows of ``x`` cut into sub-blocks of ``size``: one sub-block per column, C-contiguous."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _imatrix_weights(
    x: np.ndarray, xs: np.ndarray, imatrix: np.ndarray, size: int, sigma_scale: float
) -> np.ndarray:
    """``qw * sqrtf(sigma2 + x*x)`` in the sub-block layout, sigma2 being per super-block."""
    rows = x.shape[0]
    blocks = x.reshape(-1, QK_K)
    sum_x2 = seq_sum(np.ascontiguousarray((blocks * blocks).T))
    sigma2 = (F32(sigma_scale) * sum_x2 if sigma_scale != 1 else sum_x2) / F32(QK_K)
    qw = np.tile(imatrix.reshape(-1, size).T, (1, rows))
    return qw * np.sqrt(np.repeat(sigma2, QK_K // size) + xs * xs)


def _requantize(
    x: np.ndarray, d: np.ndarray, dm: np.ndarray, nmax: int, searched: np.ndarray
) -> np.ndarray:
    """``L = clamp(nearest_int((x + dm)/d), 0, nmax)`` per sub-block; where ``d == 0`` C skips the
    sub-block and keeps the search's levels.

    ``x`` is ``[n_blocks, sub_blocks, size]``, ``d``/``dm`` are ``[n_blocks, sub_blocks]`` and
    ``searched`` is the search's ``(size, all sub-blocks)`` float32 levels. Returns uint8 levels
    shaped like ``x``.
    """
    size = x.shape[-1]
    with np.errstate(all="ignore"):
        q = (x + spread(dm, size)) / spread(d, size)
    levels = np.clip(nearest_int_bits(q), 0, nmax).astype(np.uint8)
    skipped = d == 0
    if skipped.any():
        levels[skipped] = searched.T.reshape(x.shape)[skipped].astype(np.uint8)
    return levels


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 ``scales`` bytes from 8 scales and 8 mins (int arrays ``[n_blocks, 8]``)."""
    out = np.empty((ls.shape[0], 12), np.int32)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (out & 0xFF).astype(np.uint8)


def unpack_scales_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7: the 6-bit scales and mins as float32 ``[n_blocks, 8]``.

    Four scales at a time, as the bytes of a uint32: ``(b >> 6) << 4`` of every byte is ``(w >> 2) & 0x30..``.
    """
    words = np.ascontiguousarray(packed, dtype=np.uint8).view(np.uint32)  # (n, 3)
    low6, low4, top2 = np.uint32(0x3F3F3F3F), np.uint32(0x0F0F0F0F), np.uint32(0x30303030)
    two, four = np.uint32(2), np.uint32(4)
    out = np.empty((words.shape[0], 4), np.uint32)  # scales 0-3, 4-7, mins 0-3, 4-7
    out[:, 0] = words[:, 0] & low6
    out[:, 1] = (words[:, 2] & low4) | ((words[:, 0] >> two) & top2)
    out[:, 2] = words[:, 1] & low6
    out[:, 3] = ((words[:, 2] >> four) & low4) | ((words[:, 1] >> two) & top2)
    values = out.view(np.uint8).astype(F32)
    return values[:, :8], values[:, 8:]


def _scale_quants(
    scales: np.ndarray, sw: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``make_qp_quants`` of the sub-block scales and of the mins (``[n_blocks, sub_blocks]`` each).

    Both go through one call, side by side, to halve the per-call overhead of its sequential loops.
    Returns ``(d_scale, d_min, Ls, Lm)`` with the levels as int32 ``[n_blocks, sub_blocks]``.
    """
    nb = scales.shape[0] // 2
    d, levels = make_qp_quants(np.ascontiguousarray(scales.T), nmax, np.ascontiguousarray(sw.T))
    levels = levels.T.astype(np.int32)
    return d[:nb], d[nb:], levels[:nb], levels[nb:]


def _quantize_q2_k(x: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
    rows = x.shape[0]
    nb = x.size // QK_K
    xs = _sub_blocks(x, 16)
    if imatrix is None:
        scales, mins, searched = make_qkx2_quants(xs, 3, np.abs(xs), -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(15.0) / max_scale, F32(0.0))
            inv_min = np.where(max_min > 0, F32(15.0) / max_min, F32(0.0))
        ls = nearest_int_bits(inv_scale[:, None] * scales)
        lm = nearest_int_bits(inv_min[:, None] * mins)
        d16, d = _fp16(max_scale / F32(15.0))
        dmin16, dmin = _fp16(max_min / F32(15.0))
    else:
        weights = _imatrix_weights(x, xs, imatrix, 16, 1.0)
        sw = seq_sum(weights).reshape(nb, 16)
        scales, mins, searched = make_qkx3_quants(xs, 3, weights, -0.9, 0.05, 36, False)
        d_scale, d_min, ls, lm = _scale_quants(
            np.concatenate((scales.reshape(nb, 16), mins.reshape(nb, 16))), np.concatenate((sw, sw)), 15
        )
        d16, d = _fp16(d_scale)
        dmin16, dmin = _fp16(d_min)
    packed = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)
    levels = _requantize(
        x.reshape(nb, 16, 16),
        d[:, None] * (packed & 0xF).astype(F32),
        dmin[:, None] * (packed >> 4).astype(F32),
        3,
        searched,
    ).reshape(nb, 2, 4, 32)
    blocks = np.empty(nb, BLOCK[T.Q2_K])
    blocks["scales"] = packed
    blocks["qs"] = (
        levels[:, :, 0] | (levels[:, :, 1] << 2) | (levels[:, :, 2] << 4) | (levels[:, :, 3] << 6)
    ).reshape(nb, 64)
    blocks["d"] = d16
    blocks["dmin"] = dmin16
    return as_bytes(blocks, rows)


def _quantize_k32(x: np.ndarray, imatrix: Optional[np.ndarray], nmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K (nmax 15) and Q5_K (nmax 31) up to their level packing.

    Returns ``(d16, dmin16, packed_scales, levels)``, levels uint8 ``[n_blocks, 256]``.
    """
    nb = x.size // QK_K
    xs = _sub_blocks(x, 32)
    if imatrix is None:
        av_x = np.sqrt(seq_sum(xs * xs) / F32(32.0))
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, searched = make_qkx2_quants(xs, nmax, av_x + np.abs(xs), rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63.0) / max_scale, F32(0.0))
            inv_min = np.where(max_min > 0, F32(63.0) / max_min, F32(0.0))
        # C stores nearest_int in a uint8_t before clamping to 63
        ls = np.minimum(nearest_int_bits(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = np.minimum(nearest_int_bits(inv_min[:, None] * mins) & 0xFF, 63)
        d16, d = _fp16(max_scale / F32(63.0))
        dmin16, dmin = _fp16(max_min / F32(63.0))
    else:
        weights = _imatrix_weights(x, xs, imatrix, 32, 2.0)
        sw = seq_sum(weights).reshape(nb, 8)
        scales, mins, searched = make_qkx3_quants(xs, nmax, weights, -0.9, 0.05, 36, False)
        d_scale, d_min, ls, lm = _scale_quants(
            np.concatenate((scales.reshape(nb, 8), mins.reshape(nb, 8))), np.concatenate((sw, sw)), 63
        )
        if nmax == 31:  # only Q5_K's impl clamps the levels again
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        d16, d = _fp16(d_scale)
        dmin16, dmin = _fp16(d_min)
    packed = _pack_scales_k4(ls, lm)
    sc, m = unpack_scales_k4(packed)
    levels = _requantize(x.reshape(nb, 8, 32), d[:, None] * sc, dmin[:, None] * m, nmax, searched)
    return d16, dmin16, packed, levels.reshape(nb, QK_K)


def _quantize_q4_k(x: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
    d16, dmin16, packed, levels = _quantize_k32(x, imatrix, 15)
    pairs = levels.reshape(-1, 4, 2, 32)
    blocks = np.empty(levels.shape[0], BLOCK[T.Q4_K])
    blocks["d"] = d16
    blocks["dmin"] = dmin16
    blocks["scales"] = packed
    blocks["qs"] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return as_bytes(blocks, x.shape[0])


def _quantize_q5_k(x: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
    d16, dmin16, packed, levels = _quantize_k32(x, imatrix, 31)
    nb = levels.shape[0]
    high = (levels >> 4).reshape(nb, 8, 32)
    low = (levels & 0xF).reshape(nb, 4, 2, 32)
    blocks = np.empty(nb, BLOCK[T.Q5_K])
    blocks["d"] = d16
    blocks["dmin"] = dmin16
    blocks["scales"] = packed
    blocks["qh"] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    blocks["qs"] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    return as_bytes(blocks, x.shape[0])


def _dequantize_q2_k(data: np.ndarray, n_per_row: int) -> np.ndarray:
    def fill(raw: np.ndarray, out: np.ndarray) -> None:
        c = raw.shape[0]
        sc = byte_field(raw, 0, 16)
        dl = half_column(raw, 80) * (sc & 0xF)
        ml = half_column(raw, 82) * (sc >> 4)
        levels = bit_fields(byte_field(raw, 16, 64).reshape(c, 2, 32), 2, 4)  # element 128*h + 32*j + l
        y = out.reshape(c, 16, 16)
        y[...] = levels.reshape(c, 16, 16)
        y *= spread(dl, 16)
        y -= spread(ml, 16)

    return dequantize_chunks(data, 84, QK_K, fill).reshape(-1, n_per_row)


def _dequantize_k32(data: np.ndarray, n_per_row: int, size: int) -> np.ndarray:
    """``d*sc * q - dmin*m`` per 32-element sub-block for Q4_K (``size`` 144) and Q5_K (176)."""

    def fill(raw: np.ndarray, out: np.ndarray) -> None:
        c = raw.shape[0]
        sc, m = unpack_scales_k4(byte_field(raw, 4, 12))
        d1 = half_column(raw, 0) * sc
        m1 = half_column(raw, 2) * m
        levels = np.empty((c, 8, 32), np.uint8)
        split_nibbles(byte_field(raw, size - 128, 128).reshape(c, 4, 32), levels)
        if size == 176:  # Q5_K: bit s of qh[l] is bit 4 of level l of sub-block s
            high = bit_fields(byte_field(raw, 16, 32).reshape(c, 1, 32), 1, 8)
            levels.view(np.uint64)[...] |= high.view(np.uint64).reshape(c, 8, 4) << np.uint64(4)
        y = out.reshape(c, 8, 32)
        y[...] = levels
        y *= spread(d1, 32)
        y -= spread(m1, 32)

    return dequantize_chunks(data, size, QK_K, fill).reshape(-1, n_per_row)


def k4_levels(qs: np.ndarray) -> np.ndarray:
    """``qs [n_blocks, 128]`` → levels ``[n_blocks, 8, 32]``.

    Each 32 bytes hold two sub-blocks: the low nibbles, then the high nibbles.
    """
    pairs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate((pairs & 0xF, pairs >> 4), axis=2).reshape(-1, 8, 32)


def _dequantize_q4_k(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return _dequantize_k32(data, n_per_row, 144)


def _dequantize_q5_k(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return _dequantize_k32(data, n_per_row, 176)


# the scale search runs ~15 whole-array passes per candidate: bigger chunks amortize numpy's per-call cost
_SEARCH_CHUNK = 1 << 18

KERNELS: dict[T, Kernel] = {
    T.Q2_K: Kernel(_quantize_q2_k, _dequantize_q2_k, uses_imatrix=True, chunk_elements=_SEARCH_CHUNK),
    T.Q4_K: Kernel(_quantize_q4_k, _dequantize_q4_k, uses_imatrix=True, chunk_elements=_SEARCH_CHUNK),
    T.Q5_K: Kernel(_quantize_q5_k, _dequantize_q5_k, uses_imatrix=True, chunk_elements=_SEARCH_CHUNK),
}
