"""ggml-identical quantization in vectorized numpy.

``quantize`` turns float32 rows into the exact bytes ggml's ``ggml_quantize_chunk`` writes for the
same input; ``dequantize`` turns bytes back into float32. The quantizer knows arrays only: no files,
no tensor names (presets live in :mod:`slmpkg.presets`).

Example:
    >>> import numpy as np
    >>> from slmpkg import quant
    >>> w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    >>> q = quant.quantize(w, "Q4_K")
    >>> q.shape, q.dtype
    ((4, 144), dtype('uint8'))
    >>> float(np.abs(quant.dequantize(q, "Q4_K", w.shape) - w).max()) < 0.5
    True
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence, Union

import numpy as np
from gguf import GGMLQuantizationType as QuantType
from gguf.constants import GGML_QUANT_SIZES

from ..errors import QuantizationError

__all__ = [
    "QuantType",
    "Kernel",
    "quantize",
    "dequantize",
    "convert",
    "parse_type",
    "row_bytes",
    "bits_per_weight",
    "SUPPORTED_TYPES",
    "IMATRIX_TYPES",
]

QuantizeRows = Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray]
DequantizeRows = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class Kernel:
    """One ggml type's row kernels.

    ``quantize(x, imatrix)`` takes C-contiguous float32 ``[rows, n_per_row]`` and an importance matrix
    ``[n_per_row]`` or None, and returns uint8 ``[rows, row_bytes]``. ``dequantize(data, n_per_row)``
    is its inverse into float32 ``[rows, n_per_row]``. Rows are independent, so the dispatcher may
    hand a kernel any subset of rows (that is how it threads).
    """

    quantize: QuantizeRows
    dequantize: DequantizeRows
    uses_imatrix: bool = False
    # elements per work item when the kernel prefers other than CHUNK_ELEMENTS (search-heavy kernels
    # amortize their per-call overhead over bigger chunks)
    chunk_elements: Optional[int] = None


def _registry() -> dict[QuantType, Kernel]:
    from . import floats, iquants, kquants_affine, kquants_symmetric, legacy

    kernels: dict[QuantType, Kernel] = {}
    for module in (floats, legacy, kquants_affine, kquants_symmetric, iquants):
        kernels.update(module.KERNELS)
    return kernels


KERNELS: dict[QuantType, Kernel] = _registry()
SUPPORTED_TYPES: tuple[QuantType, ...] = tuple(sorted(KERNELS))
IMATRIX_TYPES: frozenset[QuantType] = frozenset(t for t, k in KERNELS.items() if k.uses_imatrix)

# Rows per work item are chosen so one item holds about this many elements (1 MiB of float32): big
# enough that numpy's per-call overhead, and threads waiting for the GIL between calls, fade;
# measured best for one and two threads on the legacy types (2^16 halved two-thread speed).
CHUNK_ELEMENTS = 1 << 18


def parse_type(qtype: Union[str, int, QuantType]) -> QuantType:
    """``"q4_k"``, ``"Q4_K"``, ``12`` or ``QuantType.Q4_K`` → ``QuantType.Q4_K``."""
    if isinstance(qtype, QuantType):
        return qtype
    try:
        if isinstance(qtype, str):
            return QuantType[qtype.strip().upper()]
        return QuantType(int(qtype))
    except (KeyError, ValueError):
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise QuantizationError(f"unknown quantization type {qtype!r} (supported: {names})") from None


def row_bytes(qtype: Union[str, QuantType], n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements."""
    t = parse_type(qtype)
    block, nbytes = GGML_QUANT_SIZES[t]
    return n_per_row // block * nbytes


def bits_per_weight(qtype: Union[str, QuantType]) -> float:
    block, nbytes = GGML_QUANT_SIZES[parse_type(qtype)]
    return 8.0 * nbytes / block


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="slmpkg-quant")


def _as_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    elif x.ndim > 2:
        x = x.reshape(-1, x.shape[-1])
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize(
    x: np.ndarray,
    qtype: Union[str, QuantType],
    imatrix: Optional[np.ndarray] = None,
    threads: Optional[int] = None,
) -> np.ndarray:
    """Quantize float rows to ggml blocks, byte-identical to ``ggml_quantize_chunk``.

    Args:
        x: ``[rows, n_per_row]`` (or 1-D, or N-D with rows along the last axis); cast to float32.
        qtype: a type of :data:`SUPPORTED_TYPES`, by enum, name or id.
        imatrix: per-column importance ``[n_per_row]``; used by the types ggml uses it for
            (:data:`IMATRIX_TYPES`), ignored by the others, as in ggml.
        threads: worker threads over row chunks (default: every core this process may use).

    Returns:
        uint8 ``[rows, row_bytes(qtype, n_per_row)]``.
    """
    t = parse_type(qtype)
    kernel = KERNELS.get(t)
    if kernel is None:
        names = ", ".join(k.name for k in SUPPORTED_TYPES)
        raise QuantizationError(f"cannot quantize to {t.name} (supported: {names})")
    rows = _as_rows(x)
    n_rows, n_per_row = rows.shape
    block = GGML_QUANT_SIZES[t][0]
    if n_per_row == 0 or n_per_row % block:
        raise QuantizationError(
            f"{t.name} needs rows whose length is a multiple of {block}; got rows of {n_per_row}"
        )
    qw = None
    if imatrix is not None and kernel.uses_imatrix:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.shape[0] != n_per_row:
            raise QuantizationError(
                f"importance matrix has {qw.shape[0]} values but rows have {n_per_row} columns"
            )
    out = np.empty((n_rows, row_bytes(t, n_per_row)), np.uint8)
    if n_rows == 0:
        return out
    step = max(1, (kernel.chunk_elements or CHUNK_ELEMENTS) // n_per_row)
    spans = [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]

    def work(span: tuple[int, int]) -> None:
        a, b = span
        # ggml lets huge scales overflow to inf in fp16 and casts NaN levels as x86 does: so do we, quietly
        with np.errstate(over="ignore", invalid="ignore"):
            out[a:b] = kernel.quantize(rows[a:b], qw)

    n_threads = threads or default_threads()
    if n_threads == 1 or len(spans) == 1:
        for span in spans:
            work(span)
    else:
        # list() re-raises the first worker exception here
        list(_pool(n_threads).map(work, spans))
    return out


def dequantize(data: np.ndarray, qtype: Union[str, QuantType], shape: Sequence[int]) -> np.ndarray:
    """ggml blocks (uint8) → float32 array of ``shape`` (rows along the last axis).

    Types without a kernel of ours (IQ2/IQ3/IQ1, TQ, MXFP4, ...) go through ``gguf.quants``.
    """
    t = parse_type(qtype)
    shape = tuple(int(s) for s in shape)
    n_per_row = shape[-1] if shape else 1
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    expected = n_rows * row_bytes(t, n_per_row)
    if raw.size != expected:
        raise QuantizationError(
            f"{t.name} data of shape {shape} needs {expected} bytes; got {raw.size}"
        )
    kernel = KERNELS.get(t)
    if kernel is not None:
        # as in C, NaN and infinite scales propagate quietly
        with np.errstate(over="ignore", invalid="ignore"):
            values = kernel.dequantize(raw.reshape(n_rows, -1), n_per_row)
    else:
        from gguf import quants as gguf_quants

        try:
            values = gguf_quants.dequantize(raw.reshape(n_rows, -1), t)
        except NotImplementedError:  # types ggml only computes with (Q8_1, Q8_K) or does not convert (I32, F64)
            raise QuantizationError(f"{t.name} data cannot be converted to float values") from None
    return np.asarray(values, dtype=np.float32).reshape(shape)


def convert(
    data: np.ndarray,
    src_type: Union[str, QuantType],
    dst_type: Union[str, QuantType],
    shape: Sequence[int],
    imatrix: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Stored bytes of ``src_type`` → ``dst_type`` blocks (``quantize(dequantize(...))``), on this thread.

    Rows go through float32 a kernel work item at a time, so the floats are quantized while they are
    still in the core's cache and no float32 copy of the whole input is ever made.

    Example:
        >>> import numpy as np
        >>> w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
        >>> q8 = quantize(w, "Q8_0")
        >>> convert(q8, "Q8_0", "Q4_0", w.shape).tobytes() == quantize(dequantize(q8, "Q8_0", w.shape), "Q4_0").tobytes()
        True
    """
    src, dst = parse_type(src_type), parse_type(dst_type)
    shape = tuple(int(s) for s in shape)
    n_per_row = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    src_row = row_bytes(src, n_per_row)
    if raw.size != n_rows * src_row:
        raise QuantizationError(f"{src.name} data of shape {shape} needs {n_rows * src_row} bytes; got {raw.size}")
    kernel = KERNELS.get(dst)
    step = max(1, ((kernel.chunk_elements if kernel else None) or CHUNK_ELEMENTS) // max(n_per_row, 1))
    if n_rows <= step:
        return quantize(dequantize(raw, src, (n_rows, n_per_row)), dst, imatrix=imatrix, threads=1)
    out = np.empty((n_rows, row_bytes(dst, n_per_row)), np.uint8)
    for a in range(0, n_rows, step):
        b = min(a + step, n_rows)
        values = dequantize(raw[a * src_row : b * src_row], src, (b - a, n_per_row))
        out[a:b] = quantize(values, dst, imatrix=imatrix, threads=1)
    return out
