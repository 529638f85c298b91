"""Q3_K and Q6_K: symmetric K-quants (16 sub-blocks of 16 per 256-element super-block, no minimum).

Sub-blocks are laid out as ``(16, n_sub)`` float32 arrays (see :mod:`._common`), so the search over
candidate scales in ``make_qx_quants`` is a handful of whole-array passes per candidate, and the
element-by-element refinement of ``make_q3_quants`` is a 16-step loop vectorized across sub-blocks.
Every expression keeps the operand order and float32 rounding of ggml-quants.c.

Paths, as ``ggml_quantize_chunk`` takes them: without an importance matrix Q3_K uses
``make_q3_quants`` (the ``_ref`` quantizer) and Q6_K ``make_qx_quants`` weighted by x²; with one, Q3_K
fits each sub-block and then the 16 scales with ``make_qx_quants`` under ``qw * sqrt(sigma2 + x²)``,
and Q6_K weighs ``make_qx_quants`` by the raw importance.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import Kernel
from ._common import F32, first_argmax_abs, seq_sum
from .blocks import BLOCK, QK_K, as_blocks, as_bytes

__all__ = ["KERNELS", "make_qx_quants"]

GROUP_MAX_EPS = F32(1e-15)
SUB = 16  # elements per sub-block
N_SUB = QK_K // SUB  # sub-blocks per super-block


def _rint_clip(v: np.ndarray, lo: F32, hi: F32) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` in place, kept as float32."""
    np.rint(v, out=v)
    return np.clip(v, lo, hi, out=v)


class _ScaleSearch:
    """One candidate ``iscale`` of ``make_qx_quants``: the weighted sums its rounding gives.

    Holds two ``(n, nb)`` scratch buffers so the 19 candidates reuse the same memory.
    """

    def __init__(self, x: np.ndarray, w: np.ndarray, nmax: int):
        self.x = x
        self.w = w
        self.wx = w * x  # C's ``w*x[i]*l`` groups as ``(w*x[i])*l``
        self.lo = F32(-nmax)
        self.hi = F32(nmax - 1)
        self.l = np.empty_like(x)
        self.t = np.empty_like(x)

    def levels(self, iscale: np.ndarray) -> np.ndarray:
        np.multiply(iscale, self.x, out=self.l)
        return _rint_clip(self.l, self.lo, self.hi)

    def sums(self, iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        l = self.levels(iscale)
        np.multiply(self.wx, l, out=self.t)
        sumlx = seq_sum(self.t)
        np.multiply(self.w, l, out=self.t)
        self.t *= l
        return sumlx, seq_sum(self.t)


def make_qx_quants(
    x: np.ndarray, nmax: int, rmse_type: int, qw: Optional[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants`` for ``n`` elements of each of ``nb`` blocks at once.

    Args:
        x: float32 ``(n, nb)``, C-contiguous: element ``i`` of block ``b`` at ``x[i, b]``.
        nmax: levels are ``-nmax .. nmax-1``.
        rmse_type: only 1 (the weighted search every ggml caller uses) is supported.
        qw: float32 ``(n, nb)`` weights, or None for C's ``qw == NULL`` (weights ``x*x``).

    Returns:
        ``(scale, L)``: float32 ``(nb,)`` and uint8 ``(n, nb)`` holding ``nmax + l`` as the C writes
        into ``L`` (all zero for a block whose ``max |x|`` is below ``GROUP_MAX_EPS``).
    """
    if rmse_type != 1:
        raise ValueError(f"make_qx_quants: rmse_type {rmse_type} is not implemented (ggml uses 1)")
    x = np.ascontiguousarray(x, dtype=F32)
    amax, mx = first_argmax_abs(x)
    live = amax >= GROUP_MAX_EPS
    search = _ScaleSearch(x, x * x if qw is None else np.ascontiguousarray(qw, dtype=F32), nmax)
    nm = F32(nmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        best_iscale = -nm / mx
        sumlx, suml2 = search.sums(best_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(nm + F32(0.1) * F32(step)) / mx
            sumlx, suml2 = search.sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(best_iscale, iscale, where=better)
            np.copyto(scale, sumlx / suml2, where=better)
            np.copyto(best, scale * sumlx, where=better)
        levels = search.levels(best_iscale)
    levels += nm
    levels *= live
    return np.where(live, scale, F32(0.0)).astype(F32), levels.astype(np.uint8)
