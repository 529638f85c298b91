"""Importance matrices in both of llama.cpp's file formats.

- GGUF (``llama-imatrix`` today): tensors ``NAME.in_sum2`` and ``NAME.counts`` (per expert), keys
  ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``. Values = sums / counts.
- legacy ``.dat``: ``int32 n``; per entry ``int32 len, name, int32 ncall, int32 nval, float[nval]``;
  optionally ``int32 chunks, int32 len, dataset``. Values = sums / ncall.

Normalization follows llama.cpp's quantize tool exactly (float32 division; a zero count gives 1).

Example:
    >>> im = ImportanceMatrix.load("imatrix.gguf")            # doctest: +SKIP
    >>> im.for_tensor("blk.0.attn_q.weight", (4096, 4096))    # doctest: +SKIP
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import FormatError, QuantizationError


@dataclass
class ImportanceMatrix:
    """Per-tensor importance, float32 ``[n_experts * n_per_row]`` keyed by tensor name."""

    values: dict[str, np.ndarray]
    path: Path
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ImportanceMatrix":
        path = Path(path)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise FormatError(f"{path}: cannot read importance matrix ({e.strerror or e})") from None
        if magic == b"GGUF":
            return cls._load_gguf(path)
        return cls._load_legacy(path)

    @classmethod
    def _load_gguf(cls, path: Path) -> "ImportanceMatrix":
        from .formats import gguf as gguf_format
        from .quant import QuantType

        ckpt = gguf_format.read(path)
        keys = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
        if any(k not in ckpt.metadata for k in keys):
            raise FormatError(f"{path}: imatrix GGUF lacks its metadata ({', '.join(keys)})")
        sums, counts = {}, {}
        for t in ckpt.tensors:
            if t.qtype is not QuantType.F32:
                raise FormatError(f"{path}: imatrix tensor {t.name} must be F32, not {t.qtype.name}")
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = t.float32().reshape(-1)
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = t.float32().reshape(-1)
        if not sums:
            raise FormatError(f"{path}: imatrix GGUF has no entries")
        values = {}
        for name, s in sums.items():
            if name not in counts:
                raise FormatError(f"{path}: imatrix entry {name} has sums but no counts")
            if counts[name].size == 0 or s.size % counts[name].size:
                raise FormatError(f"{path}: imatrix entry {name} has {s.size} sums for {counts[name].size} counts")
            with np.errstate(invalid="ignore"):
                c = np.rint(counts[name]).astype(np.int64)  # lround of non-negative counts
            per = s.reshape(c.size, -1)
            out = np.ones_like(per)
            live = c > 0
            out[live] = per[live] / c[live, None].astype(np.float32)
            values[name] = out.reshape(-1)
        datasets = list(ckpt.get("imatrix.datasets") or [])
        return cls(values, path, datasets, int(ckpt.get("imatrix.chunk_count", 0)))

    @classmethod
    def _load_legacy(cls, path: Path) -> "ImportanceMatrix":
        data = path.read_bytes()
        pos = 0

        def take(fmt: str) -> tuple:
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(data):
                raise FormatError(f"{path}: truncated importance matrix (at byte {pos})")
            out = struct.unpack_from(fmt, data, pos)
            pos += size
            return out

        (n_entries,) = take("<i")
        if n_entries < 1 or n_entries > 1_000_000:
            raise FormatError(f"{path}: not an importance matrix (GGUF or legacy .dat)")
        values = {}
        for _ in range(n_entries):
            (length,) = take("<i")
            if length < 0 or length > 4096:
                raise FormatError(f"{path}: not an importance matrix (bad entry name length {length})")
            name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
            ncall, nval = take("<ii")
            if nval < 1:
                raise FormatError(f"{path}: entry {name} has {nval} values")
            if pos + 4 * nval > len(data):
                raise FormatError(f"{path}: truncated importance matrix (entry {name}'s {nval} values at byte {pos})")
            sums = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
            pos += 4 * nval
            values[name] = sums / np.float32(ncall) if ncall > 0 else sums.copy()
        chunk_count, datasets = 0, []
        if pos < len(data):
            (chunk_count,) = take("<i")
            if pos + 4 <= len(data):
                (length,) = take("<i")
                if length > 0 and pos + length <= len(data):
                    datasets.append(take(f"<{length}s")[0].decode("utf-8", errors="replace"))
        return cls(values, path, datasets, chunk_count)

    def check_finite(self) -> None:
        for name, v in self.values.items():
            if not np.isfinite(v).all():
                raise QuantizationError(f"{self.path}: importance matrix for {name} has non-finite values")

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> Optional[np.ndarray]:
        """The entry for tensor ``name`` of numpy ``shape`` as ``[n_experts, n_per_row]``, or None.

        A size that does not match the tensor is an error, except for the token embedding, which
        llama.cpp quantizes without the matrix in that case.
        """
        v = self.values.get(name)
        if v is None:
            return None
        n_per_row = shape[-1]
        n_experts = shape[0] if len(shape) == 3 else 1
        if v.size != n_per_row * n_experts:
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None
            raise QuantizationError(
                f"{self.path}: importance matrix for {name} has {v.size} values; the tensor needs "
                f"{n_per_row * n_experts} ({n_experts} × {n_per_row})"
            )
        return v.reshape(n_experts, n_per_row)
