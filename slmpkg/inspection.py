"""What is in a model file: architecture, metadata, and every tensor's shape, type and size.

Example:
    >>> from slmpkg.inspection import inspect_file
    >>> summary = inspect_file("tiny-Q4_K_M.gguf")   # doctest: +SKIP
    >>> summary.bits_per_weight                       # doctest: +SKIP
    5.1
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from gguf import GGUFValueType

from .checkpoint import Checkpoint, MetaValue
from .quant import bits_per_weight

__all__ = ["TensorSummary", "FileSummary", "MAX_LISTED_ITEMS", "summarize_value", "summarize", "inspect_file"]


@dataclass(frozen=True)
class TensorSummary:
    name: str
    shape: tuple[int, ...]
    type: str
    bits_per_weight: float
    nbytes: int


@dataclass(frozen=True)
class FileSummary:
    path: Path
    format: str
    architecture: Optional[str]
    metadata: dict[str, Any]
    tensors: list[TensorSummary]
    file_size: int

    @property
    def n_parameters(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        n = self.n_parameters
        return 8.0 * self.tensor_bytes / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "architecture": self.architecture,
            "file_size": self.file_size,
            "n_parameters": self.n_parameters,
            "tensor_bytes": self.tensor_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "metadata": self.metadata,
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "type": t.type,
                 "bits_per_weight": t.bits_per_weight, "nbytes": t.nbytes}
                for t in self.tensors
            ],
        }


# arrays longer than this are summarized (a vocabulary has 100k+ entries)
MAX_LISTED_ITEMS = 16


def summarize_value(item: MetaValue) -> Any:
    """A JSON-friendly form of a metadata value; long arrays become ``{item_type, length}``."""
    value = item.value
    if item.type is GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))  # the shortest decimal that is this float32
    if item.item_type is not None:
        if len(value) > MAX_LISTED_ITEMS:
            return {"item_type": item.item_type.name, "length": len(value)}
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value


def summarize(path: Path, fmt: str, ckpt: Checkpoint) -> FileSummary:
    tensors = [
        TensorSummary(t.name, t.shape, t.qtype.name, bits_per_weight(t.qtype), t.nbytes) for t in ckpt.tensors
    ]
    metadata = {k: summarize_value(v) for k, v in ckpt.metadata.items()}
    return FileSummary(path, fmt, ckpt.architecture, metadata, tensors, os.path.getsize(path))


def inspect_file(path: Union[str, os.PathLike]) -> FileSummary:
    """Summarize a model file (GGUF today)."""
    from .formats import gguf as gguf_format

    path = Path(path)
    return summarize(path, "gguf", gguf_format.read(path))
