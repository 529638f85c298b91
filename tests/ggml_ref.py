"""ggml's own quantizer, loaded with ctypes from the ``libggml-base.so`` that llama-cpp-python ships.

This is the live reference the tests compare slmpkg's bytes against, beside the golden file.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np


def find_library() -> Optional[Path]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for name in ("libggml-base.so", "libggml-base.dylib"):
            candidate = Path(base) / "lib" / name
            if candidate.exists():
                return candidate
    return None


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class GGML:
    """A thin handle on ``ggml_quantize_chunk``, ``ggml_row_size`` and the types' ``to_float``."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    def quantize(self, x: np.ndarray, qtype: int, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        row = self.lib.ggml_row_size(int(qtype), n)
        out = np.zeros((rows, row), np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        self.lib.ggml_quantize_chunk(
            int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
            None if qw is None else qw.ctypes.data,
        )
        return out

    def dequantize(self, data: np.ndarray, qtype: int, shape: tuple[int, int]) -> np.ndarray:
        data = np.ascontiguousarray(data, dtype=np.uint8)
        out = np.empty(shape, np.float32)
        traits = self.lib.ggml_get_type_traits(int(qtype)).contents
        _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data, out.size)
        return out
