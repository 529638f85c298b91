"""Q3_K and Q6_K: symmetric K-quants (16 sub-blocks of 16 per 256-element super-block, no minimum).

Sub-blocks are laid out as ``(16, n_sub)`` float32 arrays (see :mod:`._common`): the search over 19
candidate scales in ``make_qx_quants`` is a few whole-array passes per candidate, and the greedy
refinement of ``make_q3_quants`` runs in rounds over all unfinished sub-blocks (see
:func:`_refine_q3`). Every expression keeps the operand order and float32 rounding of ggml-quants.c.

Paths, as ``ggml_quantize_chunk`` takes them: without an importance matrix Q3_K uses
``make_q3_quants`` (the ``_ref`` quantizer) and Q6_K ``make_qx_quants`` weighted by x²; with one, Q3_K
fits each sub-block and then the 16 scales with ``make_qx_quants`` under ``qw * sqrt(sigma2 + x²)``,
and Q6_K weighs ``make_qx_quants`` by the raw importance.

Large temporaries come from :func:`scratch`: the first touch of every fresh page costs a fault, and
on virtual machines faults can cost more than the arithmetic on the page.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import Kernel
from ._common import (
    F32, ROUNDING_BIAS, bit_fields, byte_field, dequantize_chunks, dot_columns, first_max_abs, half_column,
    nearest_int, replay_search, scratch, seq_sum, sign_extend, split_nibbles, spread,
)
from .blocks import BLOCK, QK_K

__all__ = ["KERNELS", "make_qx_quants"]

GROUP_MAX_EPS = F32(1e-15)
SUB = 16  # elements per sub-block
N_SUB = QK_K // SUB  # sub-blocks per super-block



def _rint_clip(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` in place, kept as float32.

    Bounds are float32 0-d arrays: ``ndarray.clip`` with them skips the scalar conversions that
    dominate on small arrays.
    """
    np.rint(v, out=v)
    return v.clip(lo, hi, out=v)


def _bounds(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    return np.array(lo, F32), np.array(hi, F32)


_STEPS = [s for s in range(-9, 10) if s != 0]


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
    nb = x.shape[1]
    amax, mx = first_max_abs(x)
    if qw is None:
        w = scratch("qx.w", x.shape)
        np.multiply(x, x, out=w)
    else:
        w = np.ascontiguousarray(qw, dtype=F32)
    wx = scratch("qx.wx", x.shape)
    np.multiply(w, x, out=wx)  # C's w*x[i]*l groups as (w*x[i])*l
    lv = scratch("qx.l", x.shape)  # the candidate levels l
    lo, hi = _bounds(-nmax, nmax - 1)
    nm = F32(nmax)
    # Candidate 0 is the plain -nmax/max, 1..18 ggml's is = -9..-1, 1..9. For finite x every
    # iscale*x lies within nmax+1 of zero, where rint agrees with nearest_int.
    shape = (len(_STEPS) + 1, nb)
    iscales, sumlx, suml2 = (scratch(f"qx.{name}", shape, offset=2048) for name in ("iscale", "sx", "s2"))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(-nm, mx, out=iscales[0])
        for k, s in enumerate(_STEPS, 1):
            np.divide(-(nm + F32(0.1) * F32(s)), mx, out=iscales[k])
        for k in range(shape[0]):
            np.multiply(iscales[k], x, out=lv)
            _rint_clip(lv, lo, hi)
            dot_columns(wx, lv, out=sumlx[k])
            dot_columns(w, lv, lv, out=suml2[k])
        choice, scale = replay_search(sumlx, suml2, suml2[0] != 0, "qx")
        np.multiply(iscales[choice, np.arange(nb)], x, out=lv)
        _rint_clip(lv, lo, hi)
    levels = np.empty(x.shape, np.uint8)
    np.add(lv, nm, out=levels, casting="unsafe")
    dead = np.flatnonzero(~(amax >= GROUP_MAX_EPS))
    scale[dead] = 0
    levels[:, dead] = 0
    return scale, levels


_POSITIONS = np.arange(SUB, dtype=np.int8)[:, None]
_NIBBLE_MASK = np.uint64(0x0F0F0F0F0F0F0F0F)


def _refine_q3(
    x: np.ndarray, levels: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray, todo: np.ndarray, iscale: np.ndarray
) -> None:
    """``make_q3_quants``' greedy passes (at most five) on the blocks ``todo``, updating ``levels``
    (-4..3 as float32, made from ``x`` with ``iscale`` per block), ``sumlx`` and ``suml2`` in place.

    The C visits one element at a time and a move changes the sums every later visit sees. Moves are
    rare, so each round evaluates all 16 elements of every unfinished block against its current sums
    and applies only the first move in visiting order: the elements visited before it saw exactly
    these sums. Visiting order continues past the end of a pass into the next one (the sums have not
    changed, so neither have the candidates), which makes a block cost one round per move plus one,
    rather than one element loop per pass. A block is finished when no element moves; it stays
    finished, so finished blocks are only dropped from the working set when that saves real work.
    """
    lo, hi = _bounds(-4, 3)
    n = todo.size
    # The working set is packed into the front of flat buffers viewed as contiguous (16, n):
    # contiguous operands keep numpy on its fast loops, and no round allocates.
    flat = [scratch(f"q3r.{k}", (SUB * n,)) for k in range(10)]
    flat += [scratch(f"q3r.b{k}", (SUB * n,), np.bool_) for k in range(2)]
    flat += [scratch(f"q3r.i{k}", (SUB * n,), np.int8) for k in range(2)]
    X, W, WX, L, slx, sl2, q, new_slx, new_sl2, lhs, ok, flag, rank, penalty = (
        b[: SUB * n].reshape(SUB, n) for b in flat
    )
    np.take(x, todo, axis=1, out=X)
    np.multiply(X, X, out=W)
    np.multiply(W, X, out=WX)
    # the starting levels again from the gathered x (cheaper than gathering them too)
    np.multiply(iscale[todo], X, out=L)
    _rint_clip(L, lo, hi)
    sx = sumlx[todo]
    s2 = suml2[todo]
    # Blocks dropped from the working set are filed from the back of an archive, in one slice each
    # time; the archive goes back into ``levels`` with a single scatter at the end.
    archive = scratch("q3r.archive", (SUB, n))
    archive_todo, archive_sx, archive_s2 = np.empty_like(todo), np.empty_like(sx), np.empty_like(s2)
    tail = n
    start = np.zeros(n, np.int8)  # next element to visit in the current pass (16: pass over)
    limit = np.full(n, SUB, np.int8)  # ranks from here on are out of reach (16 - start in the last pass)
    passes = np.zeros(n, np.int8)  # index of the current pass
    while True:
        np.multiply(WX, L, out=slx)
        np.subtract(sx, slx, out=slx)
        np.multiply(W, L, out=sl2)
        sl2 *= L
        np.subtract(s2, sl2, out=sl2)
        np.multiply(X, sl2, out=q)
        q /= slx
        _rint_clip(q, lo, hi)  # the candidate level
        np.multiply(WX, q, out=new_slx)
        new_slx += slx
        np.multiply(W, q, out=new_sl2)
        new_sl2 *= q
        new_sl2 += sl2
        np.greater(slx, 0, out=ok)
        np.not_equal(q, L, out=flag)
        ok &= flag
        np.greater(new_sl2, 0, out=flag)
        ok &= flag
        np.multiply(new_slx, new_slx, out=lhs)
        lhs *= s2
        np.multiply(new_sl2, sx * sx, out=sl2)
        np.greater(lhs, sl2, out=flag)
        ok &= flag
        np.logical_not(ok, out=flag)  # flag: the element does not move

        # the first moving element in visiting order (rank 16 and up: does not move)
        np.subtract(_POSITIONS, start, out=rank)
        # the byte operations run eight bytes at a time on uint64 views (numpy's int8 shift is scalar)
        words = rank.reshape(-1).view(np.uint64)
        words &= _NIBBLE_MASK
        np.left_shift(flag.reshape(-1).view(np.uint64), np.uint64(4), out=penalty.reshape(-1).view(np.uint64))
        words |= penalty.reshape(-1).view(np.uint64)
        first = np.minimum.reduce(rank, axis=0)
        cols = np.flatnonzero(first < limit)
        if cols.size == 0:
            break
        step = first[cols]
        pos = start[cols] + step
        wrapped = pos >= SUB  # the move falls in the next pass
        pos &= np.int8(SUB - 1)
        at = pos.astype(np.intp) * n + cols
        L.reshape(-1)[at] = q.reshape(-1)[at]
        sx[cols] = new_slx.reshape(-1)[at]
        s2[cols] = new_sl2.reshape(-1)[at]
        passes[cols] += wrapped
        start[cols] = pos + 1
        limit[cols] = np.where(passes[cols] < 4, SUB, SUB - 1 - pos)

        if 2 * cols.size < n and n >= 256:
            done = np.ones(n, np.bool_)
            done[cols] = False
            done = np.flatnonzero(done)
            head, tail = tail - done.size, tail
            archive[:, head:tail] = np.take(L, done, axis=1)
            archive_todo[head:tail], archive_sx[head:tail], archive_s2[head:tail] = todo[done], sx[done], s2[done]
            tail = head
            # only x and the levels move: the weights are recomputed (a gather costs ten multiplies)
            packed = [np.take(a, cols, axis=1) for a in (X, L)]
            n = cols.size
            X, W, WX, L, slx, sl2, q, new_slx, new_sl2, lhs, ok, flag, rank, penalty = (
                b[: SUB * n].reshape(SUB, n) for b in flat
            )
            for buf, a in zip((X, L), packed, strict=True):
                buf[...] = a
            np.multiply(X, X, out=W)
            np.multiply(W, X, out=WX)
            todo, sx, s2 = todo[cols], sx[cols], s2[cols]
            start, limit, passes = start[cols], limit[cols], passes[cols]
    archive[:, :n] = L
    archive_todo[:n], archive_sx[:n], archive_s2[:n] = todo, sx, s2
    levels[:, archive_todo] = archive
    sumlx[archive_todo] = archive_sx
    suml2[archive_todo] = archive_s2


def _make_q3_quants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(16, 4, x, L, true)`` for every sub-block of ``x`` (16, n_sub): ``(scale, L)``."""
    amax, mx = first_max_abs(x)
    lv = scratch("q3.l", x.shape)  # the levels l, -4..3
    t = scratch("q3.t", x.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-4.0) / mx
        np.multiply(iscale, x, out=lv)
        _rint_clip(lv, *_bounds(-4, 3))
        np.multiply(x, x, out=t)
        sumlx = dot_columns(t, x, lv)
        suml2 = dot_columns(t, lv, lv)
        # Every term w*x*l has the sign of -x*max, so unless max < 0 each slx = sumlx - w*x*l is <= 0
        # and the greedy passes cannot move an element; only blocks with sumlx > 0 can change.
        _refine_q3(x, lv, sumlx, suml2, np.flatnonzero(sumlx > 0), iscale)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
        lv += F32(4)
        levels = lv.astype(np.uint8)
    dead = np.flatnonzero(~(amax >= GROUP_MAX_EPS))
    scale[dead] = 0
    levels[:, dead] = 0
    return scale, levels


def _sub_blocks(x: np.ndarray, tag: str) -> np.ndarray:
    """Rows ``(rows, n)`` → ``(16, n_sub)``: column ``s`` is sub-block ``s`` in memory order."""
    xs = scratch(tag, (SUB, x.size // SUB))
    np.copyto(xs, x.reshape(-1, SUB).T)
    return xs


def _sub_weights(imatrix: np.ndarray, rows: int, tag: str) -> np.ndarray:
    """The importance of every sub-block element, laid out like :func:`_sub_blocks`."""
    per_row = imatrix.size // SUB
    qw = scratch(tag, (SUB, rows, per_row))
    np.copyto(qw, imatrix.reshape(per_row, SUB).T[:, None, :])
    return qw.reshape(SUB, rows * per_row)


def _requantize(x: np.ndarray, L: np.ndarray, d: np.ndarray, nmax: int) -> np.ndarray:
    """Levels of the rows ``x`` against the stored (fp16-rounded) sub-block scales ``d``, as uint8
    ``(n_blocks, 256)`` in element order; where ``d == 0`` the sub-block keeps ``L`` ``(16, n_sub)``.

    Works on the rows as they are, (sub-block, element), so the result needs no transpose.
    """
    rows = x.reshape(-1, SUB)
    q = scratch("rq", rows.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(rows, spread(d, SUB), out=q)
    # nearest_int bit for bit: x/d is unbounded once an fp16 scale has rounded to almost nothing
    q += ROUNDING_BIAS
    bits = q.view(np.int32)
    bits &= 0x7FFFFF
    bits -= 0x400000 - nmax
    np.clip(bits, 0, 2 * nmax - 1, out=bits)
    levels = bits.astype(np.uint8)
    keep = np.flatnonzero(d == 0)
    levels[keep] = L[:, keep].T
    return levels.reshape(-1, QK_K)


def _per_block(v: np.ndarray) -> np.ndarray:
    """Per sub-block values ``(n_sub,)`` → ``(16, n_blocks)`` for a reduction across each super-block."""
    return np.ascontiguousarray(v.reshape(-1, N_SUB).T)


# Packing works on eight levels at a time, as the bytes of a uint64: shifts of at most 7 and masks
# keep every byte's bits inside that byte. The levels are first regrouped by their 32-element run
# within a block (``runs``), so every packing step is one operation over long contiguous rows.
_BYTES_1 = np.uint64(0x0101010101010101)
_BYTES_3 = np.uint64(0x0303030303030303)
_BYTES_15 = np.uint64(0x0F0F0F0F0F0F0F0F)


def _runs(levels: np.ndarray, per_group: int) -> np.ndarray:
    """uint8 levels ``(n_blocks, 256)`` → uint64 ``(per_group, n_groups * 4)``: row ``k`` holds run ``k``
    (elements ``32k .. 32k+31``) of every group of ``32 * per_group`` elements, eight levels a word.
    The runs are moved 32 bytes at a time."""
    runs = np.empty((per_group, levels.size // (32 * per_group), 32), np.uint8)
    runs.view("V32")[..., 0] = levels.reshape(-1, per_group, 32).view("V32")[..., 0].T
    return runs.view(np.uint64).reshape(per_group, -1)


def _put_runs(out: np.ndarray, offset: int, parts: list[np.ndarray]) -> None:
    """Store uint64 rows ``parts`` (each 32 bytes per group, ``n_blocks * g`` groups) at byte ``offset``
    of every block of ``out`` ``(n_blocks, block bytes)``: group by group, the parts side by side."""
    nb = out.shape[0]
    span = out[:, offset : offset + 32 * len(parts) * (parts[0].size * 8 // 32 // nb)].view("V32")
    span = span.reshape(nb, -1, len(parts))
    for j, part in enumerate(parts):
        span[:, :, j] = part.view("V32").reshape(nb, -1)


# ---------------------------------------------------------------------------------------------- Q3_K


def _q3_scale_bytes(l6: np.ndarray) -> np.ndarray:
    """16 six-bit scales per block ``(nb, 16)`` → ggml's 12-byte packing."""
    out = np.empty((l6.shape[0], 12), np.uint8)
    out[:, :8] = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    hi = (l6 >> 4).reshape(-1, 4, 4)  # [block, j // 4, j % 4]
    out[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return out


def q3_scale_values(packed: np.ndarray) -> np.ndarray:
    """12-byte packing → the 16 six-bit scales (0..63) per block, as uint8 ``(nb, 16)``."""
    low = np.concatenate([packed[:, :8] & 0xF, packed[:, :8] >> 4], axis=1)
    shifts = np.repeat(np.arange(0, 8, 2, dtype=np.uint8), 4)  # 2*(j//4)
    high = (np.tile(packed[:, 8:], 4) >> shifts) & 3
    return low | (high << 4)


def _q3_weights(xs: np.ndarray, imatrix: np.ndarray, rows: int) -> np.ndarray:
    """``qw * sqrtf(sigma2 + x*x)`` with ``sigma2 = 2*sum(x*x)/256`` over each super-block."""
    nb = xs.shape[1] // N_SUB
    sq = scratch("q3.sq", xs.shape)
    np.multiply(xs, xs, out=sq)
    # the super-block's squares in element order: (element, sub-block) → (sub-block, element, block)
    by_block = scratch("q3.by_block", (N_SUB, SUB, nb))
    np.copyto(by_block, sq.reshape(SUB, nb, N_SUB).transpose(2, 0, 1))
    sigma2 = F32(2.0) * seq_sum(by_block.reshape(QK_K, nb)) / F32(QK_K)
    weight = scratch("q3.weight", xs.shape)
    np.add(sq, np.repeat(sigma2, N_SUB), out=weight)
    np.sqrt(weight, out=weight)
    weight *= _sub_weights(imatrix, rows, "q3.qw")
    return weight


def _quantize_q3_k(x: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
    rows = x.shape[0]
    xs = _sub_blocks(x, "q3.x")
    nb = xs.shape[1] // N_SUB
    if imatrix is None:
        scales, L = _make_q3_quants(xs)
        per_block = _per_block(scales)
        _, max_scale = first_max_abs(per_block)
        nonzero = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-32.0) / max_scale
            d = np.where(nonzero, F32(1.0) / iscale, F32(0.0)).astype(np.float16)
            l6 = nearest_int(iscale * per_block).T.astype(np.int32).astype(np.int8)  # int8_t l
        l6 = np.where(nonzero[:, None], np.clip(l6, -32, 31) + 32, 0).astype(np.uint8)
    else:
        weight = _q3_weights(xs, imatrix, rows)
        sw = seq_sum(weight)
        scales, L = make_qx_quants(xs, 4, 1, weight)
        d_block, ls = make_qx_quants(_per_block(scales), 32, 1, _per_block(sw))
        l6 = np.ascontiguousarray(ls.T)
        d = d_block.astype(np.float16)

    sub_d = (d.astype(F32)[:, None] * (l6.astype(F32) - F32(32))).reshape(-1)
    levels = _requantize(x, L, sub_d, 4)

    out = np.empty((nb, BLOCK[T.Q3_K].itemsize), np.uint8)
    # hmask[l]: bit 2 of level 32*g + l as bit g
    runs = _runs(levels, 8)
    high = (runs >> np.uint64(2)) & _BYTES_1
    hmask = high[0].copy()
    for g in range(1, 8):
        hmask |= high[g] << np.uint64(g)
    _put_runs(out, 0, [hmask])
    # qs[32*h + l]: the low two bits of levels 128*h + 32*k + l in bits 2k (runs of each half)
    low = (_runs(levels, 4) & _BYTES_3)
    qs = low[0] | (low[1] << np.uint64(2)) | (low[2] << np.uint64(4)) | (low[3] << np.uint64(6))
    _put_runs(out, 32, [qs])
    out[:, 96:108] = _q3_scale_bytes(l6)
    out[:, 108:110].view(np.uint16)[:, 0] = d.view(np.uint16)
    return out.reshape(rows, -1)


def _dequantize_q3_k(data: np.ndarray, n_per_row: int) -> np.ndarray:
    def fill(raw: np.ndarray, out: np.ndarray) -> None:
        c = raw.shape[0]
        dl = half_column(raw, 108) * (q3_scale_values(byte_field(raw, 96, 12)).astype(F32) - F32(32))
        # element 128*h + 32*j + l: bits 2j.. of qs[32*h + l], and bit 4*h + j of hmask[l] as bit 2
        levels = bit_fields(byte_field(raw, 32, 64).reshape(c, 2, 32), 2, 4)
        high = bit_fields(byte_field(raw, 0, 32).reshape(c, 1, 32), 1, 8)
        levels.view(np.uint64)[...] |= high.view(np.uint64).reshape(levels.shape[0], 2, 4, 4) << np.uint64(2)
        y = out.reshape(c, N_SUB, SUB)
        y[...] = sign_extend(levels, 3).reshape(c, N_SUB, SUB)
        y *= spread(dl, SUB)

    return dequantize_chunks(data, 110, QK_K, fill).reshape(-1, n_per_row)


# ---------------------------------------------------------------------------------------------- Q6_K


def _quantize_q6_k(x: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
    rows = x.shape[0]
    xs = _sub_blocks(x, "q6.x")
    nb = xs.shape[1] // N_SUB
    qw = None if imatrix is None else _sub_weights(imatrix, rows, "q6.qw")
    scales, L = make_qx_quants(xs, 32, 1, qw)
    per_block = _per_block(scales)
    amax, max_scale = first_max_abs(per_block)
    live = amax >= GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128.0) / max_scale
        d = np.where(live, F32(1.0) / iscale, F32(0.0)).astype(np.float16)
        sc = np.minimum(nearest_int(iscale * per_block).T.astype(np.int32), 127)
    sc = np.where(live[:, None], sc, 0).astype(np.int8)  # int8_t scales[] keep the low byte
    sub_d = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
    levels = _requantize(x, L, sub_d, 32)
    levels[~live] = 0  # a block of zero scales is written as all zeros

    out = np.empty((nb, BLOCK[T.Q6_K].itemsize), np.uint8)
    # per 128-element half: ql holds runs 0|2 then 1|3 as low|high nibbles, qh bits 4-5 of all four
    runs = _runs(levels, 4)
    low = runs & _BYTES_15
    _put_runs(out, 0, [low[0] | (low[2] << np.uint64(4)), low[1] | (low[3] << np.uint64(4))])
    top = (runs >> np.uint64(4)) & _BYTES_3
    _put_runs(out, 128, [top[0] | (top[1] << np.uint64(2)) | (top[2] << np.uint64(4)) | (top[3] << np.uint64(6))])
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210].view(np.uint16)[:, 0] = d.view(np.uint16)
    return out.reshape(rows, -1)


def _dequantize_q6_k(data: np.ndarray, n_per_row: int) -> np.ndarray:
    def fill(raw: np.ndarray, out: np.ndarray) -> None:
        c = raw.shape[0]
        # ggml's d * sc[is] * q: (d*sc) first
        scale = half_column(raw, 208) * byte_field(raw, 192, 16).view(np.int8)
        # element 128*h + 32*k + l: a nibble of ql[64*h + 32*(k & 1) + l] (low for k < 2), and bits
        # 2k.. of qh[32*h + l] as bits 4-5
        levels = np.empty((c, 2, 2, 64), np.uint8)
        split_nibbles(byte_field(raw, 0, 128).reshape(c, 2, 64), levels)
        high = bit_fields(byte_field(raw, 128, 64).reshape(c, 2, 32), 2, 4)
        levels.view(np.uint64)[...] |= high.view(np.uint64).reshape(levels.shape[0], 2, 2, 8) << np.uint64(4)
        y = out.reshape(c, N_SUB, SUB)
        y[...] = sign_extend(levels, 6).reshape(c, N_SUB, SUB)
        y *= spread(scale, SUB)

    return dequantize_chunks(data, 210, QK_K, fill).reshape(-1, n_per_row)


# Work items bigger than the default: the Q3_K refinement rounds and the candidate walks cost a
# fixed number of numpy calls per chunk whatever its size; past these sizes (measured) the working
# set falls out of cache faster than the calls amortize.
KERNELS: dict[T, Kernel] = {
    T.Q3_K: Kernel(_quantize_q3_k, _dequantize_q3_k, uses_imatrix=True, chunk_elements=1 << 19),
    T.Q6_K: Kernel(_quantize_q6_k, _dequantize_q6_k, uses_imatrix=True, chunk_elements=1 << 18),
}
