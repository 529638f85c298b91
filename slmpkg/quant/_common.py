"""Primitives every kernel shares, each matching one C idiom of ggml-quants.c bit for bit.

Kernels lay a chunk of blocks out as ``(block_elements, n_blocks)`` float32 arrays (``x.T``), so a C
loop over the elements of one block becomes a Python loop of 32 or 256 steps, each step vectorized
across every block of the chunk, and a C reduction ``float s = 0; for (i...) s += v[i];`` becomes
``seq_sum(v)``: ``np.add.reduce`` over the leading axis adds the rows left to right in float32,
exactly as the C loop does (``v.sum(axis=-1)`` is pairwise and differs in most blocks).
"""

from __future__ import annotations

import threading

from typing import Optional

import numpy as np

F32 = np.float32
ROUNDING_BIAS = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round(v) in the low mantissa bits

_local = threading.local()


def seq_sum(v: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0, as a sequential C loop starting from ``0.0f``.

    ``np.add.reduce`` over axis 0 adds whole rows in order when there are several columns, but sums
    a lone column pairwise; ``accumulate`` is sequential always and covers that case. Adding ``+0.0``
    turns an all ``-0.0`` sum into C's ``+0.0`` whatever the numpy version starts from.
    """
    if v.size == v.shape[0]:
        return np.add.accumulate(v.reshape(v.shape), axis=0, dtype=F32)[-1] + F32(0.0)
    return np.add.reduce(v, axis=0, dtype=F32) + F32(0.0)


def nearest_int_bits(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` bit for bit, as int32, beyond its asserted range too.

    Equals ``np.rint`` for ``|v| <= 4194303``; NaN gives 0, infinities -4194304 and huge values the
    low mantissa bits, which is what ggml stores once a super-block scale overflows fp16. The hot
    loops use ``np.rint`` where their operands are bounded.
    """
    bits = (np.asarray(v, F32) + ROUNDING_BIAS).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def nearest_int(v: np.ndarray) -> np.ndarray:
    """:func:`nearest_int_bits` as float32 (exact: the results fit in 24 bits)."""
    return nearest_int_bits(v).astype(F32)


def safe_reciprocal(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` elementwise."""
    out = np.zeros_like(d, dtype=F32)
    np.divide(F32(1.0), d, out=out, where=d != 0)
    return out


def first_max_abs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``for (i) if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`` from ``amax = max = 0``,
    per column of ``x`` ``(n, nb)``: ``(amax, max)``, the first of equal magnitudes winning.

    The largest and the smallest value settle it unless they are ``a`` and ``-a``; only such columns
    look for the first. ``fmax``/``fmin`` skip NaN as C's ``>`` does.
    """
    hi = np.fmax.reduce(x, axis=0)
    lo = np.fmin.reduce(x, axis=0)
    neg = -lo
    amax = np.fmax(hi, neg)
    mx = np.where(hi >= neg, hi, lo)
    tied = np.flatnonzero((hi == neg) & (hi > 0))
    if tied.size:
        cols = x[:, tied]
        mx[tied] = cols[np.argmax(np.abs(cols) == amax[tied], axis=0), np.arange(tied.size)]
    zero = ~(amax > 0)  # nothing beat amax = 0 (NaN included): both stay +0
    amax[zero] = 0
    mx[zero] = 0
    return amax, mx


def row_sigma2(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``sum_x2 = 0; for (j < n) sum_x2 += x[j]*x[j]; sigma2 = scale*sum_x2/n`` per row of ``x`` (rows, n)."""
    n = x.shape[1]
    sum_x2 = seq_sum(np.ascontiguousarray((x * x).T))
    if scale != 1.0:
        sum_x2 = F32(scale) * sum_x2
    return sum_x2 / F32(n)


def scratch(name: str, shape: tuple[int, ...], dtype: type = F32, offset: int = 0) -> np.ndarray:
    """A reusable per-thread C-contiguous array (contents undefined) for the temporary ``name``.

    Its data starts ``offset`` bytes past a 4 KiB boundary: kernels keep their ``(n, nb)`` arrays at
    offset 0 and per-block vectors at 2048, so a load never trails a store by a few bytes modulo
    4 KiB (the CPU's store-forwarding check compares only the low 12 address bits).
    """
    state = _local.__dict__
    key = (shape, dtype, offset)
    last = state.setdefault("views", {}).get(name)
    if last is not None and last[0] == key:
        return last[1]
    pools: dict[str, np.ndarray] = state.setdefault("pools", {})
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    buf = pools.get(name)
    if buf is None or buf.size < nbytes + 4096:
        buf = pools[name] = np.empty(nbytes + nbytes // 4 + 4096, np.uint8)
    start = (offset - buf.__array_interface__["data"][0]) % 4096
    view = buf[start : start + nbytes].view(dt).reshape(shape)
    state["views"][name] = (key, view)
    return view


def dot_columns(
    a: np.ndarray, b: np.ndarray, c: Optional[np.ndarray] = None, out: Optional[np.ndarray] = None
) -> np.ndarray:
    """``s = 0; for (i) s += a[i]*b[i]`` (or ``(a[i]*b[i])*c[i]``) per column of C-contiguous ``(n, nb)``.

    ``einsum`` walks the columns in its inner loop and adds the rows in order, each product rounded
    to float32 first: the C loop exactly, in one pass and without a temporary. A lone column would
    be summed with several accumulators, so it takes the explicit route.
    """
    if a.shape[1] == 1:
        p = a * b if c is None else a * b * c
        s = seq_sum(p)
        if out is None:
            return s
        out[...] = s
        return out
    if c is None:
        return np.einsum("ij,ij->j", a, b, out=out)
    return np.einsum("ij,ij,ij->j", a, b, c, out=out)


def replay_search(
    sx: np.ndarray, s2: np.ndarray, first_valid: np.ndarray, tag: str
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate ggml's scale searches keep, from every candidate's sums ``sx``, ``s2`` ``(K, nb)``.

    C starts from candidate 0 with ``d = first_valid ? sx/s2 : 0`` and ``best = d*sx``, then takes
    each later candidate with ``s2 > 0 && sx*sx > best*s2`` (``d = sx/s2``, ``best = d*sx``). The walk
    is replayed on whole rows; the winner is the last candidate that was taken. Returns
    ``(choice, d)`` per column.
    """
    k_count, nb = sx.shape
    ratio, gain, square = (scratch(f"{tag}.{name}", sx.shape, offset=2048) for name in ("ratio", "gain", "sq"))
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(sx, s2, out=ratio)
        np.multiply(ratio, sx, out=gain)
        np.multiply(sx, sx, out=square)
        first = np.where(first_valid, ratio[0], F32(0.0))
        best = first * sx[0]
        positive = s2[1:] > 0
        if not positive.all():
            np.putmask(square[1:], ~positive, F32(-np.inf))  # never taken: -inf > anything is false
        taken = scratch(f"{tag}.taken", sx.shape, np.bool_)
        taken[0] = False
        rhs = np.empty(nb, F32)
        for k in range(1, k_count):
            np.multiply(best, s2[k], out=rhs)
            np.greater(square[k], rhs, out=taken[k])
            np.putmask(best, taken[k], gain[k])
    choice = np.maximum.reduce(taken * np.arange(k_count, dtype=np.uint8)[:, None], axis=0).astype(np.intp)
    return choice, np.where(choice == 0, first, ratio[choice, np.arange(nb)])


# ---- dequantization helpers ----------------------------------------------------------------------
#
# Dequantizers run over chunks of blocks small enough that every temporary stays in the core's L2
# cache, and keep numpy's calls on long contiguous runs: fields are pulled out of the block layout
# with one copy of fixed-size byte groups each (a ``V<n>`` view copies n bytes per element), levels
# are unpacked eight at a time in uint64 words, and the only short-row operations left are the
# per-block scalings, which no layout avoids.

DEQUANT_CHUNK_ELEMENTS = 1 << 19

NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
BYTE_ONES = np.uint64(0x0101010101010101)


def dequantize_chunks(data: np.ndarray, block_bytes: int, block_elements: int, fill) -> np.ndarray:
    """Run ``fill(raw, out)`` over chunks: ``raw`` uint8 ``(c, block_bytes)``, ``out`` float32
    ``(c, block_elements)``; returns every block's values ``(n_blocks, block_elements)``."""
    raw = np.ascontiguousarray(data).reshape(-1, block_bytes)
    out = np.empty((raw.shape[0], block_elements), F32)
    step = max(1, DEQUANT_CHUNK_ELEMENTS // block_elements)
    for a in range(0, raw.shape[0], step):
        fill(raw[a : a + step], out[a : a + step])
    return out


def spread(v: np.ndarray, width: int) -> np.ndarray:
    """Per-block (or per-sub-block) values ``v`` repeated ``width`` times each, contiguous: ``v.shape + (width,)``.

    Multiplying rows of 16 or 32 by a broadcast ``(..., 1)`` operand costs numpy one inner loop per
    row, several times the cost of the arithmetic; a repeated, contiguous operand costs one loop.
    """
    return np.repeat(v.reshape(-1), width).reshape(v.shape + (width,))


def half_column(raw: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte ``offset`` of each block (rows of ``raw``, an even length) as float32 ``(c, 1)``."""
    return raw.view(np.uint16)[:, offset // 2 : offset // 2 + 1].view(np.float16).astype(F32)


def byte_field(raw: np.ndarray, offset: int, size: int) -> np.ndarray:
    """Bytes ``[offset, offset + size)`` of each block, contiguous ``(c, size)`` (one ``size``-byte copy per block)."""
    out = np.empty((raw.shape[0], size), np.uint8)
    out.view(f"V{size}")[:, 0] = raw[:, offset : offset + size].view(f"V{size}")[:, 0]
    return out


def split_nibbles(packed: np.ndarray, out: np.ndarray) -> None:
    """``packed`` uint8 ``(c, g, n)`` (``n`` a multiple of 8) → ``out`` uint8 ``(c, g, 2, n)``: the low
    nibbles of each group, then its high nibbles (ggml's layout of 4-bit levels)."""
    c, g, n = packed.shape
    words = np.ascontiguousarray(packed).view(np.uint64)
    groups = out.reshape(c * g, 2, n).view(f"V{n}")  # (c*g, 2, 1): one n-byte element per half
    groups[:, 0, 0] = (words & NIBBLES).view(f"V{n}").reshape(c * g)
    groups[:, 1, 0] = ((words >> np.uint64(4)) & NIBBLES).view(f"V{n}").reshape(c * g)


def sign_extend(levels: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit levels (uint8, a multiple of 8 of them) minus ``2**(bits-1)``, as int8, in place:
    flipping the top bit gives the offset level as a ``bits``-bit two's complement number, and a set
    top bit then fills the byte's high bits (eight levels per uint64 operation)."""
    words = levels.view(np.uint64)
    top = np.uint64(((1 << (bits - 1)) * 0x0101010101010101) & 0xFFFFFFFFFFFFFFFF)
    words ^= top
    words |= ((words >> np.uint64(bits - 1)) & BYTE_ONES) * np.uint64((0xFF << bits) & 0xFF)
    return levels.view(np.int8)


def bit_fields(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Fields ``k = 0 .. count-1`` of ``width`` bits of every byte of ``packed`` uint8 ``(c, g, n)``
    (``n`` a multiple of 8) as uint8 ``(c, g, count, n)``: ``(byte >> width*k) & (2**width - 1)``.

    Computed eight bytes per uint64 operation in a ``(count, ...)`` layout, then moved into place
    ``n`` bytes at a time.
    """
    c, g, n = packed.shape
    words = np.ascontiguousarray(packed).view(np.uint64).reshape(1, -1)
    shifts = np.arange(0, width * count, width, dtype=np.uint64)[:, None]
    mask = np.uint64(((1 << width) - 1) * 0x0101010101010101)
    fields = (words >> shifts) & mask  # (count, c * g * n / 8)
    out = np.empty((c, g, count, n), np.uint8)
    out.view(f"V{n}")[..., 0] = fields.view(f"V{n}").reshape(count, c, g).transpose(1, 2, 0)
    return out
