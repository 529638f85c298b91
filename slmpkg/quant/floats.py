"""The float types: F32 (as is), F16 (round to nearest even) and BF16 (ggml's rounding, quiet NaNs)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import Kernel


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
    """bf16 bit patterns → float32: the bits become the high half of each float (written as the odd
    uint16 of a zeroed little-endian uint32, about twice as fast as widening and shifting)."""
    halves = np.ascontiguousarray(bits).view(np.uint16)
    out = np.zeros(halves.shape, np.uint32)
    out.view(np.uint16).reshape(*halves.shape[:-1], -1)[..., 1::2] = halves
    return out.view(np.float32)


def _rows(data: np.ndarray, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(data).view(dtype).reshape(data.shape[0], -1)


KERNELS = {
    T.F32: Kernel(_f32, lambda data, n: _rows(data, np.float32).copy()),
    T.F16: Kernel(_f16, lambda data, n: _rows(data, np.float16).astype(np.float32)),
    T.BF16: Kernel(_bf16, lambda data, n: bf16_to_f32(data).reshape(data.shape[0], -1)),
}
