"""The float types: F32 (as is), F16 and BF16 (ggml's rounding: nearest even, ggml's NaNs)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import Kernel
from ._common import DEQUANT_CHUNK_ELEMENTS, scratch

U32 = np.uint32


def _f32(x: np.ndarray, _qw: Optional[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint8).reshape(x.shape[0], -1)


def to_f16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → fp16 bit patterns as ggml's ``ggml_compute_fp32_to_fp16`` makes them: nearest even,
    overflow to infinity, every NaN the quiet ``0x7E00`` with the sign (numpy's cast keeps NaN
    payloads, and is slower).

    The magnitude scaled by ``2**112`` then ``2**-110`` lands where adding a power of two matched
    to its exponent (at least ``2**-14``, the fp16 subnormal step) rounds away every bit fp16 cannot
    hold; exponent and mantissa are then read off the sum's bits.
    """
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    words = flat.view(U32)
    n = flat.size
    doubled, base, bias = scratch("f16.doubled", (n,), U32), scratch("f16.base", (n,)), scratch("f16.bias", (n,), U32)
    np.add(words, words, out=doubled)  # the sign shifted out
    np.abs(flat, out=base)
    with np.errstate(over="ignore"):
        base *= np.float32(2.0**112)
    base *= np.float32(2.0**-110)
    np.bitwise_and(doubled, U32(0xFF000000), out=bias)
    np.maximum(bias, U32(0x71000000), out=bias)
    bias >>= U32(1)
    bias += U32(0x07800000)
    base += bias.view(np.float32)
    bits = base.view(U32)
    np.right_shift(bits, U32(13), out=bias)
    bias &= U32(0x7C00)
    bits &= U32(0xFFF)
    bias += bits
    if n and doubled.max() > 0xFF000000:
        bias[doubled > U32(0xFF000000)] = 0x7E00
    np.right_shift(words, U32(16), out=doubled)
    doubled &= U32(0x8000)
    bias |= doubled
    return bias.astype(np.uint16).reshape(x.shape)


def _f16(x: np.ndarray, _qw: Optional[np.ndarray]) -> np.ndarray:
    return to_f16_bits(x).view(np.uint8).reshape(x.shape[0], -1)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns as ggml rounds them: nearest even, NaN kept quiet and signed."""
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    bits = flat.view(U32)
    rounded = scratch("bf16.rounded", (flat.size,), U32)
    np.right_shift(bits, U32(16), out=rounded)
    rounded &= U32(1)
    rounded += U32(0x7FFF)
    rounded += bits
    rounded >>= U32(16)
    out = rounded.astype(np.uint16)
    if flat.size and np.isnan(flat).any():
        is_nan = np.isnan(flat)
        out[is_nan] = ((bits[is_nan] >> 16) | 64).astype(np.uint16)
    return out.reshape(x.shape)


def _bf16(x: np.ndarray, _qw: Optional[np.ndarray]) -> np.ndarray:
    return to_bf16_bits(x).view(np.uint8).reshape(x.shape[0], -1)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns → float32: the bits become the high half of each float (widened and shifted
    a cache-sized chunk at a time)."""
    halves = np.ascontiguousarray(bits).view(np.uint16)
    out = np.empty(halves.shape, np.uint32)
    flat_in, flat_out = halves.reshape(-1), out.reshape(-1)
    for a in range(0, flat_in.size, DEQUANT_CHUNK_ELEMENTS):
        part = flat_out[a : a + DEQUANT_CHUNK_ELEMENTS]
        part[...] = flat_in[a : a + DEQUANT_CHUNK_ELEMENTS]
        part <<= 16
    return out.view(np.float32)


def f16_to_f32(bits: np.ndarray) -> np.ndarray:
    """fp16 bit patterns → float32 as ggml converts them (NaNs come out quiet), several times as fast
    as numpy's cast: the fp16 fields shifted into a float32 (the sign kept by widening as int16) are
    the value times 2**-112, which one exact multiplication undoes, subnormals included; only
    infinities and NaNs, whose exponent must become all ones, need a second look."""
    halves = np.ascontiguousarray(bits).view(np.uint16)
    out = np.empty(halves.shape, np.int32)
    flat_in, flat_out = halves.reshape(-1), out.reshape(-1)
    for a in range(0, flat_in.size, DEQUANT_CHUNK_ELEMENTS):
        src = flat_in[a : a + DEQUANT_CHUNK_ELEMENTS]
        part = flat_out[a : a + DEQUANT_CHUNK_ELEMENTS]
        part[...] = src.view(np.int16)
        part <<= 13
        part &= np.int32(-0x70000001)  # drop the sign's copies between the sign and the exponent
        part.view(np.float32)[...] *= np.float32(2.0**112)
        exponent = scratch("f16.exponent", src.shape, np.uint16)
        np.bitwise_and(src, np.uint16(0x7C00), out=exponent)
        if exponent.max() == 0x7C00:  # infinities and NaNs: all-ones exponent, NaNs quiet
            special = exponent == 0x7C00
            nan = special & ((src & np.uint16(0x03FF)) != 0)
            part.view(np.uint32)[special] |= np.uint32(0x7F800000)
            part.view(np.uint32)[nan] |= np.uint32(0x00400000)
    return out.view(np.float32)


def _rows(data: np.ndarray, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(data).view(dtype).reshape(data.shape[0], -1)


KERNELS = {
    T.F32: Kernel(_f32, lambda data, n: _rows(data, np.float32).copy()),
    T.F16: Kernel(_f16, lambda data, n: f16_to_f32(data).reshape(data.shape[0], -1)),
    T.BF16: Kernel(_bf16, lambda data, n: bf16_to_f32(data).reshape(data.shape[0], -1)),
}
