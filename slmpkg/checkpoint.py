"""The format-neutral model: typed metadata plus an ordered list of lazy tensors.

Readers produce a :class:`Checkpoint`, transforms map one to another without touching data, and
writers pull one tensor at a time, so a whole model is never in memory.

Example:
    >>> import numpy as np
    >>> from slmpkg.checkpoint import LazyTensor
    >>> from slmpkg.quant import QuantType
    >>> t = LazyTensor.from_array("w", np.ones((2, 32), np.float32))
    >>> t.shape, t.qtype.name, t.nbytes
    ((2, 32), 'F32', 256)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
from gguf import GGUFValueType

from . import quant
from .quant import QuantType

if TYPE_CHECKING:
    from .parallel import Placement, WorkerPool


@dataclass(frozen=True)
class MetaValue:
    """One typed metadata value (GGUF's value types); arrays carry their item type.

    Number arrays are numpy arrays; string arrays are sequences of ``str`` (a list, or the
    read-only ``StringArray`` the GGUF reader gives, decoded on first use).
    """

    type: GGUFValueType
    value: Any
    item_type: Optional[GGUFValueType] = None


# float32 bytes converted at a time by LazyTensor.converted
SLAB_BYTES = 32 << 20


@dataclass(frozen=True)
class LazyTensor:
    """A tensor whose bytes are produced only when asked for.

    ``shape`` is numpy order (rows first, the contiguous row length last, i.e. ggml's ``ne`` reversed).
    ``raw()`` returns the stored bytes (uint8, ``nbytes`` long) in ``qtype``'s layout. Two optional
    loaders let big tensors move in pieces: ``read(offset, nbytes)`` returns part of the stored bytes
    (file readers provide it), ``pieces()`` yields the stored bytes in order (conversions provide it);
    writers consume :meth:`iter_bytes`, so a conversion never holds a whole tensor.
    """

    name: str
    shape: tuple[int, ...]
    qtype: QuantType
    raw: Callable[[], np.ndarray] = field(repr=False, compare=False)
    read: Optional[Callable[[int, int], np.ndarray]] = field(default=None, repr=False, compare=False)
    pieces: Optional[Callable[[], Iterator[np.ndarray]]] = field(default=None, repr=False, compare=False)
    # ``(path, offset)`` when the stored bytes are exactly ``nbytes`` bytes of that file from that
    # offset: another process can read them itself, and a writer can copy them file to file
    region: Optional[tuple[str, int]] = field(default=None, repr=False, compare=False)
    # ``placer(path, offset)`` starts writing the stored bytes into the file ``path`` at ``offset``
    # elsewhere (worker processes) and returns a Placement to wait on; writers that lay out a file use it
    placer: Optional[Callable[[str, int], "Placement"]] = field(default=None, repr=False, compare=False)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        n_per_row = self.shape[-1] if self.shape else 1
        if n_per_row == 0:
            return 0
        return self.n_elements // n_per_row * quant.row_bytes(self.qtype, n_per_row)

    def float32(self) -> np.ndarray:
        """The values as float32 in ``shape`` (dequantized when stored quantized)."""
        return quant.dequantize(self.raw(), self.qtype, self.shape)

    def byte_range(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of the stored bytes from ``offset``, read alone when the source can."""
        if self.read is not None:
            return self.read(offset, nbytes)
        return np.asarray(self.raw()).reshape(-1)[offset : offset + nbytes]

    def iter_bytes(self) -> Iterator[np.ndarray]:
        """The stored bytes, in order, in as many pieces as the tensor was made in."""
        if self.pieces is not None:
            yield from self.pieces()
        else:
            yield self.raw()

    def renamed(self, name: str) -> "LazyTensor":
        """The same tensor (and loaders) under another name."""
        return dataclasses.replace(self, name=name)

    def converted(
        self,
        qtype: QuantType,
        imatrix: Optional[np.ndarray] = None,
        threads: Optional[int] = None,
        workers: Optional["WorkerPool"] = None,
    ) -> "LazyTensor":
        """This tensor stored as ``qtype`` (a cast or a quantization), still lazy.

        Rows are converted in slabs of about :data:`SLAB_BYTES` of float32, so the memory a
        conversion needs beyond its output is one slab, not a float32 copy of the whole tensor.
        ``imatrix`` is ``[n_experts, n_per_row]`` (one row of importance per expert of a 3-D tensor).
        With ``workers`` and a file-backed source (``region``), the result can also be placed: worker
        processes convert slabs and write them straight into the output file.
        """
        if qtype is self.qtype and imatrix is None:
            return self
        src = self
        n_per_row = self.shape[-1] if self.shape else 1
        n_rows = self.n_elements // n_per_row if n_per_row else 0
        rows_per_expert = n_rows // imatrix.shape[0] if imatrix is not None else n_rows
        src_row = quant.row_bytes(self.qtype, n_per_row)
        dst_row = quant.row_bytes(qtype, n_per_row)

        def spans(elements: int) -> Iterator[tuple[int, int, Optional[np.ndarray]]]:
            """Row ranges of about ``elements`` each, with their importance; a range never straddles
            two experts, so it has one importance vector."""
            step = max(1, elements // max(n_per_row, 1))
            start = 0
            while start < n_rows:
                stop = min(start + step, n_rows, (start // rows_per_expert + 1) * rows_per_expert)
                yield start, stop, None if imatrix is None else imatrix[start // rows_per_expert]
                start = stop

        def slabs() -> Iterator[np.ndarray]:
            for start, stop, weights in spans(SLAB_BYTES // 4):
                stored = src.byte_range(start * src_row, (stop - start) * src_row)
                values = quant.dequantize(stored, src.qtype, (stop - start, n_per_row))
                yield quant.quantize(values, qtype, imatrix=weights, threads=threads).reshape(-1)

        def produce() -> np.ndarray:
            out = np.empty(n_rows * dst_row, np.uint8)
            done = 0
            for piece in slabs():
                out[done : done + piece.size] = piece
                done += piece.size
            return out

        def place(path: str, offset: int) -> "Placement":
            from .parallel import JOB_ELEMENTS, Placement, RowJob

            assert workers is not None and src.region is not None
            src_path, src_base = src.region
            futures = [
                workers.submit(RowJob(
                    src_path, src_base + start * src_row, (stop - start) * src_row, src.qtype,
                    stop - start, n_per_row, qtype, weights, path, offset + start * dst_row,
                ))
                for start, stop, weights in spans(JOB_ELEMENTS)
            ]
            return Placement(futures, n_rows * dst_row)

        placeable = workers is not None and src.region is not None
        return LazyTensor(self.name, self.shape, qtype, produce, pieces=slabs, placer=place if placeable else None)

    @staticmethod
    def from_array(name: str, array: np.ndarray) -> "LazyTensor":
        """Wrap an in-memory float32/float16 array (tests and small tensors)."""
        kinds = {np.dtype(np.float32): QuantType.F32, np.dtype(np.float16): QuantType.F16}
        qtype = kinds[array.dtype]
        data = np.ascontiguousarray(array).reshape(array.shape)  # keep 0-d arrays 0-d
        return LazyTensor(name, tuple(data.shape), qtype, lambda: data.reshape(-1).view(np.uint8))


@dataclass
class Checkpoint:
    """Metadata (ordered, typed) and tensors (ordered); ``sidecar`` holds the files that travel beside
    the weights (config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, tokenizer.model, chat_template.jinja, ...) as bytes, by relative name."""

    metadata: dict[str, MetaValue]
    tensors: list[LazyTensor]
    sidecar: dict[str, bytes] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value by key, unwrapped."""
        item = self.metadata.get(key)
        return default if item is None else item.value

    @property
    def architecture(self) -> Optional[str]:
        return self.get("general.architecture")
