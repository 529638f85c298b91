"""File output that never leaves a partial file behind: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
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


def sha256_file(path: PathLike) -> str:
    """The sha256 hex digest of a file, streamed in 1 MiB pieces.

    >>> sha256_file(__file__) == __import__("hashlib").sha256(open(__file__, "rb").read()).hexdigest()
    True
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(bytearray(1 << 20))
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (creating parents) and flush it to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_directory(directory: Path) -> None:
    """An output directory must not exist yet, or be empty (then it is replaced)."""
    from .errors import UsageError

    if directory.is_symlink():  # renaming onto it would replace the link, not fill what it points to
        raise UsageError(f"{directory}: is a symbolic link; give the real directory")
    if directory.is_dir():
        if any(directory.iterdir()):
            raise UsageError(f"{directory}: exists and is not empty; choose a new or empty directory")
    elif directory.exists():
        raise UsageError(f"{directory}: exists and is not a directory")


@contextlib.contextmanager
def atomic_directory(directory: PathLike) -> Iterator[Path]:
    """Build a directory in a hidden sibling (``.NAME.<pid>.<random>.partial``) and rename it onto
    ``directory`` when the block succeeds; on any error it is removed and ``directory`` is untouched.

    ``directory`` must not exist or be empty (checked before and again just before the rename:
    rename(2) replaces an empty directory atomically and refuses a non-empty one).

    Example:
        >>> with atomic_directory("out/model") as tmp:   # doctest: +SKIP
        ...     write_synced(tmp / "config.json", b"{}")
    """
    target = Path(os.path.abspath(directory))  # "out/", "." and the like get a real name and parent
    check_output_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (mkdtemp would make it 0700), so the result gets the usual umask permissions;
    # the random part keeps concurrent writers apart
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.partial"
    os.mkdir(tmp)
    try:
        yield tmp
        _fsync_dir(tmp)
        check_output_directory(target)  # again: something may have appeared while we wrote
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
