"""The client's content-addressed blob cache (default ``$SLMPKG_HOME/cache``).

``blobs/sha256/<hex>`` holds blobs whose digest matched, read-only (pulled files are hard links to
them). A download goes to ``tmp/`` first (a private directory, mode 0700), into a file with a random
name (``<hex>.<random>.partial``, made by ``mkstemp``) and its range ledger, in ranges an interrupted
pull keeps (see :func:`~slmpkg.registry.store.fetch_resumable`); the blob enters ``blobs/`` only once
its digest matched, by a rename followed by an fsync of the directory. ``tmp/<hex>.lock`` serializes
the pulls of one blob; partial downloads nobody touched for :data:`STALE_PARTIAL_AGE` are pruned.

Example:
    >>> got = fetch_blob(store, "sha256:ab..", 1 << 30, Path("~/.slmpkg/cache"), verify_cache=True, progress=None)  # doctest: +SKIP
    >>> got.path                                                                          # doctest: +SKIP
    PosixPath('/home/me/.slmpkg/cache/blobs/sha256/ab..')
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import functools
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from slmpkg._io import sha256_file

from .errors import IntegrityError, RegistryError, StoreError
from .names import blob_key
from .store import FetchStats, Progress, Store, fetch_resumable, fsync_dir

__all__ = ["STALE_PARTIAL_AGE", "Fetched", "fetch_blob", "file_lock", "prune_partials"]

#: A partial download untouched for this long is abandoned: the next pull removes it.
STALE_PARTIAL_AGE = dt.timedelta(days=7)


def _open_lock(path: Path, blocking: bool) -> int | None:
    """An fd holding an exclusive ``flock`` on ``path`` (created if missing, never through a symlink),
    or None when ``blocking`` is False and someone else holds it. Lock files may be unlinked by their
    holder when done, so after locking the path must still name the locked file; else lock again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            held = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file we locked was removed (or replaced) meanwhile: lock the current one


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (created if missing), held for the ``with`` block; the
    holder may unlink ``path`` while holding it."""
    fd = _open_lock(path, blocking=True)
    try:
        yield
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Fetched:
    path: Path
    fetched: int  # bytes read from the store by this pull
    resumed: int  # bytes kept from an interrupted earlier pull
    cached: bool  # the blob was already complete in the cache


def _tmpdir(cache: Path) -> Path:
    """``cache/tmp``, private: ours, a real directory, no access for others (also when an older
    slmpkg made it)."""
    tmpdir = cache / "tmp"
    tmpdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(tmpdir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RegistryError(f"{tmpdir}: not a directory of this user; refusing to download into it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(tmpdir, 0o700)
    return tmpdir


def _own_file(p: Path) -> bool:
    """A regular file of ours (not a symlink or something another user put there)."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def _partials(tmpdir: Path, hexd: str) -> list[Path]:
    """The partial downloads of blob ``hexd``, most recently active first."""
    found = [p for p in tmpdir.glob(f"{hexd}.*.partial") if _own_file(p)]
    return sorted(found, key=lambda p: -_last_activity(p))


def _last_activity(partial: Path) -> float:
    """When a partial download last made progress: its ledger gets a line per range."""
    times = []
    for p in (partial, _ledger(partial)):
        with contextlib.suppress(FileNotFoundError):
            times.append(os.lstat(p).st_mtime)
    return max(times, default=0.0)


def _ledger(partial: Path) -> Path:
    return partial.with_name(partial.name + ".ranges")


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def fetch_blob(
    store: Store, digest: str, size: int, cache: Path, *, verify_cache: bool, progress: Progress | None,
    slots: threading.Semaphore | None = None, cancel: threading.Event | None = None,
) -> Fetched:
    """Make ``cache/blobs/sha256/<hex>`` hold the verified blob.

    The download goes to ``cache/tmp/<hex>.<random>.partial`` with a ledger of the ranges it holds
    (:func:`~slmpkg.registry.store.fetch_resumable`), so a pull interrupted by a dead server, a
    network failure, Ctrl-C or SIGTERM keeps what it fetched and the next pull reads only the rest.
    The digest is checked before the file is renamed into the cache. A lock per blob lets concurrent
    pulls (threads or processes) share one cache. ``slots`` and ``cancel`` go to
    :func:`~slmpkg.registry.store.fetch_resumable` (blobs fetched side by side).
    """
    hexd = digest.removeprefix("sha256:")
    key = blob_key(digest)
    path = cache / "blobs" / "sha256" / hexd

    def cached() -> bool:
        if path.is_file() and not path.is_symlink():
            if path.stat().st_size == size and (not verify_cache or sha256_file(path) == hexd):
                return True
            path.unlink()  # corrupt cache entry: fetch again
        return False

    if cached():
        return Fetched(path, 0, 0, True)
    tmpdir = _tmpdir(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = tmpdir / f"{hexd}.lock"
    with file_lock(lock):
        try:
            return _fetch_locked(store, key, hexd, size, path, tmpdir, cached,
                                 functools.partial(fetch_resumable, progress=progress, slots=slots, cancel=cancel))
        finally:
            # Done, or stopped: what a later pull resumes from is the partial and its ledger. A pull
            # waiting on this lock, or opening a new lock file, then finds the blob cached or resumes.
            _remove(lock)


def _fetch_locked(store: Store, key: str, hexd: str, size: int, path: Path, tmpdir: Path,
                  cached: Callable[[], bool], fetch: Callable[..., FetchStats]) -> Fetched:
    """:func:`fetch_blob` once it holds the blob's lock."""
    if cached():  # another pull finished it while we waited for the lock
        return Fetched(path, 0, 0, True)
    earlier = _partials(tmpdir, hexd)
    for extra in earlier[1:]:  # one partial per blob is enough: keep the most recent
        _remove(extra, _ledger(extra))
    if earlier:
        partial = earlier[0]
    else:
        fd, name = tempfile.mkstemp(prefix=f"{hexd}.", suffix=".partial", dir=tmpdir)
        os.close(fd)
        partial = Path(name)
    ledger = _ledger(partial)
    fetched = resumed = 0
    for attempt in range(2):
        try:
            st = fetch(store, key, size, partial)
        except StoreError as e:
            kept = _ranges_kept(ledger, size)
            hint = f"; {kept / 1e6:.1f} of {size / 1e6:.1f} MB kept, rerun to resume" if kept else ""
            raise type(e)(f"{e}{hint}") from None
        fetched += st.fetched_bytes
        resumed += st.resumed_bytes
        if st.sha256 == hexd:
            break
        # Throw the bytes away: a resumed range may be stale (a file system that lost a write);
        # one more full download tells a bad store from a bad partial file.
        _remove(ledger)
        if attempt or not st.resumed_bytes:
            _remove(partial)
            raise IntegrityError(
                f"{store.url}/{key}: blob does not match its digest (got sha256:{st.sha256[:16]}, "
                f"expected {size} bytes sha256:{hexd[:16]}); refusing it"
            )
        resumed = 0
    os.chmod(partial, 0o444)  # hard-linked into outputs: make in-place edits fail loudly
    os.replace(partial, path)
    fsync_dir(path.parent)
    _remove(ledger)
    return Fetched(path, fetched, resumed, False)


def prune_partials(cache: Path, older_than: dt.timedelta = STALE_PARTIAL_AGE, *, now: float | None = None) -> int:
    """Remove partial downloads (with their ledgers and lock files) that made no progress for
    ``older_than`` and that no pull is working on (it would hold the blob's lock); return how many
    partial downloads went.

    Example:
        >>> prune_partials(Path("~/.slmpkg/cache").expanduser())        # doctest: +SKIP
        0
    """
    tmpdir = cache / "tmp"
    if not tmpdir.is_dir():
        return 0
    cutoff = (time.time() if now is None else now) - older_than.total_seconds()
    blobs = {p.name.split(".", 1)[0] for p in tmpdir.iterdir() if p.name.endswith((".partial", ".ranges", ".lock"))}
    removed = 0
    for hexd in sorted(blobs):
        lock = tmpdir / f"{hexd}.lock"
        leftovers = [p for p in tmpdir.glob(f"{hexd}.*") if p != lock]  # partials and ledgers
        if all(_last_activity(p) >= cutoff for p in leftovers + ([lock] if lock.exists() else [])):
            continue
        fd = _open_lock(lock, blocking=False)
        if fd is None:
            continue  # a pull is fetching this blob: nothing of it is abandoned
        try:
            for p in leftovers:
                if _last_activity(p) < cutoff:
                    removed += p.name.endswith(".partial") and _own_file(p)
                    _remove(p)
            if not any(tmpdir.glob(f"{hexd}.*.partial")):
                _remove(lock)
        finally:
            os.close(fd)
    return removed


def _ranges_kept(ledger: Path, size: int) -> int:
    """Bytes an interrupted fetch recorded in its ledger (for the error message)."""
    try:
        lines = ledger.read_text("ascii").split("\n")
        rs = int(lines[0].split()[-1])
    except (OSError, ValueError, IndexError):
        return 0
    done = {int(x) for x in lines[1:-1] if x.isdigit()}
    return sum(min(size, (i + 1) * rs) - i * rs for i in done if i * rs < size)
