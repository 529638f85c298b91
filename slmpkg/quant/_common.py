"""Primitives every kernel shares, each matching one C idiom of ggml-quants.c bit for bit.

Kernels lay a chunk of blocks out as ``(block_elements, n_blocks)`` float32 arrays (``x.T``), so a C
loop over the elements of one block becomes a Python loop of 32 or 256 steps, each step vectorized
across every block of the chunk, and a C reduction ``float s = 0; for (i...) s += v[i];`` becomes
``seq_sum(v)``: ``np.add.reduce`` over the leading axis adds the rows left to right in float32,
exactly as the C loop does (``v.sum(axis=-1)`` is pairwise and differs in most blocks).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def seq_sum(v: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0, as a sequential C loop starting from ``0.0f``.

    ``np.add.reduce`` over axis 0 adds whole rows in order when there are several columns, but sums
    a lone column pairwise; ``accumulate`` is sequential always and covers that case. Adding ``+0.0``
    turns an all ``-0.0`` sum into C's ``+0.0`` whatever the numpy version starts from.
    """
    if v.size == v.shape[0]:
        return np.add.accumulate(v.reshape(v.shape), axis=0, dtype=F32)[-1] + F32(0.0)
    return np.add.reduce(v, axis=0, dtype=F32) + F32(0.0)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even in float32 (its ``+ 12582912.f`` trick), kept as float32."""
    return np.rint(v)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: round to nearest even through half precision."""
    return np.asarray(v, F32).astype(np.float16).astype(F32)


def safe_reciprocal(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` elementwise."""
    out = np.zeros_like(d, dtype=F32)
    np.divide(F32(1.0), d, out=out, where=d != 0)
    return out


def first_argmax_abs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``for i: if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`` over axis 0, from ``amax = 0``.

    Returns ``(amax, max)``; ties keep the first index, and an all-zero block gives ``(0, 0)``
    (``+0.0``, since the C code starts from ``max = 0`` and a zero never beats it).
    """
    ax = np.abs(x)
    amax = ax.max(axis=0)
    idx = np.argmax(ax, axis=0)  # first index of the maximum: C's strict '>'
    mx = np.take_along_axis(x, idx[None, :], axis=0)[0]
    mx = np.where(amax > 0, mx, F32(0.0)).astype(F32)
    return amax, mx


def row_sigma2(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``sum_x2 = 0; for (j < n) sum_x2 += x[j]*x[j]; sigma2 = scale*sum_x2/n`` per row of ``x`` (rows, n)."""
    n = x.shape[1]
    sum_x2 = seq_sum(np.ascontiguousarray((x * x).T))
    if scale != 1.0:
        sum_x2 = F32(scale) * sum_x2
    return sum_x2 / F32(n)


def pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``lo | (hi << 4)`` as uint8."""
    return (lo.astype(np.uint8) | (hi.astype(np.uint8) << 4)).astype(np.uint8)
