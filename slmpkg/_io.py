"""File output that never leaves a partial file behind: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
from typing import BinaryIO, Iterator, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_writes(paths: Sequence[PathLike]) -> Iterator[list[BinaryIO]]:
    """Open a temporary file beside each of ``paths``; when the block succeeds they all replace their
    targets, and on any error (including KeyboardInterrupt) they are removed and no target is touched.

    Example:
        >>> with atomic_writes(["a.bin", "b.bin"]) as (a, b):  # doctest: +SKIP
        ...     a.write(b"first"); b.write(b"second")
    """
    targets = [Path(p) for p in paths]
    temps = [t.with_name(f".{t.name}.{os.getpid()}.partial") for t in targets]
    files: list[BinaryIO] = []
    try:
        for tmp in temps:
            files.append(open(tmp, "wb"))
        yield files
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
    except BaseException:
        for f in files:
            f.close()
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def read_range(path: PathLike, offset: int, nbytes: int) -> np.ndarray:
    """``nbytes`` of ``path`` from ``offset`` into a fresh uint8 array.

    Readers hand out tensors this way rather than as memory-mapped views: a mapped page that was read
    stays in the process's resident set until the mapping goes, so converting a model through mmap
    grows RSS to the model's size, while a private buffer is freed as soon as its tensor is written.
    """
    out = np.empty(nbytes, np.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, done = memoryview(out), 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                from .errors import FormatError

                raise FormatError(f"{path}: truncated: {nbytes} bytes expected at offset {offset}, file ends first")
            done += n
    return out
