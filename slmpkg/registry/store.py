"""The small key/value interface every registry backend implements.

Keys are POSIX relative paths (``blobs/sha256/ab12...``, ``indexes/tiny-llama/1.0.json``). Values are
bytes. A store gives four guarantees the registry builds on:

- a reader never sees a partial value: every write becomes visible whole or not at all;
- :meth:`Store.put_if_absent` creates a key only when it does not exist (immutable blobs);
- :meth:`Store.compare_and_swap` replaces a key only when its etag is still the one read (indexes, tags);
- blobs stream: :meth:`Store.put_file` / :meth:`Store.open_blob_writer` upload with a sha256 check,
  :meth:`Store.read_range` / :meth:`Store.download` read them back in pieces, and
  :func:`fetch_resumable` downloads one into a local file in ranges that survive an interruption.

Example:
    >>> from slmpkg.registry import open_store                  # doctest: +SKIP
    >>> store = open_store("/tmp/reg")                           # doctest: +SKIP
    >>> store.put_if_absent("a/b", b"hello")                     # doctest: +SKIP
    True
    >>> data, etag = store.get_with_etag("a/b")                  # doctest: +SKIP
    >>> store.compare_and_swap("a/b", etag, b"bye")              # doctest: +SKIP
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from slmpkg._threads import results, wait, worker_pool

from .errors import IntegrityError, StoreError

__all__ = ["BlobWriter", "FetchStats", "Progress", "Store", "check_key", "fetch_resumable", "fsync_dir", "parallel_map"]

#: ``progress(n)``: ``n`` more bytes moved. Called from worker threads, one call at a time.
Progress = Callable[[int], None]

CHUNK = 1 << 20


def check_key(key: str) -> str:
    """Return ``key`` if it is a clean relative POSIX path whose components do not start with ``.``
    (the local store keeps its temporary files and locks under dot-names), else raise.

    Example:
        >>> check_key("blobs/sha256/00")
        'blobs/sha256/00'
    """
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StoreError(f"invalid store key {key!r}")
    for part in key.split("/"):
        if not part or part.startswith("."):
            raise StoreError(f"invalid store key {key!r}: empty or dot-prefixed component")
    return key


class BlobWriter:
    """Stream bytes into a blob: ``with store.open_blob_writer(key, sha256) as w: w.write(chunk)``.

    The bytes are spooled to a local temporary file while hashed; on a clean exit the digest is checked
    against ``sha256`` (when given) and the file is handed to :meth:`Store.put_file`. Nothing becomes
    visible on error. ``created`` tells afterwards whether the key was new.
    """

    def __init__(self, store: Store, key: str, sha256: str | None, spool_dir: str | None = None):
        self.store, self.key, self.expected = store, check_key(key), sha256
        self._h = hashlib.sha256()
        self.size = 0
        self.created: bool | None = None
        self._f: BinaryIO = tempfile.NamedTemporaryFile(prefix=".blob-", suffix=".partial", dir=spool_dir, delete=False)

    def write(self, data: bytes | memoryview) -> int:
        self._h.update(data)
        self.size += len(data)
        return self._f.write(data)

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._f.close()
            if exc_type is None:
                if self.expected is not None and self.sha256 != self.expected:
                    raise IntegrityError(
                        f"{self.store.url}/{self.key}: written bytes hash to sha256:{self.sha256[:16]}, "
                        f"expected sha256:{self.expected[:16]}"
                    )
                self.created = self.store.put_file(self.key, self._f.name, sha256=self.sha256, if_absent=True)
        finally:
            try:
                os.unlink(self._f.name)
            except FileNotFoundError:
                pass


class Store(abc.ABC):
    """A flat key/value store with atomic writes, create-only writes and compare-and-swap."""

    #: Where the store lives, for messages (``/path/to/registry``, ``s3://bucket/prefix``); no secrets.
    url: str = ""
    #: Range size :func:`fetch_resumable` reads a blob in (also the unit an interrupted pull keeps).
    range_size: int = 64 << 20
    #: How many ranges of one blob :func:`fetch_resumable` reads at once; a backend whose
    #: :meth:`read_range_into` is thread-safe and gains from parallel requests raises it.
    range_concurrency: int = 1
    #: Blobs above this size are uploaded by :meth:`put_file` in parallel parts (S3 multipart), so a
    #: caller uploads them one at a time, from its own thread (where Ctrl-C and SIGTERM land, and stop
    #: the parts promptly). None: the store never splits an upload.
    multipart_threshold: int | None = None

    # ---- small values -----------------------------------------------------------------------------

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The value of ``key``; :class:`~slmpkg.registry.errors.NotFoundError` when absent."""

    @abc.abstractmethod
    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """``(value, etag)``; the etag is what :meth:`compare_and_swap` expects."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Create or replace ``key`` atomically."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` unless it exists; True when this call created it."""

    @abc.abstractmethod
    def compare_and_swap(self, key: str, expected_etag: str | None, data: bytes) -> str:
        """Replace ``key`` only if its etag is still ``expected_etag`` (``None``: only if it does not
        exist); return the new etag, or raise :class:`~slmpkg.registry.errors.ConflictError`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error when it is already gone."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    # ---- blobs ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Bytes in ``key``."""

    @abc.abstractmethod
    def mtime(self, key: str) -> float:
        """When ``key`` was last written or touched (unix seconds); the garbage collector's clock."""

    @abc.abstractmethod
    def touch(self, key: str) -> None:
        """Refresh :meth:`mtime`, so a blob an in-flight push reuses survives a concurrent gc."""

    def delete_if_stale(self, key: str, cutoff: float) -> bool:
        """Delete ``key`` only if it was last written or touched before ``cutoff`` (unix seconds);
        True when deleted. gc calls this so that a blob a push touched after gc listed it survives.

        This default checks and then deletes, leaving a window of one request in which a touch is
        missed; a store that can make the two one step (the local store holds the key's lock, the Hub
        deletes in a commit whose parent is the one it checked) overrides it."""
        if self.mtime(key) > cutoff:
            return False
        self.delete(key)
        return True

    @abc.abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``key``."""

    def read_range_into(self, key: str, start: int, buf: memoryview) -> None:
        """Fill ``buf`` with bytes ``[start, start + len(buf))`` of ``key``; a short read is an error.
        Backends override this to read straight into ``buf``."""
        data = self.read_range(key, start, start + len(buf))
        if len(data) != len(buf):
            raise IntegrityError(f"{self.url}/{key}: got {len(data)} bytes at offset {start}, expected {len(buf)}")
        buf[:] = data

    @abc.abstractmethod
    def put_file(
        self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None, if_absent: bool = True,
        progress: Progress | None = None,
    ) -> bool:
        """Upload a local file to ``key`` (create-only when ``if_absent``), checking ``sha256`` on the
        way when the backend can; True when the key was created."""

    def clean_incomplete(self, older_than: float, *, dry_run: bool = False) -> int:
        """Remove what interrupted writes left behind (temporary files, incomplete multipart uploads)
        and that is older than ``older_than`` seconds; return how many (counted only, with
        ``dry_run``). A store whose writes leave nothing behind keeps this default."""
        return 0

    def open_blob_writer(self, key: str, sha256: str | None = None) -> BlobWriter:
        """A :class:`BlobWriter` that creates ``key`` (if absent) from the bytes written to it."""
        return BlobWriter(self, key, sha256)

    def download(self, key: str, f: BinaryIO, *, size: int | None = None, progress: Progress | None = None) -> int:
        """Copy ``key`` into the open binary file ``f`` from its current position; return the bytes
        copied. Backends override this with parallel ranged reads."""
        total = self.size(key) if size is None else size
        done = 0
        while done < total:
            chunk = self.read_range(key, done, min(total, done + 8 * CHUNK))
            if not chunk:
                break
            f.write(chunk)
            done += len(chunk)
            if progress:
                progress(len(chunk))
        return done

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


@dataclasses.dataclass(frozen=True)
class FetchStats:
    """What :func:`fetch_resumable` did: the sha256 of the whole file, bytes read from the store in
    this call, bytes kept from an earlier interrupted call, and how many ranged reads it made."""

    sha256: str
    size: int
    fetched_bytes: int
    resumed_bytes: int
    ranges: int


_LEDGER_MAGIC = "slmpkg-ranges 1"


def _read_ledger(ledger: Path, partial: Path, size: int, range_size: int) -> set[int] | None:
    """Indexes of the ranges an earlier fetch completed, or None when there is nothing usable."""
    try:
        lines = ledger.read_text("ascii").split("\n")
        if lines[0] != f"{_LEDGER_MAGIC} {size} {range_size}" or partial.stat().st_size != size:
            return None
    except (OSError, UnicodeDecodeError):
        return None
    n = -(-size // range_size)
    # The last element is "" after the final newline, or a torn line a killed writer left: skip it.
    return {int(x) for x in lines[1:-1] if x.isdigit() and int(x) < n}


def fetch_resumable(
    store: Store, key: str, size: int, partial: str | os.PathLike[str], *, progress: Progress | None = None,
    slots: threading.Semaphore | None = None, cancel: threading.Event | None = None,
) -> FetchStats:
    """Download ``key`` (``size`` bytes) into the local file ``partial`` and return its sha256.

    The blob is read in ranges of ``store.range_size``, ``store.range_concurrency`` at a time, each
    straight into its place in ``partial`` (the file is memory-mapped, so a range goes from the HTTP
    client into the page cache with no buffer of ours in between, and is hashed from there) and then
    recorded in a ledger beside the file (``<partial>.ranges``). If an earlier call was interrupted (server gone, process killed,
    Ctrl-C), the ranges it recorded are kept and only the missing ones are read. Meanwhile the
    calling thread hashes the file in order, each range as soon as it has landed, so the digest is
    ready when the last range is. The caller checks it, renames ``partial`` into place and removes
    the ledger; it must hold a lock so that one process at a time fetches a given ``partial``. The
    first failure stops the ranges not yet started and is raised once the running ones return.

    Nothing is fsynced: a range recorded in the ledger but lost with the page cache (power loss)
    makes the digest check fail, and the caller then starts over.

    Several blobs can be fetched at once sharing ``slots`` (at most that many ranges in flight in
    all), so the next blob's ranges keep the connections busy while this one's last ranges are
    hashed; ``cancel``, once set, stops ranges not yet started (an interrupt in the caller's thread).

    Example:
        >>> st = fetch_resumable(store, "blobs/sha256/ab..", 1 << 30, cache / "tmp" / "ab...x1y2.partial")  # doctest: +SKIP
        >>> st.sha256 == "ab.." and st.fetched_bytes + st.resumed_bytes == st.size                   # doctest: +SKIP
        True
    """
    partial = Path(partial)
    ledger = partial.with_name(partial.name + ".ranges")
    rs = max(1, int(store.range_size))
    n = -(-size // rs)
    done = _read_ledger(ledger, partial, size, rs)
    if done is None:  # start over: a sparse file of the right size and an empty ledger
        done = set()
        try:
            with open(partial, "wb") as f:
                f.truncate(size)
        except OSError as e:  # a size the file system cannot hold (a manifest's claim, or a full disk)
            raise StoreError(f"{partial}: cannot hold a blob of {size} bytes ({e.strerror or e})") from None
        ledger.write_text(f"{_LEDGER_MAGIC} {size} {rs}\n", "ascii")
    if size == 0:
        return FetchStats(hashlib.sha256().hexdigest(), 0, 0, 0, 0)
    missing = [i for i in range(n) if i not in done]
    h = hashlib.sha256()
    fetched = resumed = 0
    stop = threading.Event()
    with open(partial, "r+b") as f, open(ledger, "ab", buffering=0) as log:
        mm = mmap.mmap(f.fileno(), size)
        view = memoryview(mm)

        def fetch(i: int) -> None:
            with slots or contextlib.nullcontext():
                if stop.is_set() or (cancel is not None and cancel.is_set()):
                    raise concurrent.futures.CancelledError
                try:
                    store.read_range_into(key, i * rs, view[i * rs: min(size, (i + 1) * rs)])
                except BaseException:
                    stop.set()  # a dead server fails every range: do not start the others
                    raise
            log.write(f"{i}\n".encode("ascii"))  # O_APPEND, unbuffered: one write, one whole line

        pool = worker_pool(min(int(store.range_concurrency), len(missing) or 1), "slmpkg-range")
        futures = {i: pool.submit(fetch, i) for i in missing}
        try:
            for i in range(n):
                start, end = i * rs, min(size, (i + 1) * rs)
                fu = futures.get(i)
                if fu is None:
                    resumed += end - start
                else:
                    wait(fu)  # in slices: an interrupt of this thread is not held up by a long range
                    if fu.cancelled() or fu.exception() is not None:
                        raise _first_failure(futures.values()) or fu.exception()
                    fetched += end - start
                h.update(view[start:end])
                if progress:
                    progress(end - start)
        finally:
            stop.set()
            # Ranges in flight finish (and are recorded) or fail; none is recorded half-written.
            pool.shutdown(wait=True, cancel_futures=True)
            try:
                view.release()
                mm.close()
            except BufferError:
                pass  # a failed range's traceback still holds a slice; the mapping goes with it
    return FetchStats(h.hexdigest(), size, fetched, resumed, len(missing))


def _first_failure(futures) -> BaseException | None:
    """The error that stopped the others (a range it cancelled only reports CancelledError)."""
    for f in futures:
        if f.done() and not f.cancelled():
            e = f.exception()
            if e is not None and not isinstance(e, concurrent.futures.CancelledError):
                return e
    return None


def parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], max_workers: int, *, cancel: threading.Event | None = None
) -> list[Any]:
    """``[fn(x) for x in items]`` on up to ``max_workers`` threads. The first failure cancels what has
    not started (a dead server should fail the command once, not once per remaining file) and is
    raised after the running calls return. A failure, or an interrupt of the calling thread (Ctrl-C,
    SIGTERM: raised there, never in the workers), also sets ``cancel``, which long calls watch.

    Example:
        >>> parallel_map(lambda x: x * 2, [1, 2, 3], 2)
        [2, 4, 6]
    """
    items = list(items)
    if not items:
        return []
    pool = worker_pool(min(max_workers, len(items)))
    try:
        futures = [pool.submit(fn, x) for x in items]
        return results(futures)
    except BaseException:
        if cancel is not None:
            cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries to disk: a rename or link into it survives a power cut only once
    the directory itself is synced (the file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_home() -> Path:
    """``$SLMPKG_HOME`` or ``~/.slmpkg``."""
    return Path(os.environ.get("SLMPKG_HOME") or Path.home() / ".slmpkg")
