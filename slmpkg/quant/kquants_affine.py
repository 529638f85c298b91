"""The "scale + min" K-quants (Q2_K, Q4_K, Q5_K) of ggml, byte for byte, in vectorized numpy.

Each super-block of 256 values is cut into sub-blocks of 16 (Q2_K) or 32 (Q4_K, Q5_K) that are fitted
as ``x ≈ scale * L + min``. ggml fits one sub-block at a time; here a chunk's sub-blocks are laid out
as columns of an ``(elements, sub_blocks)`` float32 array, so every step of ggml's per-sub-block search
is one numpy operation over all sub-blocks, and each C summation loop is an ``np.add.reduce`` over
axis 0, which adds rows in order in float32 exactly like the C loop.

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
from ._common import F32, row_sigma2
from .blocks import BLOCK, QK_K, as_blocks, as_bytes

__all__ = ["KERNELS", "make_qkx2_quants", "make_qkx3_quants", "make_qp_quants"]

_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round(v) in the low mantissa bits
_SAFE_ROUND = F32(4194303.0)  # |v| up to this, the mantissa trick equals np.rint
_GROUP_MAX_EPS = F32(1e-15)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` on any input, as int32.

    Within ``±_SAFE_ROUND`` this is ``np.rint``; beyond it (or for inf/NaN) C returns whatever the
    mantissa bits hold, and so does this.
    """
    bits = (np.asarray(v, F32) + _MAGIC).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _csum(v: np.ndarray) -> np.ndarray:
    """``float s = 0; for (i) s += v[i];`` over axis 0.

    ``np.add.reduce`` starts from ``v[0]`` rather than ``+0.0``; that differs only when every term is
    ``-0.0``, and adding ``+0.0`` afterwards turns that ``-0.0`` into C's ``+0.0``.
    """
    return np.add.reduce(v, axis=0) + F32(0.0)


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``GGML_FP32_TO_FP16(v)`` and its value read back as float32."""
    half = np.asarray(v, F32).astype(np.float16)
    return half, half.astype(F32)


class _AffineSearch:
    """``make_qkx2_quants``/``make_qkx3_quants`` over the columns of ``x`` (one sub-block per column)."""

    def __init__(self, x: np.ndarray, w: np.ndarray, nmax: int, use_mad: bool):
        self.x, self.w, self.nmax, self.use_mad = x, w, F32(nmax), use_mad
        self.xmin = x.min(axis=0)
        self.xmax = x.max(axis=0)
        self.levels = np.empty_like(x)
        self.tmp = np.empty_like(x)
        self.tmp2 = np.empty_like(x)

    def quantize_levels(self, iscale: np.ndarray, m: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``L = clamp(nearest_int(iscale * (x - m)), 0, nmax)`` into ``out``.

        The argument is monotone in ``x`` per column, so its range is known from each column's extremes
        before touching the full array: that decides whether the cheap ``np.rint`` is exact and which
        clamps can change anything.
        """
        x, nmax = self.x, self.nmax
        ends = np.stack((self.xmin - m, self.xmax - m))
        ends *= iscale
        lo = ends.min(axis=0)
        hi = ends.max(axis=0)
        np.subtract(x, m, out=out)
        out *= iscale
        if np.all((lo >= -_SAFE_ROUND) & (hi <= _SAFE_ROUND)):
            np.rint(out, out=out)
            if np.rint(lo).min() < 0:
                np.maximum(out, 0, out=out)
            if np.rint(hi).max() > nmax:
                np.minimum(out, nmax, out=out)
        else:
            out[...] = np.clip(_nearest_int(out), 0, int(nmax))
        return out

    def error(self, scale: np.ndarray, m: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """``sum_i w * f(scale*L + m - x)``, f = |.| or square."""
        d = np.multiply(levels, scale, out=self.tmp)
        d += m
        d -= self.x
        if self.use_mad:
            np.abs(d, out=d)
        else:
            d *= d
        d *= self.w
        return np.add.reduce(d, axis=0)

    def run(
        self, rmin: float, rdelta: float, nstep: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, w, nmax = self.x, self.w, self.nmax
        with np.errstate(all="ignore"):
            # C seeds these two sums with element 0, not 0.0: np.add.reduce does the same
            sum_w = np.add.reduce(w, axis=0)
            sum_x = np.add.reduce(np.multiply(w, x, out=self.tmp), axis=0)
            m = np.minimum(self.xmin, F32(0.0))
            flat = self.xmax <= m  # constant sub-block: C returns before searching
            width = self.xmax - m
            iscale = np.where(flat, F32(0.0), nmax / width)
            scale = F32(1.0) / iscale
            levels = self.quantize_levels(iscale, m, self.levels)
            best = self.error(scale, m, levels)
            # -inf: a flat sub-block never takes a candidate
            best[flat] = -np.inf
            win_iscale, win_m = iscale, m
            wl, prod = self.tmp, self.tmp2
            for step in range(nstep + 1 if nstep >= 1 else 0):
                iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax) / (self.xmax - m)
                iscale[flat] = 0
                levels = self.quantize_levels(iscale, m, self.levels)
                np.multiply(w, levels, out=wl)
                sum_l = _csum(wl)
                sum_l2 = _csum(np.multiply(wl, levels, out=prod))
                sum_xl = _csum(np.multiply(wl, x, out=prod))
                det = sum_w * sum_l2 - sum_l * sum_l
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
                positive = this_min > 0
                this_min[positive] = 0
                this_scale[positive] = (sum_xl / sum_l2)[positive]
                cur = self.error(this_scale, this_min, levels)
                won = (det > 0) & (cur < best)
                best = np.where(won, cur, best)
                scale = np.where(won, this_scale, scale)
                win_iscale = np.where(won, iscale, win_iscale)
                win_m = np.where(won, m, win_m)
                m = np.where(won, this_min, m)
            scale[flat] = 0
            levels = self.quantize_levels(win_iscale, win_m, self.levels)
        return scale, -m, levels


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
    return _AffineSearch(x, weights, nmax, use_mad).run(rmin, rdelta, nstep)


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
    return _AffineSearch(x, w, nmax, use_mad).run(rmin, rdelta, nstep)


def make_qp_quants(x: np.ndarray, nmax: int, quant_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qp_quants`` (non-negative levels, no offset) on every column of ``x`` ``[n, n_blocks]``.

    Returns ``(scale[n_blocks], L[n, n_blocks])``; ``L`` is float32 holding what C stores in its
    ``uint8_t`` array (so a negative level shows up wrapped, as 256 + level).
    """
    n, nb = x.shape
    w = quant_weights
    nmax_f = F32(nmax)
    with np.errstate(all="ignore"):
        peak = np.maximum(x.max(axis=0), F32(0.0))
        empty = peak < _GROUP_MAX_EPS
        peak[empty] = 1  # any finite value: these columns are zeroed at the end
        iscale = nmax_f / peak
        lev = (_nearest_int(iscale * x) & 0xFF).astype(F32)
        diff = x - (F32(1.0) / iscale) * lev
        best = np.add.reduce((w * diff) * diff, axis=0)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F32(0.1) * F32(step) + nmax_f) / peak
            lev = np.minimum(_nearest_int(iscale_is * x), nmax).astype(F32)
            diff = x - (F32(1.0) / iscale_is) * lev
            mse = np.add.reduce((w * diff) * diff, axis=0)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        ints = np.minimum(_nearest_int(iscale * x), nmax)
        lev = ints.astype(F32)
        levels = (ints & 0xFF).astype(F32)
        wx = w * x
        sumlx = _csum(wx * lev)
        suml2 = _csum((w * lev) * lev)
        for _ in range(5):
            changed = np.zeros(nb, bool)
            for i in range(n):
                old = levels[i]
                slx = sumlx - wx[i] * old
                sl2 = suml2 - (w[i] * old) * old
                new_int = np.minimum(_nearest_int((x[i] * sl2) / slx), nmax)
                new = new_int.astype(F32)
                slx_new = slx + wx[i] * new
                sl2_new = sl2 + (w[i] * new) * new
                take = (
                    (slx > 0)
                    & (sl2 > 0)
                    & (new != old)
                    & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
                )
                levels[i] = np.where(take, (new_int & 0xFF).astype(F32), old)
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
                changed |= take
            if not changed.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    scale[empty] = 0
    levels[:, empty] = 0
    return scale, levels
