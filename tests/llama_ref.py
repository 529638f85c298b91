"""llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python), for byte comparisons."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

KV_INT, KV_FLOAT, KV_BOOL, KV_STR = 0, 1, 2, 3


def llama_quantize(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    pure: bool = False,
    leave_output_tensor: bool = False,
    output_tensor_type: Optional[int] = None,
    token_embedding_type: Optional[int] = None,
    allow_requantize: bool = False,
    imatrix: Optional[dict[str, np.ndarray]] = None,
    kv_overrides: Sequence[tuple[str, Union[int, str]]] = (),
    tensor_types: Sequence[tuple[str, int]] = (),
    nthread: int = 2,
) -> int:
    """Run llama.cpp's quantizer with the same knobs as ``slmpkg quantize``; returns its status (0 = ok)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    params.pure = pure
    params.quantize_output_tensor = not leave_output_tensor
    params.allow_requantize = allow_requantize
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type

    keep_alive: list[object] = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        keep_alive.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if kv_overrides:
        kvs = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
        for i, (key, value) in enumerate(kv_overrides):
            kvs[i].key = key.encode()
            if isinstance(value, str):
                kvs[i].tag = KV_STR
                kvs[i].value.val_str = value.encode()[:127]
            else:
                kvs[i].tag = KV_INT
                kvs[i].value.val_i64 = value
        keep_alive.append(kvs)
        params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if tensor_types:
        tts = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            raw = ctypes.create_string_buffer(pattern.encode())
            keep_alive.append(raw)
            tts[i].pattern = ctypes.cast(raw, ctypes.c_char_p)
            tts[i].type = qtype
        keep_alive.append(tts)
        params.tt_overrides = ctypes.cast(tts, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    return llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
