"""Block layouts of ggml's quantized types (``ggml-common.h``) as numpy structured dtypes.

A kernel fills a ``np.empty(n_blocks, BLOCK[t])`` field by field and returns its bytes; a
dequantizer views bytes as the same dtype. ``BLOCK[t].itemsize`` is the type's bytes per block.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

QK_K = 256

BLOCK: dict[T, np.dtype] = {
    T.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    T.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    T.Q5_0: np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    T.Q5_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    T.Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    T.Q2_K: np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")]),
    T.Q3_K: np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")]),
    T.Q4_K: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)]),
    T.Q5_K: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]),
    T.Q6_K: np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")]),
    T.IQ4_NL: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    T.IQ4_XS: np.dtype([("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "u1", 4), ("qs", "u1", 128)]),
}

# elements per block
BLOCK_ELEMENTS: dict[T, int] = {
    T.Q4_0: 32, T.Q4_1: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q8_0: 32, T.IQ4_NL: 32,
    T.Q2_K: QK_K, T.Q3_K: QK_K, T.Q4_K: QK_K, T.Q5_K: QK_K, T.Q6_K: QK_K, T.IQ4_XS: QK_K,
}


def as_bytes(blocks: np.ndarray, n_rows: int) -> np.ndarray:
    """A filled structured block array as uint8 ``[n_rows, row_bytes]``."""
    return blocks.view(np.uint8).reshape(n_rows, -1)


def as_blocks(data: np.ndarray, qtype: T) -> np.ndarray:
    """uint8 bytes (any shape, whole blocks) viewed as a flat structured block array."""
    return np.ascontiguousarray(data).reshape(-1).view(BLOCK[qtype])
