"""The float types: F32 (as is), F16 (round to nearest even) and BF16 (ggml's rounding, quiet NaNs)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import Kernel
from ._common import DEQUANT_CHUNK_ELEMENTS


def _f32(x: np.ndarray, _qw: Optional[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint8).reshape(x.shape[0], -1)


def _f16(x: np.ndarray, _qw: Optional[np.ndarray]) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], -1)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns as ggml rounds them: nearest even, NaN kept quiet and signed."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    if is_nan.any():
        rounded[is_nan] = ((bits[is_nan] >> 16) | 64).astype(np.uint16)
    return rounded


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
        part = flat_out[a : a + DEQUANT_CHUNK_ELEMENTS]
        part[...] = flat_in[a : a + DEQUANT_CHUNK_ELEMENTS].view(np.int16)
        part <<= 13
        part &= np.int32(-0x70000001)  # drop the sign's copies between the sign and the exponent
        part.view(np.float32)[...] *= np.float32(2.0**112)
    if (halves & np.uint16(0x7FFF)).max(initial=0) >= 0x7C00:
        special = (halves & np.uint16(0x7C00)) == np.uint16(0x7C00)
        nan = special & ((halves & np.uint16(0x03FF)) != 0)
        out.view(np.uint32)[special] |= np.uint32(0x7F800000)
        out.view(np.uint32)[nan] |= np.uint32(0x00400000)
    return out.view(np.float32)


def _rows(data: np.ndarray, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(data).view(dtype).reshape(data.shape[0], -1)


KERNELS = {
    T.F32: Kernel(_f32, lambda data, n: _rows(data, np.float32).copy()),
    T.F16: Kernel(_f16, lambda data, n: f16_to_f32(data).reshape(data.shape[0], -1)),
    T.BF16: Kernel(_bf16, lambda data, n: bf16_to_f32(data).reshape(data.shape[0], -1)),
}
