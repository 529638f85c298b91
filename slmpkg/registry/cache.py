"""The client's content-addressed blob cache (default ``$SLMPKG_HOME/cache``).

``blobs/sha256/<hex>`` holds blobs whose digest matched, read-only (pulled files are hard links to
them). A download goes to ``tmp/`` first, in ranges an interrupted pull keeps (see
:func:`~slmpkg.registry.store.fetch_resumable`), and enters ``blobs/`` only once its digest matched.

Example:
    >>> got = fetch_blob(store, "sha256:ab..", 1 << 30, Path("~/.slmpkg/cache"), verify_cache=True, progress=None)  # doctest: +SKIP
    >>> got.path                                                                          # doctest: +SKIP
    PosixPath('/home/me/.slmpkg/cache/blobs/sha256/ab..')
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
from pathlib import Path

from .errors import IntegrityError, StoreError
from .names import blob_key
from .store import Progress, Store, fetch_resumable

__all__ = ["Fetched", "fetch_blob", "hash_file"]


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(bytearray(1 << 20))
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive ``fcntl`` lock on ``path`` (created if missing), held for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Fetched:
    path: Path
    fetched: int  # bytes read from the store by this pull
    resumed: int  # bytes kept from an interrupted earlier pull
    cached: bool  # the blob was already complete in the cache


def fetch_blob(
    store: Store, digest: str, size: int, cache: Path, *, verify_cache: bool, progress: Progress | None
) -> Fetched:
    """Make ``cache/blobs/sha256/<hex>`` hold the verified blob.

    The download goes to ``cache/tmp/<hex>.partial`` with a ledger of the ranges it holds
    (:func:`~slmpkg.registry.store.fetch_resumable`), so a pull interrupted by a dead server, a
    network failure or Ctrl-C keeps what it fetched and the next pull reads only the rest. The
    digest is checked before the file is renamed into the cache. A lock per blob lets concurrent
    pulls (threads or processes) share one cache.
    """
    hexd = digest.removeprefix("sha256:")
    key = blob_key(digest)
    path = cache / "blobs" / "sha256" / hexd

    def cached() -> bool:
        if path.is_file() and not path.is_symlink():
            if path.stat().st_size == size and (not verify_cache or hash_file(path) == hexd):
                return True
            path.unlink()  # corrupt cache entry: fetch again
        return False

    if cached():
        return Fetched(path, 0, 0, True)
    tmpdir = cache / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = tmpdir / f"{hexd}.partial"
    ledger = tmpdir / f"{hexd}.partial.ranges"
    with file_lock(tmpdir / f"{hexd}.lock"):
        if cached():  # another pull finished it while we waited for the lock
            return Fetched(path, 0, 0, True)
        fetched = resumed = 0
        for attempt in range(2):
            try:
                st = fetch_resumable(store, key, size, partial, progress=progress)
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
            for p in (partial, ledger):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            if attempt or not st.resumed_bytes:
                raise IntegrityError(
                    f"{store.url}/{key}: blob does not match its digest (got sha256:{st.sha256[:16]}, "
                    f"expected {size} bytes sha256:{hexd[:16]}); refusing it"
                )
            resumed = 0
        os.chmod(partial, 0o444)  # hard-linked into outputs: make in-place edits fail loudly
        os.replace(partial, path)
        # The lock file goes too: whoever still waits on it, or opens a new one, finds the blob
        # cached once it holds its lock, so no two fetches of this blob can overlap.
        for p in (ledger, tmpdir / f"{hexd}.lock"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return Fetched(path, fetched, resumed, False)


def _ranges_kept(ledger: Path, size: int) -> int:
    """Bytes an interrupted fetch recorded in its ledger (for the error message)."""
    try:
        lines = ledger.read_text("ascii").split("\n")
        rs = int(lines[0].split()[-1])
    except (OSError, ValueError, IndexError):
        return 0
    done = {int(x) for x in lines[1:-1] if x.isdigit()}
    return sum(min(size, (i + 1) * rs) - i * rs for i in done if i * rs < size)
