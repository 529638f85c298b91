"""The Hugging Face Hub store (``huggingface_hub``'s ``HfApi``): ``hf://org/repo``, one model repo per
registry root, keys are paths in the repo. Endpoint from ``endpoint`` or ``HF_ENDPOINT``, token from
``token`` or ``HF_TOKEN``; messages never include the token.

- every write is one commit on ``branch`` (``create_commit``), so it becomes visible whole or not at all;
- **etag = the file's blob id at a commit**: the sha256 for LFS files (``X-Linked-Etag``), the git blob
  sha1 for regular files (``ETag``) — per key, so a commit touching *other* keys does not invalidate it;
- ``compare_and_swap``: read the head commit ``H``, check the key's etag at ``H``, then commit with
  ``parent_commit=H``; the Hub refuses (412/409) if the branch moved, and we re-check at the new head
  (a move that left the key alone is retried, one that changed it is a
  :class:`~slmpkg.registry.errors.ConflictError`). ``put_if_absent`` is the same with "absent at ``H``";
- reads pin ``revision=H`` so the bytes and the etag come from one commit;
- big blobs: huggingface_hub uploads them through Xet when ``hf_xet`` is installed and not disabled with
  ``HF_HUB_DISABLE_XET=1``, else through the LFS batch API. Reads of a file the Hub stores in Xet (its
  resolve answer carries ``X-Xet-Hash``) go through ``hf_xet`` too — whole files and byte ranges, with a
  read token from the Hub — and through the HTTP redirect otherwise; either way the etag of a big file is
  its sha256 (``X-Linked-Etag``), which ``put_file`` checks against what it hashed;
- ``mtime``/``touch`` (the gc clock): the last commit date of the key or of a hidden marker
  ``.slmpkg-touch/<key>`` that ``touch`` rewrites (the client skips commits that change nothing, so
  re-adding the same bytes would not move the date). Dot-prefixed paths are never keys.

Limits: the Hub caps commit rates and sizes; every write is a commit, so the repo's history grows with
each push (squash with ``HfApi.super_squash_history`` if it matters).

Example:
    >>> store = HubStore("hf://my-org/registry", endpoint="http://127.0.0.1:8080", token="hf_...")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from typing import Any, BinaryIO

from .errors import AuthError, ConflictError, IntegrityError, NotFoundError, StoreError
from .store import CHUNK, Progress, Store, check_key

__all__ = ["HubStore"]

TOUCH_DIR = ".slmpkg-touch"
_MAX_CAS_RETRIES = 20
#: Files up to this size may be stored as regular git files (the Hub's limit for non-LFS files is 10 MB).
_REGULAR_MAX = 10 << 20


def _xet_reader() -> bool:
    """Whether reads may go through hf_xet: installed, not disabled (``HF_HUB_DISABLE_XET``, looked up
    on every call like huggingface_hub does), and huggingface_hub still has the helpers we use; else
    reads take the HTTP redirect, which the Hub serves for Xet files too."""
    try:
        from huggingface_hub.utils._runtime import is_xet_available
        from huggingface_hub.utils._xet import (  # noqa: F401
            get_xet_session,
            refresh_xet_connection_info,
            xet_headers_without_auth,
        )
    except ImportError:  # pragma: no cover - another huggingface_hub than the one we test with
        return False
    return is_xet_available()


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


class HubStore(Store):
    """A :class:`~slmpkg.registry.store.Store` in a Hugging Face Hub model repo."""

    def __init__(self, url: str, endpoint: str | None = None, token: str | None = None, *, branch: str = "main",
                 create: bool = True, api: Any = None):
        if not url.startswith("hf://"):
            raise StoreError(f"{url}: not an hf:// URL")
        repo_id = url[len("hf://"):].strip("/")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise StoreError(f"{url}: expected hf://org/repo")
        self.repo_id, self.branch, self.create = repo_id, branch, create
        self.url = f"hf://{repo_id}"
        try:
            from huggingface_hub import HfApi
        except ImportError:  # pragma: no cover - depends on the environment
            raise StoreError("hf:// registries need huggingface_hub: pip install huggingface_hub") from None
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self._token = token or os.environ.get("HF_TOKEN") or None
        self.api = api or HfApi(endpoint=self.endpoint, token=self._token)
        self._repo_ready = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the token
        return f"HubStore({self.url!r}, endpoint={self.endpoint!r})"

    # ---- errors -----------------------------------------------------------------------------------

    def _error(self, e: Exception, key: str | None, op: str) -> Exception:
        """Map a huggingface_hub / HTTP error to ours (one line, no token)."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{self.url}/{key}" if key else self.url
        if isinstance(e, (EntryNotFoundError,)) or type(e).__name__ in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
            return NotFoundError(f"{where}: not found")
        if isinstance(e, RevisionNotFoundError):
            return NotFoundError(f"{where}: branch {self.branch!r} not found")
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403) and not isinstance(e, RepositoryNotFoundError) or (
            isinstance(e, RepositoryNotFoundError) and status == 401 and self._token
        ):
            return AuthError(f"{where}: credentials rejected by {self.endpoint} on {op} (HTTP {status})")
        if isinstance(e, RepositoryNotFoundError):
            return NotFoundError(f"{where}: repository {self.repo_id} not found")
        if status in (409, 412):
            return ConflictError(f"{where}: changed since read ({op} refused with HTTP {status})")
        if isinstance(e, HfHubHTTPError):
            msg = _first_line(e)
            if self._token:
                msg = msg.replace(self._token, "***")
            return StoreError(f"{where}: {op} failed: {msg}")
        return StoreError(f"{where}: {op} failed: {type(e).__name__}")

    def _call(self, op: str, key: str | None, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (StoreError, NotFoundError, ConflictError, IntegrityError):
            raise
        except Exception as e:
            from huggingface_hub.errors import HfHubHTTPError

            if type(e).__module__.startswith("hf_xet"):
                # hf_xet's errors (CAS refused the token, a xorb missing, I/O) carry no HTTP response
                where = f"{self.url}/{key}" if key else self.url
                msg = f"{type(e).__name__}: {_first_line(e)}"
                msg = msg.replace(self._token, "***") if self._token else msg
                cls = AuthError if isinstance(e, PermissionError) else StoreError
                raise cls(f"{where}: {op} through Xet failed: {msg}") from None
            if isinstance(e, (HfHubHTTPError, OSError)) or type(e).__module__.startswith(("httpx", "httpcore")):
                raise self._error(e, key, op) from None
            raise

    # ---- helpers ----------------------------------------------------------------------------------

    def _ensure_repo(self) -> None:
        with self._lock:  # push uploads from several threads
            if self._repo_ready:
                return
            if self.create:
                self._call("create_repo", None, self.api.create_repo, self.repo_id, repo_type="model",
                           private=True, exist_ok=True)
            self._repo_ready = True

    def _head(self) -> str | None:
        """The commit ``branch`` points at; None when the repo does not exist."""
        try:
            info = self._call("repo_info", None, self.api.repo_info, self.repo_id, repo_type="model",
                              revision=self.branch)
        except NotFoundError:
            return None
        return info.sha

    def _file_meta(self, key: str, rev: str):
        """huggingface_hub's ``HfFileMetadata`` of ``key`` at ``rev`` (etag, size, commit, Xet data);
        NotFoundError when absent."""
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.repo_id, key, revision=rev, endpoint=self.endpoint)
        m = self._call("metadata", key, self.api.get_hf_file_metadata, url=url)
        if m.etag is None or m.size is None:
            raise StoreError(f"{self.url}/{key}: the Hub sent no ETag/size")
        return m

    def _meta(self, key: str, rev: str):
        """``(etag, size, commit)`` of ``key`` at ``rev``; NotFoundError when absent."""
        m = self._file_meta(key, rev)
        return m.etag, int(m.size), m.commit_hash

    def _etag_at(self, key: str, rev: str | None) -> str | None:
        if rev is None:
            return None
        try:
            return self._meta(key, rev)[0]
        except NotFoundError:
            return None

    def _commit(self, ops: list, message: str, parent: str | None) -> str:
        self._ensure_repo()
        r = self._call("commit", ops[0].path_in_repo if ops else None, self.api.create_commit, self.repo_id, ops,
                       commit_message=message, repo_type="model", revision=self.branch, parent_commit=parent)
        return r.oid

    def _add(self, key: str, src: bytes | str) -> Any:
        from huggingface_hub import CommitOperationAdd

        return CommitOperationAdd(path_in_repo=key, path_or_fileobj=src)

    def _cas(self, key: str, expected: str | None, src: bytes | str, message: str) -> str:
        check_key(key)
        self._ensure_repo()
        for _ in range(_MAX_CAS_RETRIES):
            head = self._head()
            current = self._etag_at(key, head)
            if current != expected:
                raise ConflictError(f"{self.url}/{key}: changed since read (etag {str(current)[:12]}, expected {str(expected)[:12]})")
            try:
                commit = self._commit([self._add(key, src)], message, head)
            except ConflictError:
                continue  # the branch moved: re-check the key at the new head
            return self._meta(key, commit)[0]
        raise ConflictError(f"{self.url}/{key}: branch {self.branch} kept moving ({_MAX_CAS_RETRIES} tries)")

    def _stream(self, key: str, rev: str, start: int | None = None, end: int | None = None):
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        headers = build_hf_headers(token=self._token)
        headers["Accept-Encoding"] = "identity"
        if start is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        url = hf_hub_url(self.repo_id, key, revision=rev, endpoint=self.endpoint)
        # Cross-origin redirects (LFS -> storage) drop the Authorization header (httpx's rule).
        return get_session().stream("GET", url, headers=headers, follow_redirects=True)

    # ---- small values -----------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        from huggingface_hub import hf_hub_download

        check_key(key)
        head = self._head()
        if head is None:
            raise NotFoundError(f"{self.url}/{key}: not found")
        etag, size, _ = self._meta(key, head)
        with tempfile.TemporaryDirectory(prefix="slmpkg-hf-") as d:
            p = self._call("download", key, hf_hub_download, self.repo_id, key, revision=head, cache_dir=d,
                           endpoint=self.endpoint, token=self._token)
            with open(p, "rb") as f:
                data = f.read()
        if len(data) != size:
            raise IntegrityError(f"{self.url}/{key}: got {len(data)} bytes, expected {size}")
        return data, etag

    def put(self, key: str, data: bytes) -> None:
        self._commit([self._add(check_key(key), data)], f"put {key}", None)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._cas(key, None, data, f"create {key}")
        except ConflictError:
            return False
        return True

    def compare_and_swap(self, key: str, expected_etag: str | None, data: bytes) -> str:
        return self._cas(key, expected_etag, data, f"update {key}")

    def _files(self, rev: str) -> list[str]:
        return self._call("list", None, self.api.list_repo_files, self.repo_id, repo_type="model", revision=rev)

    def list(self, prefix: str = "") -> list[str]:
        head = self._head()
        if head is None:
            return []
        return sorted(f for f in self._files(head)
                      if f.startswith(prefix) and not any(p.startswith(".") for p in f.split("/")))

    def delete(self, key: str) -> None:
        from huggingface_hub import CommitOperationDelete

        check_key(key)
        for _ in range(_MAX_CAS_RETRIES):
            head = self._head()
            if head is None:
                return
            paths = [key, f"{TOUCH_DIR}/{key}"]
            present = {f.path for f in self._call("paths_info", key, self.api.get_paths_info, self.repo_id, paths,
                                                  repo_type="model", revision=head)}
            if key not in present:
                return
            try:
                self._commit([CommitOperationDelete(p) for p in paths if p in present], f"delete {key}", head)
                return
            except (ConflictError, NotFoundError):
                continue
        raise ConflictError(f"{self.url}/{key}: branch {self.branch} kept moving while deleting")

    def exists(self, key: str) -> bool:
        check_key(key)
        head = self._head()
        return self._etag_at(key, head) is not None

    # ---- blobs ------------------------------------------------------------------------------------

    def size(self, key: str) -> int:
        head = self._head()
        if head is None:
            raise NotFoundError(f"{self.url}/{key}: not found")
        return self._meta(check_key(key), head)[1]

    def _mtime_at(self, key: str, head: str | None) -> tuple[float, list[str]]:
        """The gc clock of ``key`` at commit ``head`` and the paths holding it (the key, its marker)."""
        if head is None:
            raise NotFoundError(f"{self.url}/{key}: not found")
        infos = {f.path: f for f in self._call("paths_info", key, self.api.get_paths_info, self.repo_id,
                                                [key, f"{TOUCH_DIR}/{key}"], expand=True, repo_type="model",
                                                revision=head)}
        if key not in infos:
            raise NotFoundError(f"{self.url}/{key}: not found")
        return max(f.last_commit.date.timestamp() for f in infos.values() if f.last_commit is not None), list(infos)

    def mtime(self, key: str) -> float:
        check_key(key)
        return self._mtime_at(key, self._head())[0]

    def delete_if_stale(self, key: str, cutoff: float) -> bool:
        """Check the age at the head commit and delete in a commit whose parent is that head: a touch
        in between moves the branch, the Hub refuses the commit, and the age is checked again."""
        from huggingface_hub import CommitOperationDelete

        check_key(key)
        for _ in range(_MAX_CAS_RETRIES):
            head = self._head()
            when, paths = self._mtime_at(key, head)
            if when > cutoff:
                return False
            try:
                self._commit([CommitOperationDelete(p) for p in paths], f"delete {key}", head)
                return True
            except ConflictError:
                continue
        raise ConflictError(f"{self.url}/{key}: branch {self.branch} kept moving while deleting")

    def touch(self, key: str) -> None:
        import time

        if not self.exists(key):
            raise NotFoundError(f"{self.url}/{key}: not found")
        self._commit([self._add(f"{TOUCH_DIR}/{key}", repr(time.time()).encode())], f"touch {key}", None)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        check_key(key)
        if end <= start:
            return b""
        head = self._head()
        if head is None:
            raise NotFoundError(f"{self.url}/{key}: not found")
        meta = self._file_meta(key, head)
        end = min(end, int(meta.size))
        if end <= start:
            return b""
        buf = io.BytesIO()
        self._get_into(key, head, meta, buf, start, end)
        return buf.getvalue()

    def _xet_chunks(self, xet, size: int, start: int | None, end: int | None):
        """The bytes ``[start, end)`` of a Xet-stored file, straight from the CAS through ``hf_xet``."""
        from hf_xet import XetFileInfo
        from huggingface_hub.utils import build_hf_headers

        # huggingface_hub has no public ranged Xet read: these are the helpers its own xet_get uses
        # (checked by _xet_reader); the session is its process-wide one, shared with its downloads.
        from huggingface_hub.utils._xet import (
            get_xet_session,
            refresh_xet_connection_info,
            xet_headers_without_auth,
        )

        headers = build_hf_headers(token=self._token)
        # A short-lived CAS token from the Hub's xet-read-token route (cached by huggingface_hub); the CAS
        # never sees the Hub token, and hf_xet refreshes the CAS token through the same route.
        info = refresh_xet_connection_info(file_data=xet, headers=headers)
        group = get_xet_session().new_download_stream_group(
            endpoint=info.endpoint, token=info.access_token, token_expiry_unix_secs=info.expiration_unix_epoch,
            token_refresh_url=xet.refresh_route, token_refresh_headers=headers,
            custom_headers=xet_headers_without_auth(headers))
        yield from group.download_stream(XetFileInfo(xet.file_hash, size), start=start, end=end)

    def _get_into(self, key, rev, meta, f, start=None, end=None, progress=None) -> int:
        from huggingface_hub.utils import hf_raise_for_status

        done = 0

        def take(chunk: bytes) -> None:
            nonlocal done
            f.write(chunk)
            done += len(chunk)
            if progress:
                progress(len(chunk))

        def run():
            if meta.xet_file_data is not None and _xet_reader():
                for chunk in self._xet_chunks(meta.xet_file_data, int(meta.size), start, end):
                    take(chunk)
                return
            with self._stream(key, rev, start, end) as r:
                hf_raise_for_status(r)
                if start is not None and r.status_code != 206:
                    raise StoreError(f"{self.url}/{key}: the server ignored the Range request")
                for chunk in r.iter_bytes(CHUNK):
                    take(chunk)

        self._call("download", key, run)
        # A short answer is an error, never a short blob: hf_xet's stream can end quietly (no exception)
        # when the CAS lacks the file or, racily, one of its xorbs, and an HTTP body can be cut short.
        expected = (int(meta.size) if end is None else end) - (start or 0)
        if done != expected:
            raise IntegrityError(f"{self.url}/{key}: got {done} bytes, expected {expected}")
        return done

    def download(self, key: str, f: BinaryIO, *, size: int | None = None, progress: Progress | None = None) -> int:
        check_key(key)
        head = self._head()
        if head is None:
            raise NotFoundError(f"{self.url}/{key}: not found")
        meta = self._file_meta(key, head)
        total = int(meta.size) if size is None else size
        done = self._get_into(key, head, meta, f, progress=progress)
        if done != total:
            raise IntegrityError(f"{self.url}/{key}: got {done} bytes, expected {total}")
        return done

    def put_file(self, key, path, *, sha256=None, if_absent=True, progress: Progress | None = None) -> bool:
        check_key(key)
        if if_absent and self.exists(key):
            return False
        size = os.path.getsize(path)
        h = hashlib.sha256()
        # Small files may be stored as regular git files, whose etag is the git blob sha1: hash that too.
        git = hashlib.sha1(b"blob %d\x00" % size) if size <= _REGULAR_MAX else None  # noqa: S324 (git's id)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                if git is not None:
                    git.update(chunk)
        if sha256 is not None and h.hexdigest() != sha256:
            raise IntegrityError(f"{path}: changed while uploading (sha256:{h.hexdigest()[:16]}, expected sha256:{sha256[:16]})")
        src = os.fspath(path)
        if if_absent:
            try:
                etag = self._cas(key, None, src, f"add {key}")
            except ConflictError:
                return False
        else:
            commit = self._commit([self._add(key, src)], f"put {key}", None)
            etag = self._meta(key, commit)[0]
        # The etag is the id of the bytes the Hub stored: a big file's sha256 (LFS or Xet), a regular
        # file's git blob sha1. huggingface_hub hashes the bytes it actually sends (LFS: before the batch
        # call, checked by the storage; Xet: hf_xet while chunking, recorded in the shard) — we never hand
        # it our digest, which it would take on trust — so a file that changed after we hashed it shows
        # up here. Its key then names other bytes: remove it, so a retry uploads again.
        want = h.hexdigest() if len(etag) == 64 else git.hexdigest() if len(etag) == 40 and git else None
        if want is not None and etag != want:
            try:
                self.delete(key)
            except (StoreError, NotFoundError, ConflictError):
                pass  # the integrity error is the one to report
            raise IntegrityError(f"{self.url}/{key}: {path} changed while uploading (stored {etag[:16]}, "
                                 f"hashed {want[:16]}); the stored copy was removed")
        if progress:
            progress(size)
        return True
