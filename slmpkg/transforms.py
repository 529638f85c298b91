"""Checkpoint → Checkpoint transforms. They decide and describe; data moves only when a writer asks.

Example:
    >>> from slmpkg.formats import gguf as gguf_format
    >>> from slmpkg.presets import QuantOptions
    >>> src = gguf_format.read("tiny-f16.gguf")                         # doctest: +SKIP
    >>> out, plan = quantize_checkpoint(src, QuantOptions("Q4_K_M"))    # doctest: +SKIP
    >>> gguf_format.write("tiny-Q4_K_M.gguf", out)                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from gguf import GGUFValueType as V

from .checkpoint import Checkpoint, LazyTensor, MetaValue
from .imatrix import ImportanceMatrix
from .parallel import WorkerPool
from .presets import (
    KEY_FILE_TYPE,
    KEY_QUANTIZATION_VERSION,
    QUANTIZATION_VERSION,
    QuantOptions,
    TensorInfo,
    file_type_for,
    llama_tensor_order,
    plan_tensor_types,
)
from .quant import QuantType

# llama.cpp's quantize tool records the importance matrix in these keys (values cut to 127 bytes)
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


@dataclass(frozen=True)
class TensorChange:
    """How one tensor is carried into the output."""

    name: str
    shape: tuple[int, ...]
    source_type: QuantType
    target_type: QuantType
    imatrix: bool

    @property
    def requantized(self) -> bool:
        return self.source_type is not self.target_type


def _c_string(text: str, limit: int = 127) -> str:
    """What ``strncpy(dst, src, 127)`` keeps: at most 127 bytes, never half a UTF-8 character."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def quantize_checkpoint(
    ckpt: Checkpoint,
    options: QuantOptions,
    imatrix: Optional[ImportanceMatrix] = None,
    threads: Optional[int] = None,
    imatrix_label: Optional[str] = None,
) -> tuple[Checkpoint, list[TensorChange]]:
    """Plan and describe the quantization of ``ckpt`` as llama.cpp's ``llama_model_quantize`` does it.

    Every check happens here, before any data moves: the planner's (re-quantization without
    ``options.allow_requantize``, rows a type cannot hold), importance-matrix sizes and values. The returned checkpoint's
    tensors are in llama.cpp's output order and quantize when their bytes are requested.
    ``imatrix_label`` is what ``quantize.imatrix.file`` records (default: the file's path).
    """
    if imatrix is not None:
        imatrix.check_finite()
        if not options.has_imatrix:
            options = dataclasses.replace(options, has_imatrix=True)
    by_name = {t.name: t for t in ckpt.tensors}
    order = llama_tensor_order(by_name)
    infos = [TensorInfo.from_numpy_shape(n, by_name[n].shape, by_name[n].qtype) for n in order]
    plain_metadata = {k: v.value for k, v in ckpt.metadata.items()}
    targets = plan_tensor_types(infos, plain_metadata, options)

    workers = WorkerPool.for_threads(threads)
    tensors: list[LazyTensor] = []
    changes: list[TensorChange] = []
    for name in order:
        src = by_name[name]
        target = targets[name]
        weights = None
        if target is not src.qtype:
            if imatrix is not None:
                weights = imatrix.for_tensor(name, src.shape)
            tensors.append(src.converted(target, weights, threads, workers))
        else:
            tensors.append(src)
        changes.append(TensorChange(name, src.shape, src.qtype, target, weights is not None))

    metadata = {k: v for k, v in ckpt.metadata.items()
                if k not in (KEY_QUANTIZATION_VERSION, KEY_FILE_TYPE) + _SPLIT_KEYS}
    metadata[KEY_QUANTIZATION_VERSION] = MetaValue(V.UINT32, QUANTIZATION_VERSION)
    metadata[KEY_FILE_TYPE] = MetaValue(V.UINT32, file_type_for(options))
    if imatrix is not None:
        label = imatrix_label if imatrix_label is not None else str(imatrix.path)
        for key in (KEY_IMATRIX_FILE, KEY_IMATRIX_DATASET, KEY_IMATRIX_ENTRIES, KEY_IMATRIX_CHUNKS):
            metadata.pop(key, None)
        metadata[KEY_IMATRIX_FILE] = MetaValue(V.STRING, _c_string(label))
        if imatrix.datasets:
            metadata[KEY_IMATRIX_DATASET] = MetaValue(V.STRING, _c_string(imatrix.datasets[0]))
        metadata[KEY_IMATRIX_ENTRIES] = MetaValue(V.UINT32, len(imatrix.values))
        if imatrix.chunk_count > 0:
            metadata[KEY_IMATRIX_CHUNKS] = MetaValue(V.UINT32, imatrix.chunk_count)
    return Checkpoint(metadata, tensors), changes
