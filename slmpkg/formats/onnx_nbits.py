"""Linear weights as the inputs of onnxruntime's ``com.microsoft.MatMulNBits``, from ggml blocks or floats.

MatMulNBits computes ``Y = A @ W.T`` with ``W[n, k] = (B[n, k] - zero_point) * scale`` per block of
``block_size`` values along K. B is uint8 ``[N, k_blocks, block_size * bits / 8]`` packed LSB-first
along K (4 bits: element 2i in the low nibble of byte i); scales are ``[N, k_blocks]``; zero points are
either packed uint8 ``[N, ceil(k_blocks * bits / 8)]`` (same packing, each row starting a new byte) or
float ``[N, k_blocks]``; absent, they are ``2**(bits-1)``.

This module turns one weight into those arrays (:class:`NBitsWeight`) and reports how it was carried
(:class:`Carry`); building graph nodes is the ONNX writer's job. Every ggml type whose dequantized
value is ``scale * level - min`` per block maps onto it without rounding again:

======  =====================================================  ===============================
ggml    MatMulNBits                                            carried
======  =====================================================  ===============================
Q4_0    bits 4, bs 32, default zero point 8, scale d           exact
Q8_0    bits 8, bs 32, B = q + 128, default zero point 128     exact
Q5_0    bits 8, bs 32, B = q + 112 (zero point 128: q - 16)    exact
Q3_K    bits 4, bs 16, B = q + 8, scale d*(sc-32)              exact
Q6_K    bits 8, bs 16, B = q + 96 (q - 32), scale d*sc         exact
Q5_1    bits 8, bs 32, B = q + 128, scale d, min term -m       exact
Q5_K    bits 8, bs 32, B = q + 128, scale d*sc, min term dmin*m  exact
Q4_1    bits 4, bs 32, float zero point -m/d                   within 1 ulp (or exact, min term)
Q4_K    bits 4, bs 32, float zero point dmin*m/(d*sc)          within 1 ulp (or exact, min term)
Q2_K    bits 2, bs 16, float zero point dmin*m/(d*sc)          within 1 ulp (or exact, min term)
others  re-quantized by :func:`from_float` (IQ types are non-linear; floats have no blocks)
======  =====================================================  ===============================

The *min term* is a per-block offset MatMulNBits cannot hold with integer zero points; the linear
becomes ``y = MatMulNBits(x) - ReduceSum(x.reshape(.., K/min_block, min_block), -1) @ min_term``
(a Reshape, a ReduceSum, a MatMul with N columns and K/min_block rows, a Sub), which keeps every
weight bit-exact. Default integer zero points are used wherever they fit
(``B`` is offset instead), so exact mappings need no zero-point tensor at all.

:func:`to_gguf` goes back: symmetric 2/4-bit → Q4_0, other zero points → Q4_1, 8-bit → Q8_0, a min
term → Q4_1/Q5_1, each exact up to float16 rounding of scales and minimums (bigger blocks repeat
their scale); Q4_0, Q8_0, Q4_1 and Q5_1 make the GGUF → MatMulNBits → GGUF trip byte for byte.

Facts measured with onnxruntime 1.32.0 (CPU, x86-64), most of them asserted by
``tests/test_onnx_nbits.py`` (one-node models, identity input X = eye(K), accuracy_level 0):

* The exact rows above: onnxruntime's weights equal ``slmpkg.quant.dequantize`` bit for bit. With an
  integer zero point it computes ``float(B - zp) * scale`` (one rounding, ggml's own product).
* Float zero points: it computes ``B*scale - float32(zp*scale)``, not ``(B - zp)*scale``. Since
  ``B*scale`` is ggml's product, a block is bit-exact when ``float32(zp*scale)`` equals ggml's min;
  a zero point that does exists for ~91% of random Q4_1/Q4_K/Q2_K blocks (the nearest float32 to
  ``min/scale`` or a neighbour). The others are off by one float32 ulp of ``max(|min|, |W|)``, which
  is up to 2**14 ulps of ``W`` itself where ``scale*level`` and ``min`` nearly cancel; hence the
  ``separate_min`` option.
* bits=2 runs on CPU (default, uint8 and float zero points); bits=8 with float zero points is
  refused at session creation ("does not support 8-bit weights with floating-point zero points"),
  which is why Q5_1/Q5_K take the min term.
* accuracy_level 1 gives level 0's results; level 4 quantizes A to int8 per block: an identity input
  comes out up to 4.8e-7 off and a random one ~0.3 off at K=256 (level 0: 2e-5). Tests of weights
  need level 0 or 1.
* float16 graphs: onnxruntime widens the float16 scales, dequantizes and multiplies in float32 and
  rounds the output, so Y = float16(dequantize()) for an identity input. Q4_0/Q8_0/Q5_0 scales are
  ggml's float16 d (still exact); K-quant scales ``d*sc`` often need more than 11 bits (``rounded``:
  Q6_K up to 1e-3 off on unit-variance weights). A min-term graph rounds the MatMulNBits output and
  the min term to float16 separately, which :meth:`NBitsWeight.dequantize` does not model.
* :func:`from_float` is byte-identical to onnxruntime's own block quantizer (``quantize_matmul_2bits``
  / ``_4bits`` / ``_8bits``, which ``MatMulNBitsQuantizer`` calls) for bits 2/4/8, block sizes
  16..256, symmetric and asymmetric, float32 and float16 scales.
* Speed (2048x5632, one thread, a loaded 2-core VM): ``from_gguf`` 0.01-0.2 s per linear type,
  re-quantizing F16 0.3 s, ``from_float`` 0.1-0.2 s.

Example:
    >>> import numpy as np
    >>> from slmpkg.formats import onnx_nbits
    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    >>> q = onnx_nbits.from_float(w, bits=4, block_size=32)
    >>> q.packed.shape, q.scales.shape, q.attributes()["block_size"]
    ((8, 2, 16), (8, 2), 32)
    >>> float(np.abs(q.dequantize() - w).max()) < 0.5
    True
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..checkpoint import LazyTensor
from ..errors import FormatError, UsageError
from ..quant import QuantType
from ..quant import dequantize as ggml_dequantize
from ..quant.blocks import BLOCK, as_blocks
# ggml's level unpacking lives with the kernels; reuse it rather than parse the blocks twice
from ..quant.kquants_affine import k4_levels, unpack_scales_k4
from ..quant.kquants_symmetric import q3_scale_values

__all__ = [
    "NBitsWeight", "Carry", "from_float", "from_gguf", "to_gguf", "pack_levels", "unpack_levels",
    "default_zero_point", "LINEAR_TYPES", "EXACT", "WITHIN_ULP", "ROUNDED", "REQUANTIZED",
]

F32 = np.float32
BITS = (2, 4, 8)

# Carry.kind values
EXACT = "exact"
WITHIN_ULP = "within 1 ulp"
ROUNDED = "rounded"  # same levels, scales rounded to a narrower float type (float16 graphs)
REQUANTIZED = "requantized"


def default_zero_point(bits: int) -> int:
    """The zero point MatMulNBits assumes when the input is absent: ``2**(bits-1)``."""
    return 1 << (bits - 1)


def pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """Integer levels ``[..., m]`` (each below ``2**bits``) → uint8 ``[..., m*bits/8]``, LSB-first.

    ``m`` must be a multiple of ``8 // bits``.

    Example:
        >>> pack_levels(np.array([[1, 2, 3, 4]]), 4).tolist()
        [[33, 67]]
    """
    v = np.asarray(levels).astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(v)
    per = 8 // bits
    v = v.reshape(*v.shape[:-1], -1, per)
    out = v[..., 0].copy()
    for i in range(1, per):
        out |= v[..., i] << np.uint8(bits * i)
    return out


def unpack_levels(packed: np.ndarray, bits: int, count: Optional[int] = None) -> np.ndarray:
    """The inverse of :func:`pack_levels`: uint8 ``[..., bytes]`` → levels uint8 ``[..., count]``."""
    p = np.asarray(packed, np.uint8)
    if bits == 8:
        v = p
    else:
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        v = ((p[..., None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(*p.shape[:-1], -1)
    return v if count is None else v[..., :count]


@dataclass
class NBitsWeight:
    """One linear weight ``W [N=out, K=in]`` as MatMulNBits inputs (see the module docstring).

    ``min_term`` (float ``[K/min_block, N]``), when present, is subtracted from the MatMulNBits output
    after a block-sum of the input: ``y = MatMulNBits(x) - ReduceSum(x as [.., K/min_block,
    min_block]) @ min_term``.

    Example:
        >>> w = from_float(np.ones((2, 32), np.float32))
        >>> w.attributes(accuracy_level=4)
        {'K': 32, 'N': 2, 'bits': 4, 'block_size': 32, 'accuracy_level': 4}
        >>> w.dequantize()[0, :3].tolist()
        [1.0, 1.0, 1.0]
    """

    bits: int
    block_size: int
    n: int
    k: int
    packed: np.ndarray
    scales: np.ndarray
    zero_points: Optional[np.ndarray] = None
    min_term: Optional[np.ndarray] = None
    min_block: int = 0

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise UsageError(f"MatMulNBits: bits must be one of {BITS}; got {self.bits}")
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise UsageError(f"MatMulNBits: block_size must be a power of two >= 16; got {bs}")
        what = f"MatMulNBits weight [{self.n}, {self.k}]"
        if self.packed.dtype != np.uint8:
            raise FormatError(f"{what}: packed B must be uint8; got {self.packed.dtype}")
        kb = self.k_blocks
        want = {"packed": (self.n, kb, bs * self.bits // 8), "scales": (self.n, kb)}
        for field_name, shape in want.items():
            got = getattr(self, field_name).shape
            if got != shape:
                raise FormatError(f"{what}: {field_name} has shape {got}, expected {shape}")
        zp = self.zero_points
        if zp is not None:
            # uint8 zero points are packed like B; float ones are one per block
            shape = (self.n, -(-kb * self.bits // 8)) if zp.dtype == np.uint8 else (self.n, kb)
            if zp.shape != shape:
                raise FormatError(f"{what}: {zp.dtype} zero_points have shape {zp.shape}, expected {shape}")
        if self.min_term is not None:
            mb = self.min_block
            if mb <= 0 or self.k % mb or self.min_term.shape != (self.k // mb, self.n):
                raise FormatError(f"{what}: min_term of shape {self.min_term.shape} does not fit min_block {mb}")

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)

    def attributes(self, accuracy_level: int = 0) -> dict[str, int]:
        """The node's attributes. Level 0 computes in the input's float type; 4 quantizes the input to
        int8 per block (faster, and no longer bit-exact: see the module docstring)."""
        return {
            "K": self.k, "N": self.n, "bits": self.bits, "block_size": self.block_size,
            "accuracy_level": accuracy_level,
        }

    def levels(self) -> np.ndarray:
        """The unpacked B codes, uint8 ``[N, k_blocks * block_size]`` (K padded to whole blocks)."""
        return unpack_levels(self.packed.reshape(self.n, -1), self.bits)

    def integer_zero_points(self) -> Optional[np.ndarray]:
        """Zero points as int16 ``[N, k_blocks]`` when they are integers (absent or uint8), else None."""
        zp = self.zero_points
        if zp is None:
            return np.full((self.n, self.k_blocks), default_zero_point(self.bits), np.int16)
        if zp.dtype == np.uint8:
            return unpack_levels(zp, self.bits, self.k_blocks).astype(np.int16)
        return None

    def dequantize(self) -> np.ndarray:
        """The float32 ``W [N, K]`` onnxruntime computes with (the min term subtracted).

        Integer zero points: ``float(B - zp) * scale``, one rounding; float zero points:
        ``B * scale - float32(zp * scale)``, as onnxruntime's CPU kernel does (measured).
        """
        n, kb, bs = self.n, self.k_blocks, self.block_size
        q = self.levels().reshape(n, kb, bs)
        s = self.scales.astype(F32)[:, :, None]
        izp = self.integer_zero_points()
        if izp is not None:
            w = (q.astype(np.int16) - izp[:, :, None]).astype(F32)
            w *= s
        else:
            w = q.astype(F32) * s
            w -= self.zero_points.astype(F32)[:, :, None] * s
        w = w.reshape(n, kb * bs)[:, : self.k]
        if self.min_term is not None:
            w -= np.repeat(self.min_term.astype(F32).T, self.min_block, axis=1)
        return np.ascontiguousarray(w)


@dataclass
class Carry:
    """How one tensor was carried into MatMulNBits, for the per-tensor conversion report.

    ``kind`` is ``"exact"`` (bit for bit the source's dequantized weights), ``"within 1 ulp"``,
    ``"rounded"`` (same levels, scales rounded to float16) or ``"requantized"`` (new levels);
    ``max_abs_error`` is measured against the source's dequantized weights.
    """

    name: str
    source_type: str
    kind: str
    max_abs_error: float


# ---------------------------------------------------------------------------------------------------
# from floats: onnxruntime's own block quantizer (MLAS BlockwiseQuantizer, used by MatMulNBitsQuantizer)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's ``roundf`` in float32: half away from zero, where ``np.rint`` rounds half to even.

    ``v - rint(v)`` is exact, so the ties are exactly the values it leaves at ±0.5; only they move.
    """
    r = np.rint(v)
    ties = np.flatnonzero(np.abs(v - r) == F32(0.5))
    if ties.size:
        flat, tied = r.reshape(-1), v.reshape(-1)[ties]
        flat[ties] = tied + np.copysign(F32(0.5), tied)
    return r


def from_float(
    w: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    scale_dtype: Any = np.float32,
) -> NBitsWeight:
    """Quantize float ``W [N, K]`` block-wise along K, as onnxruntime's quantizer does.

    Symmetric: ``scale = -v / 2**(bits-1)`` with ``v`` the block's value of largest magnitude (so it
    lands on level 0) and the default zero point; asymmetric: the range widened to include 0 over
    ``2**bits - 1`` levels, zero point ``roundf(-min/scale)``. Levels are
    ``clamp(roundf(x * (1/scale) + zp))``, with the scale rounded to ``scale_dtype`` first. A K that
    is not a multiple of ``block_size`` is padded with zeros (the padding never changes a scale).

    Example:
        >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
        >>> q = from_float(w, bits=8, block_size=64, symmetric=False)
        >>> q.zero_points.shape, float(np.abs(q.dequantize() - w).max()) < 0.01
        ((1, 1), True)
    """
    return quantize_float(w, bits, block_size, symmetric, scale_dtype)[0]


def quantize_float(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype: Any
) -> tuple[NBitsWeight, float]:
    """:func:`from_float` and the largest ``|dequantize() - w|``, measured on the way (the levels,
    zero points and scales are all at hand in each slab; dequantizing afterwards costs as much again)."""
    if bits not in BITS:
        raise UsageError(f"MatMulNBits: bits must be one of {BITS}; got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise UsageError(f"MatMulNBits: block_size must be a power of two >= 16; got {block_size}")
    x = np.asarray(w, dtype=F32)
    if x.ndim != 2:
        raise UsageError(f"MatMulNBits: a weight must be 2-D [N, K]; got shape {x.shape}")
    n, k = x.shape
    kb = -(-k // block_size)
    if kb * block_size != k:
        x = np.pad(x, ((0, 0), (0, kb * block_size - k)))
    xb = x.reshape(n, kb, block_size)
    top = F32((1 << bits) - 1)
    q = np.empty((n, kb, block_size), np.uint8)
    scales = np.empty((n, kb), scale_dtype)
    zp_int = np.empty((n, kb), np.int16)

    def slab(rows: slice) -> Any:
        """Scales, zero points and levels of some rows, and their largest error."""
        x_rows = xb[rows]
        hi = x_rows.max(axis=2)  # maximum.reduce: SIMD, twice fmax's speed (weights are finite)
        lo = x_rows.min(axis=2)
        if symmetric:
            # the larger magnitude maps to level 0 (-2**(bits-1)); a tie picks the minimum, as MLAS
            extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
            scales[rows] = -extreme / F32(default_zero_point(bits))
            zp_int[rows] = default_zero_point(bits)
        else:
            lo0 = np.minimum(lo, F32(0.0))
            hi0 = np.maximum(hi, F32(0.0))
            scale_f = (hi0 - lo0) / top
            zp_f = np.where(scale_f != 0, F32(0.0) - lo0 / scale_f, lo0).astype(F32)
            zp_int[rows] = np.clip(_roundf(np.nan_to_num(zp_f)), 0, top)
            scales[rows] = scale_f
        # levels use the scale as stored (MLAS reads back a float16 scale before dividing by it)
        s32 = scales[rows].astype(F32)[:, :, None]
        inv = np.where(s32 != 0, F32(1.0) / s32, F32(0.0)).astype(F32)
        zpf = zp_int[rows].astype(F32)[:, :, None]
        v = x_rows * inv
        v += zpf
        v = _roundf(v)
        np.clip(v, F32(0.0), top, out=v)
        q[rows] = v
        # dequantize()'s arithmetic: level - zp is exact in float32, then one rounding by the
        # scale; padding (x = 0 at level zp) adds no error
        v -= zpf
        v *= s32
        v -= x_rows
        return np.fmax.reduce(np.abs(v), axis=None) if v.size else F32(0.0)

    # rows in cache-sized slabs, on every core (numpy releases the GIL): each pass over a whole
    # tensor would be memory-bound
    step = max(1, _SLAB_ELEMENTS // (kb * block_size))
    slabs = [slice(r, r + step) for r in range(0, n, step)]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if len(slabs) > 1 and _WORKERS > 1:
            with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
                error = max(pool.map(slab, slabs), default=F32(0.0))
        else:
            error = max(map(slab, slabs), default=F32(0.0))
    packed = pack_levels(q, bits)
    zero_points = None if symmetric else _pack_zero_points(zp_int, bits)
    return NBitsWeight(bits, block_size, n, k, packed, scales, zero_points), float(error)


# float32 elements per slab of from_float's rounding passes (1 MiB: stays in L2)
_SLAB_ELEMENTS = 1 << 18
_WORKERS = os.cpu_count() or 1


def _pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """Integer zero points ``[N, k_blocks]`` → packed uint8 ``[N, ceil(k_blocks*bits/8)]``; the unused
    high bits of a row's last byte get the default zero point, as onnxruntime's quantizer leaves them."""
    n, kb = zp.shape
    per = 8 // bits
    padded = -(-kb // per) * per
    if padded != kb:
        zp = np.concatenate([zp, np.full((n, padded - kb), default_zero_point(bits), zp.dtype)], axis=1)
    return pack_levels(zp, bits)


# ---------------------------------------------------------------------------------------------------
# from ggml blocks


@dataclass
class _Affine:
    """One ggml tensor decomposed as ``W = scale * (level - zp) - min`` per block along K."""

    bits: int
    block_size: int
    levels: np.ndarray  # uint8 [N, K], already offset so that the default zero point applies
    scales: np.ndarray  # float32 [N, K/block_size]
    mins: Optional[np.ndarray] = None  # float32 [N, K/block_size]: W = scale*level - mins (levels from 0)
    level_bits: int = 0  # with mins: the bits ggml's levels take (they start at 0)


def _legacy(blocks: np.ndarray, n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q4_1/Q5_0/Q5_1: levels in element order + ``offset`` (uint8 ``[N, K]``), and the fp16
    scales as float32 ``[N, K/32]``.

    ggml keeps element j in the low nibble of byte j and j+16 in the high one; Q5's fifth bits are
    one little-endian uint32 per block, bit j for element j, which ``unpackbits`` reads in one pass.
    """
    qs = blocks["qs"]
    levels = np.empty((qs.shape[0], 32), np.uint8)
    np.bitwise_and(qs, np.uint8(0x0F), out=levels[:, :16])
    np.right_shift(qs, np.uint8(4), out=levels[:, 16:])
    if "qh" in blocks.dtype.names:
        qh = np.ascontiguousarray(blocks["qh"]).view(np.uint8).reshape(-1, 4)
        levels |= np.unpackbits(qh, axis=1, bitorder="little") << np.uint8(4)
    if offset:
        levels += np.uint8(offset)
    return levels.reshape(n, -1), blocks["d"].astype(F32).reshape(n, -1)


def _decompose(qtype: QuantType, raw: np.ndarray, n: int) -> _Affine:
    b = as_blocks(raw, qtype)
    nb = b.shape[0]
    if qtype is QuantType.Q4_0:
        levels, d = _legacy(b, n, 0)
        return _Affine(4, 32, levels, d)
    if qtype is QuantType.Q5_0:
        # q - 16 = (q + 112) - 128: the default 8-bit zero point
        levels, d = _legacy(b, n, 112)
        return _Affine(8, 32, levels, d)
    if qtype is QuantType.Q8_0:
        levels = (b["qs"].view(np.uint8) ^ np.uint8(0x80)).reshape(n, -1)  # q + 128 (mod 256)
        return _Affine(8, 32, levels, b["d"].astype(F32).reshape(n, -1))
    if qtype in (QuantType.Q4_1, QuantType.Q5_1):
        bits = 4 if qtype is QuantType.Q4_1 else 8
        levels, d = _legacy(b, n, 0)
        # ggml: level*d + m, i.e. a min of -m
        return _Affine(bits, 32, levels, d, -b["m"].astype(F32).reshape(n, -1), 4 if bits == 4 else 5)
    if qtype in (QuantType.Q4_K, QuantType.Q5_K):
        sc, m = unpack_scales_k4(b["scales"])
        scale = b["d"].astype(F32)[:, None] * sc  # ggml's d1 and m1, float32 products
        mins = b["dmin"].astype(F32)[:, None] * m
        q = k4_levels(b["qs"])
        bits = 4
        if qtype is QuantType.Q5_K:
            q = q + (((b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4)
            bits = 8
        return _Affine(bits, 32, q.reshape(n, -1), scale.reshape(n, -1), mins.reshape(n, -1), 4 if bits == 4 else 5)
    if qtype is QuantType.Q2_K:
        sc = b["scales"]
        scale = b["d"].astype(F32)[:, None] * (sc & 0xF).astype(F32)
        mins = b["dmin"].astype(F32)[:, None] * (sc >> 4).astype(F32)
        # 2-bit fields: half h, shift j, byte l → element 128h + 32j + l, sub-blocks of 16 in order
        q = (b["qs"].reshape(nb, 2, 1, 32) >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]) & 3
        return _Affine(2, 16, q.reshape(n, -1), scale.reshape(n, -1), mins.reshape(n, -1), 2)
    if qtype is QuantType.Q3_K:
        scale = b["d"].astype(F32)[:, None] * (q3_scale_values(b["scales"]).astype(F32) - F32(32))
        low = (b["qs"].reshape(nb, 2, 1, 32) >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]) & 3
        high = (b["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
        # ggml: low - (high ? 0 : 4) in -4..3; + 8 lands on the default 4-bit zero point
        q = low.reshape(nb, 256) + (high.reshape(nb, 256) << 2) + 4
        return _Affine(4, 16, q.reshape(n, -1), scale.reshape(n, -1))
    if qtype is QuantType.Q6_K:
        ql = b["ql"].reshape(nb, 2, 2, 32)
        low = np.concatenate([ql & 0xF, ql >> 4], axis=2)
        qh = (b["qh"].reshape(nb, 2, 1, 32) >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]) & 3
        # ggml: q - 32 with q in 0..63; q + 96 - 128 is the same with the default 8-bit zero point
        q = (low | (qh << 4)) + np.uint8(96)
        scale = b["d"].astype(F32)[:, None] * b["scales"].astype(F32)
        return _Affine(8, 16, q.reshape(n, -1), scale.reshape(n, -1))
    raise AssertionError(qtype)


LINEAR_TYPES = frozenset(
    {
        QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1, QuantType.Q8_0,
        QuantType.Q2_K, QuantType.Q3_K, QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K,
    }
)


def _float_zero_points(a: _Affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scales, float zero points and levels for ``W = scale*level - min`` as MatMulNBits computes a
    float zero point: ``level*scale - float32(zp*scale)``.

    ``level*scale`` is ggml's own product, so the weight is bit-exact when ``float32(zp*scale)``
    equals ``min``: ``zp`` is the float32 nearest ``min/scale`` or one of its neighbours that makes
    the product land on ``min`` (found for ~92% of blocks); otherwise the neighbour nearest it, one
    ulp of ``min`` off. A block whose scale is zero (a K-quant sub-block scale can quantize to 0) is
    the constant ``-min``: level 0, scale ``min``, zero point 1, exact.
    """
    scale, mins, levels = a.scales, a.mins, a.levels
    flat = scale == 0
    if flat.any():
        scale = np.where(flat, mins, scale)
        n, kb = flat.shape
        lv = levels.reshape(n, kb, -1)
        lv[flat] = 0
        levels = lv.reshape(n, -1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        zp = np.where(flat, F32(1.0), mins / np.where(flat, F32(1.0), scale)).astype(F32)
        target = mins.astype(np.float64)
        best_err = np.abs((zp * scale).astype(np.float64) - target)
        up, down = zp, zp
        for _ in range(_ZP_NEIGHBOURS):
            up = np.nextafter(up, F32(np.inf))
            down = np.nextafter(down, F32(-np.inf))
            for cand in (up, down):
                err = np.abs((cand * scale).astype(np.float64) - target)
                better = err < best_err
                zp = np.where(better, cand, zp)
                best_err = np.where(better, err, best_err)
    return scale, zp, levels


# neighbours of min/scale tried on each side; measured on random Q4_K/Q4_1/Q2_K blocks, every
# exact zero point found was within one ulp of the nearest float32 to min/scale
_ZP_NEIGHBOURS = 2


def _float_zero_point_error(a: _Affine, scales: np.ndarray, zp: np.ndarray, levels: np.ndarray) -> tuple[str, float]:
    """The carry of float zero points: ``(kind, max_abs_error)`` against ggml's ``scale*level - min``.

    MatMulNBits computes ``level*scale - float32(zp*scale)`` and ``level*scale`` is ggml's own
    product, so a block is exact exactly when ``float32(zp*scale) == min``; only the others are
    evaluated, and each value must be within one float32 ulp of ``max(|min|, |value|)``.
    """
    off = (zp * scales) != a.mins
    if not off.any():
        return EXACT, 0.0
    n, kb = off.shape
    q = levels.reshape(n, kb, -1)[off].astype(F32)
    s, z, m = scales[off][:, None], zp[off][:, None], a.mins[off][:, None]
    ggml = q * s - m
    ours = q * s - z * s
    diff = np.abs(ours - ggml)
    within = bool((diff <= np.spacing(np.maximum(np.abs(ggml), np.abs(m)))).all())
    return (WITHIN_ULP if within else ROUNDED), float(diff.max())


def _within_one_ulp(got: np.ndarray, source: np.ndarray, mins: np.ndarray, block_size: int) -> bool:
    """``|got - source|`` within one float32 ulp of ``max(|min|, |source|)`` everywhere, ``min`` being
    each value's block minimum: the bound a float zero point keeps (see :func:`_float_zero_points`)."""
    n = source.shape[0]
    big = np.maximum(np.abs(source).reshape(n, -1, block_size), np.abs(mins)[:, :, None])
    return bool((np.abs(got - source).reshape(big.shape) <= np.spacing(big)).all())


def from_gguf(
    tensor: LazyTensor,
    scale_dtype: Any = np.float32,
    fallback_bits: int = 4,
    fallback_block_size: int = 32,
    separate_min: bool = False,
) -> tuple[NBitsWeight, Carry]:
    """One GGUF linear weight (``shape [N, K]``, rows along K) as MatMulNBits inputs.

    Types of the table in the module docstring keep their levels; ``separate_min=True`` carries the
    minimums of Q4_1/Q4_K/Q2_K as a min term too (exact, two more nodes) instead of float zero
    points. Anything else (F32/F16/BF16, IQ types) is re-quantized with :func:`from_float` at
    ``fallback_bits``/``fallback_block_size``, and the carry says so with the error it made.

    Example:
        >>> from slmpkg import quant
        >>> w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
        >>> t = LazyTensor("blk.0.ffn_up.weight", (4, 256), QuantType.Q4_0, lambda: quant.quantize(w, "Q4_0"))
        >>> nb, carry = from_gguf(t)
        >>> (nb.bits, nb.block_size, carry.kind)
        (4, 32, 'exact')
    """
    if len(tensor.shape) != 2:
        raise FormatError(f"{tensor.name}: MatMulNBits takes a 2-D weight; got shape {list(tensor.shape)}")
    n, k = (int(s) for s in tensor.shape)
    qtype = tensor.qtype
    if qtype not in LINEAR_TYPES:
        w, error = quantize_float(tensor.float32(), fallback_bits, fallback_block_size, True, scale_dtype)
        return w, Carry(tensor.name, qtype.name, REQUANTIZED, error)

    raw = np.ascontiguousarray(tensor.raw()).view(np.uint8).reshape(-1)
    a = _decompose(qtype, raw, n)
    if not np.isfinite(a.scales).all() or (a.mins is not None and not np.isfinite(a.mins).all()):
        # ggml's float16 scales overflowed when the file was made; a min term would spread 0*inf = NaN
        raise FormatError(f"{tensor.name}: {qtype.name} blocks hold non-finite scales or minimums (float16 overflow)")
    kind = EXACT
    zero_points = None
    min_term = None
    min_block = 0
    scales, levels = a.scales, a.levels
    if a.mins is not None:
        if a.bits == 8 or separate_min:
            # W = scale*level - min: levels from 0, shifted over the default zero point where they
            # fit, else with explicit zero points of 0 (Q4_1/Q4_K use all 16 levels, Q2_K all 4)
            if a.level_bits < a.bits:
                levels = levels + np.uint8(default_zero_point(a.bits))
            else:
                zero_points = _pack_zero_points(np.zeros(scales.shape, np.int16), a.bits)
            min_term = np.ascontiguousarray(a.mins.T)
            min_block = a.block_size
        else:
            scales, zero_points, levels = _float_zero_points(a)
            kind = WITHIN_ULP
    bs = a.block_size
    packed = pack_levels(levels.reshape(n, -1, bs), a.bits)
    if zero_points is not None and zero_points.dtype != np.uint8:
        zero_points = zero_points.astype(scale_dtype)
    w = NBitsWeight(a.bits, bs, n, k, packed, scales.astype(scale_dtype), zero_points, min_term, min_block)
    if min_term is not None:
        w.min_term = min_term.astype(scale_dtype)

    error = 0.0
    if np.dtype(scale_dtype) != np.float32:
        # float16 scales: measure against ggml's values
        source = ggml_dequantize(raw, qtype, (n, k))
        got = w.dequantize()
        error = float(np.abs(got - source).max()) if source.size else 0.0
        if error == 0.0:
            kind = EXACT
        elif a.mins is None or min_term is not None or not _within_one_ulp(got, source, a.mins, bs):
            kind = ROUNDED
    elif kind == WITHIN_ULP:
        kind, error = _float_zero_point_error(a, scales, zero_points, levels)
    return w, Carry(tensor.name, qtype.name, kind, error)


# ---------------------------------------------------------------------------------------------------
# back to ggml


def _per_32(values: np.ndarray, block_size: int, what: str, name: str) -> np.ndarray:
    """Per-block values ``[N, k_blocks]`` as one per 32-element ggml block: repeated for bigger
    blocks; for 16-element blocks, each pair must agree."""
    if block_size >= 32:
        return np.repeat(values, block_size // 32, axis=1)
    pairs = values.reshape(values.shape[0], -1, 2)
    if not np.array_equal(pairs[..., 0], pairs[..., 1]):
        raise FormatError(f"{name}: block size {block_size} has two {what} per 32 values; ggml's blocks hold one")
    return pairs[..., 0]


def to_gguf(w: NBitsWeight, name: str = "MatMulNBits weight") -> tuple[QuantType, bytes]:
    """The ggml blocks holding ``w``'s values, up to float16 rounding of its scales (and minimums).

    Symmetric (absent zero points, or all ``2**(bits-1)``) 2/4-bit weights → Q4_0; other 2/4-bit
    zero points, integer or float → Q4_1 (``m = -zp * scale``); 8-bit with integer zero points → Q8_0
    when every ``level - zp`` fits int8. A min term (what :func:`from_gguf` makes of Q4_1/Q5_1/Q4_K/
    Q5_K/Q2_K) → Q4_1 for 2/4 bits, Q5_1 for 8 bits whose ``level - zp`` stays in 0..31. Block sizes
    above 32 repeat their scale per ggml block. Raises :class:`FormatError` naming ``name`` and the
    reason otherwise (float 8-bit zero points, K not a multiple of 32, 16-value blocks with differing
    scales, levels out of the target type's range).

    Example:
        >>> w = from_float(np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32))
        >>> qtype, data = to_gguf(w)
        >>> qtype.name, len(data)
        ('Q4_0', 72)
    """
    if w.k % 32:
        raise FormatError(f"{name}: K = {w.k} is not a multiple of 32, ggml's block size")
    n, k, bs = w.n, w.k, w.block_size
    levels = w.levels()[:, :k].reshape(n, k // 32, 32)
    scales = _per_32(w.scales.astype(F32), bs, "scales", name)
    izp = w.integer_zero_points()
    zp = _per_32(izp if izp is not None else w.zero_points.astype(F32), bs, "zero points", name)

    if w.min_term is not None:
        if izp is None:
            raise FormatError(f"{name}: float zero points together with a min term have no ggml block type")
        mins = _per_32(w.min_term.astype(F32).T, w.min_block, "minimums", name)
        qtype, top = (QuantType.Q5_1, 31) if w.bits == 8 else (QuantType.Q4_1, 15)
        offsets = levels.astype(np.int16) - zp[:, :, None]
        if offsets.min(initial=0) < 0 or offsets.max(initial=0) > top:
            raise FormatError(f"{name}: levels minus zero points leave 0..{top}; {qtype.name} cannot hold them")
        return qtype, _affine_blocks(qtype, offsets.astype(np.uint8), scales, -mins)

    if w.bits == 8:
        if izp is None:
            raise FormatError(f"{name}: 8-bit weights with float zero points have no ggml block type")
        diff = levels.astype(np.int16) - zp[:, :, None]
        if diff.min(initial=0) < -128 or diff.max(initial=0) > 127:
            raise FormatError(f"{name}: 8-bit levels minus zero points leave int8's range; Q8_0 cannot hold them")
        out = np.empty(n * (k // 32), BLOCK[QuantType.Q8_0])
        out["d"] = scales.reshape(-1)
        out["qs"] = diff.astype(np.int8).reshape(-1, 32)
        return QuantType.Q8_0, out.tobytes()

    if izp is not None and bool((izp == default_zero_point(w.bits)).all()):
        q = (levels.astype(np.int16) - zp[:, :, None] + 8).astype(np.uint8)  # within 0..15 for 2/4 bits
        return QuantType.Q4_0, _affine_blocks(QuantType.Q4_0, q, scales, None)
    # (level - zp) * scale = level*scale + m with m = -zp*scale; MatMulNBits rounds zp*scale alike
    return QuantType.Q4_1, _affine_blocks(QuantType.Q4_1, levels, scales, -(zp.astype(F32) * scales))


def _affine_blocks(qtype: QuantType, q: np.ndarray, d: np.ndarray, m: Optional[np.ndarray]) -> bytes:
    """ggml blocks of Q4_0/Q4_1/Q5_1 from levels ``[N, K/32, 32]`` and per-block ``d`` (and ``m``)."""
    out = np.empty(q.shape[0] * q.shape[1], BLOCK[qtype])
    out["d"] = d.reshape(-1)
    if m is not None:
        out["m"] = m.reshape(-1)
    q = q.reshape(-1, 32)
    if qtype is QuantType.Q5_1:
        # bit 4 of element j is bit j of a little-endian uint32
        out["qh"] = np.packbits(q >> np.uint8(4), axis=1, bitorder="little").view("<u4").reshape(-1)
        q = q & np.uint8(0x0F)
    out["qs"] = q[:, :16] | (q[:, 16:] << np.uint8(4))  # ggml: element j low, j + 16 high
    return out.tobytes()
