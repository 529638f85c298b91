"""File output that never leaves a partial file behind: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
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
