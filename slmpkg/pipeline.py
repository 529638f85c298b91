"""File-level jobs: reader → transforms → writer, with progress and a result to report.

Example:
    >>> from slmpkg.pipeline import quantize_file
    >>> from slmpkg.presets import QuantOptions
    >>> result = quantize_file("tiny-f16.gguf", "tiny-Q4_K_M.gguf", QuantOptions("Q4_K_M"))  # doctest: +SKIP
    >>> result.output_bytes < result.input_bytes                                              # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ._progress import ProgressBar
from .errors import UsageError
from .imatrix import ImportanceMatrix
from .presets import QuantOptions
from .transforms import TensorChange, quantize_checkpoint

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class QuantizeResult:
    input: Path
    output: Path
    preset: str
    input_bytes: int
    output_bytes: int
    seconds: float
    tensors: list[TensorChange] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "preset": self.preset,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 3),
            "tensors": [
                {"name": c.name, "shape": list(c.shape), "from": c.source_type.name,
                 "to": c.target_type.name, "imatrix": c.imatrix}
                for c in self.tensors
            ],
        }


def quantize_file(
    src: PathLike,
    dst: PathLike,
    options: QuantOptions,
    imatrix: Optional[PathLike] = None,
    threads: Optional[int] = None,
    progress: Optional[bool] = None,
) -> QuantizeResult:
    """Quantize a GGUF file with a llama.cpp preset; the output matches ``llama-quantize`` byte for byte.

    ``progress``: None shows a bar only on a terminal. Nothing is written at ``dst`` on failure.
    """
    from .formats import gguf as gguf_format

    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise UsageError(f"{dst}: output would overwrite the input")
    start = time.monotonic()
    ckpt = gguf_format.read(src)
    matrix = ImportanceMatrix.load(imatrix) if imatrix is not None else None
    out, changes = quantize_checkpoint(
        ckpt, options, matrix, threads, imatrix_label=str(imatrix) if imatrix is not None else None
    )
    total = sum(t.nbytes for t in ckpt.tensors)
    with ProgressBar(total, f"quantize {options.preset.name}", enabled=progress) as bar:
        sizes = {t.name: t.nbytes for t in ckpt.tensors}
        size = gguf_format.write(dst, out, on_tensor=lambda t: bar.advance(sizes[t.name], t.name))
    return QuantizeResult(src, dst, options.preset.name, os.path.getsize(src), size, time.monotonic() - start, changes)
