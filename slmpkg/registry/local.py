"""The embedded store: a directory on local disk (default ``$SLMPKG_HOME/registry``).

Every write goes to a temporary file under ``ROOT/.tmp`` (same file system), is fsynced, then appears
in one step: ``os.link`` for create-only writes (fails with EEXIST if another writer got there first)
and ``os.replace`` otherwise. Compare-and-swap and replace hold an ``fcntl`` lock on
``ROOT/.locks/<sha256(key)>`` so concurrent processes on one host serialize. Etags are the sha256 of
the value. The lock is advisory and per host: do not share one directory between hosts over NFS.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import ConflictError, IntegrityError, NotFoundError, StoreError
from .store import CHUNK, Progress, Store, check_key, default_home, fsync_dir

__all__ = ["LocalStore", "default_root"]


def default_root() -> Path:
    """``$SLMPKG_HOME/registry`` (``~/.slmpkg/registry``)."""
    return default_home() / "registry"


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStore(Store):
    """A :class:`~slmpkg.registry.store.Store` in a directory.

    Example:
        >>> s = LocalStore(tmp_path)                      # doctest: +SKIP
        >>> s.put_if_absent("k", b"v"), s.put_if_absent("k", b"w")   # doctest: +SKIP
        (True, False)
    """

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.url = str(self.root)
        try:
            (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
            (self.root / ".locks").mkdir(exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.root}: cannot create registry directory: {e.strerror or e}") from None

    # ---- helpers ----------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        name = hashlib.sha256(key.encode("utf-8")).hexdigest()
        fd = os.open(self.root / ".locks" / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _tmp(self) -> tuple[int, Path]:
        import tempfile

        fd, name = tempfile.mkstemp(prefix="w-", suffix=".partial", dir=self.root / ".tmp")
        return fd, Path(name)

    def _write_tmp(self, data: bytes) -> Path:
        fd, tmp = self._tmp()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _makedirs(self, d: Path) -> None:
        """``mkdir -p`` that also syncs each parent a directory was created in, so the new path
        survives a power cut together with what is renamed into it."""
        if d.is_dir():
            return
        self._makedirs(d.parent)
        try:
            d.mkdir()
        except FileExistsError:
            return
        fsync_dir(d.parent)

    def _publish(self, tmp: Path, key: str, *, if_absent: bool) -> bool:
        target = self._path(key)
        try:
            self._makedirs(target.parent)
            if if_absent:
                try:
                    os.link(tmp, target)  # atomic create-only
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, target)
            fsync_dir(target.parent)
            return True
        except OSError as e:
            raise StoreError(f"{self.url}/{key}: cannot write: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{self.url}/{key}: not found") from None
        except IsADirectoryError:
            raise NotFoundError(f"{self.url}/{key}: not found (a directory)") from None
        except OSError as e:
            raise StoreError(f"{self.url}/{key}: cannot read: {e.strerror or e}") from None

    def _stat(self, key: str) -> os.stat_result:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{self.url}/{key}: not found") from None
        if not os.path.isfile(self._path(key)):
            raise NotFoundError(f"{self.url}/{key}: not found (a directory)")
        return st

    # ---- small values -----------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        return self._read(key)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self._read(key)
        return data, _etag(data)

    def put(self, key: str, data: bytes) -> None:
        tmp = self._write_tmp(data)
        with self._lock(key):
            self._publish(tmp, key, if_absent=False)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._publish(self._write_tmp(data), key, if_absent=True)

    def compare_and_swap(self, key: str, expected_etag: str | None, data: bytes) -> str:
        tmp = self._write_tmp(data)
        try:
            with self._lock(key):
                try:
                    current = _etag(self._path(key).read_bytes())
                except FileNotFoundError:
                    current = None
                if current != expected_etag:
                    raise ConflictError(
                        f"{self.url}/{key}: changed since read (etag {str(current)[:12]}, expected {str(expected_etag)[:12]})"
                    )
                self._publish(tmp, key, if_absent=False)
        finally:
            tmp.unlink(missing_ok=True)
        return _etag(data)

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the directory the prefix names, not the whole store.
        base, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*base.split("/")) if base else self.root
        out = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in filenames:
                if name.startswith("."):
                    continue
                key = rel + name
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        with self._lock(key):
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    # ---- blobs ------------------------------------------------------------------------------------

    def size(self, key: str) -> int:
        return self._stat(key).st_size

    def mtime(self, key: str) -> float:
        return self._stat(key).st_mtime

    def touch(self, key: str) -> None:
        with self._lock(key):  # never between delete_if_stale's check and its unlink
            try:
                os.utime(self._path(key))
            except FileNotFoundError:
                raise NotFoundError(f"{self.url}/{key}: not found") from None

    def delete_if_stale(self, key: str, cutoff: float) -> bool:
        with self._lock(key):  # one step against touch(): check the age and unlink under the key's lock
            if self._stat(key).st_mtime > cutoff:
                return False
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass
            return True

    def read_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        except FileNotFoundError:
            raise NotFoundError(f"{self.url}/{key}: not found") from None

    def read_range_into(self, key: str, start: int, buf: memoryview) -> None:
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                got = 0
                while got < len(buf):
                    n = os.preadv(f.fileno(), [buf[got:]], start + got)
                    if not n:
                        raise IntegrityError(f"{self.url}/{key}: ends at {start + got}, expected {start + len(buf)} bytes")
                    got += n
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{self.url}/{key}: not found") from None

    def put_file(self, key, path, *, sha256=None, if_absent=True, progress: Progress | None = None) -> bool:
        check_key(key)
        if if_absent and self.exists(key):
            return False
        fd, tmp = self._tmp()
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sha256 is not None and h.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"{path}: changed while uploading (sha256:{h.hexdigest()[:16]}, expected sha256:{sha256[:16]})")
        if if_absent:
            return self._publish(tmp, key, if_absent=True)
        with self._lock(key):
            return self._publish(tmp, key, if_absent=False)

    def download(self, key, f, *, size=None, progress=None) -> int:
        try:
            src = open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.url}/{key}: not found") from None
        done = 0
        with src:
            while chunk := src.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress(len(chunk))
        return done

    def clean_tmp(self, older_than: float = 24 * 3600, *, dry_run: bool = False) -> int:
        """Remove temporary files an interrupted writer left under ``.tmp``; return how many."""
        n, now = 0, time.time()
        for p in (self.root / ".tmp").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime > older_than:
                    if not dry_run:
                        p.unlink()
                    n += 1
        return n

    def clean_incomplete(self, older_than: float, *, dry_run: bool = False) -> int:
        return self.clean_tmp(older_than, dry_run=dry_run)

