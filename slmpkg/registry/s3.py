"""The S3 store (boto3): ``s3://bucket/prefix``, endpoint from ``endpoint_url`` or ``AWS_ENDPOINT_URL``.

- create-only writes use ``IfNoneMatch='*'`` (412 -> exists); compare-and-swap uses ``IfMatch=<etag>``
  (or ``IfNoneMatch='*'`` to create), 412/409 -> :class:`~slmpkg.registry.errors.ConflictError`;
- every upload carries a SHA256 checksum the server verifies (``BadDigest`` on mismatch); files above
  ``multipart_threshold`` go up as multipart uploads, parts in parallel, each with its own SHA256
  checksum, completed with ``IfNoneMatch='*'`` so an existing blob is never replaced;
- an upload cut off (server gone, connection lost) or stopped (Ctrl-C, SIGTERM) keeps its parts, and
  the next push of the blob continues it, sending only the parts the store does not hold with the same
  size and checksum; gc aborts unfinished uploads older than its grace period; any other failure aborts;
- ``touch`` (the gc clock) copies the object onto itself: CopyObject up to 5 GiB, a multipart copy
  (UploadPartCopy) above;
- downloads split a blob into ``part_size`` ranges fetched in parallel (``max_workers`` at once) and
  read straight into their buffers (:meth:`S3Store.read_range_into`), which is what
  :func:`~slmpkg.registry.store.fetch_resumable` builds resumable pulls on;
- a dead or stalled endpoint fails promptly: ``max_attempts`` tries in boto3's standard retry mode
  (default 3, or ``AWS_MAX_ATTEMPTS``), ``connect_timeout`` 5 s, ``read_timeout`` 30 s, and the error
  says which endpoint could not be reached.

Credentials come from boto3's usual chain (environment, config files) or the ``aws_access_key_id`` /
``aws_secret_access_key`` options; messages name the access key id, never the secret.

Example:
    >>> store = S3Store("s3://models/registry", endpoint_url="http://127.0.0.1:8333")   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import os
import threading
from typing import Any, BinaryIO

from slmpkg._threads import results, worker_pool

from .errors import AuthError, ConflictError, IntegrityError, NotFoundError, StoreError
from .store import Progress, Store, check_key, parallel_map

__all__ = ["S3Store"]

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
               "AuthorizationHeaderMalformed", "InvalidSecurity"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
#: S3's limits: a single-request copy (CopyObject) of at most 5 GiB; parts of 5 MiB to 5 GiB, 10,000 at most.
MAX_COPY_SIZE = 5 << 30
MAX_PARTS = 10_000
#: Bytes per read from a response body. urllib3's ``readinto`` reads the whole amount asked for into a
#: new bytes object and copies it over: asked for a 16 MiB range at once, it maps 16 MiB of fresh pages
#: per read (page faults on every one), which cost a pull ~0.8 CPU-seconds per GB on the 2-core test
#: machine (about a third of its CPU time); 1 MiB pieces reuse the allocator's memory.
_READ_CHUNK = 1 << 20


class _Unreachable(StoreError):
    """The endpoint refused or did not accept connections (after boto3's retries)."""


class _BrokenOff(StoreError):
    """A connection broke or stalled in the middle of a transfer."""


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


class S3Store(Store):
    """A :class:`~slmpkg.registry.store.Store` in an S3 bucket (AWS, SeaweedFS, MinIO, R2, ...)."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        part_size: int = 16 << 20,
        multipart_threshold: int = 64 << 20,
        max_workers: int = 8,
        max_attempts: int | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        client: Any = None,
    ):
        if not url.startswith("s3://"):
            raise StoreError(f"{url}: not an s3:// URL")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"{url}: no bucket in the URL")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.part_size = max(5 << 20, part_size)  # S3's minimum part size
        self.multipart_threshold = multipart_threshold
        self.max_copy_size = MAX_COPY_SIZE
        self.max_workers = max_workers
        self.range_size = self.part_size
        self.range_concurrency = max_workers
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:  # pragma: no cover - depends on the environment
                raise StoreError("s3:// registries need boto3: pip install boto3") from None
            endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
            if max_attempts is None:
                # boto3's default for standard mode, overridable with AWS_MAX_ATTEMPTS as in the AWS
                # CLI: a dead endpoint fails within ~3 s of backoff (5 retries could sleep ~30 s).
                try:
                    max_attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 3)
                except ValueError:
                    raise StoreError(f"AWS_MAX_ATTEMPTS={os.environ['AWS_MAX_ATTEMPTS']!r}: not a number") from None
            session = boto3.session.Session(
                aws_access_key_id=aws_access_key_id, aws_secret_access_key=aws_secret_access_key,
                region_name=region_name or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            )
            client = session.client(
                "s3",
                endpoint_url=endpoint_url,
                config=Config(
                    s3={"addressing_style": "path"} if endpoint_url else {},
                    retries={"total_max_attempts": max(1, max_attempts), "mode": "standard"},
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                    max_pool_connections=max(10, 2 * max_workers),
                    # We send our own SHA256 checksums; do not add CRC32s on top.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
            creds = session.get_credentials()
            self._access_key = creds.access_key if creds else None
        else:
            self._access_key = None
        self.endpoint = endpoint_url or getattr(getattr(client, "meta", None), "endpoint_url", None)
        self.client = client

    # ---- helpers ----------------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, key: str | None, op: str) -> Exception:
        """Map a botocore error to ours (one line, no secrets)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        where = f"{self.url}/{key}" if key else self.url
        endpoint = self.endpoint or "the S3 endpoint"
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
                return NotFoundError(f"{where}: not found")
            if code == "NoSuchBucket":
                return StoreError(f"{self.url}: bucket {self.bucket!r} does not exist")
            if code in _PRECONDITION or status in (409, 412):
                return ConflictError(f"{where}: changed since read (precondition failed on {op})")
            if code in _AUTH_CODES or status == 403:
                who = f" for access key {self._access_key!r}" if self._access_key else ""
                return AuthError(f"{self.url}: credentials rejected{who} ({code or status} on {op}); check the secret key")
            if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
                return IntegrityError(f"{where}: the server rejected the upload's checksum ({code})")
            return StoreError(f"{where}: {op} failed: {code or status} {err.get('Message', '')}".rstrip())
        # botocore's messages for these name the full request URL; ours name the endpoint and the key.
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
            return _Unreachable(f"{where}: {op} failed: cannot connect to {endpoint}")
        if isinstance(e, ReadTimeoutError):
            return _BrokenOff(f"{where}: {op} failed: {endpoint} stopped answering (read timeout)")
        if isinstance(e, (ConnectionClosedError, ResponseStreamingError, IncompleteReadError)):
            return _BrokenOff(f"{where}: {op} failed: the connection to {endpoint} broke off")
        if isinstance(e, BotoCoreError):
            return StoreError(f"{where}: {op} failed: {type(e).__name__}: {e}")
        return e

    def _call(self, op: str, key: str | None, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(Bucket=self.bucket, **kw)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, op) from None

    # ---- small values -----------------------------------------------------------------------------

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        r = self._call("get_object", key, Key=self._k(key))
        return r["Body"].read(), r["ETag"]

    def get(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def put(self, key: str, data: bytes) -> None:
        self._call("put_object", key, Key=self._k(key), Body=data, ChecksumSHA256=_b64_sha256(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._call("put_object", key, Key=self._k(key), Body=data, ChecksumSHA256=_b64_sha256(data), IfNoneMatch="*")
        except ConflictError:
            return False
        return True

    def compare_and_swap(self, key: str, expected_etag: str | None, data: bytes) -> str:
        cond = {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": expected_etag}
        r = self._call("put_object", key, Key=self._k(key), Body=data, ChecksumSHA256=_b64_sha256(data), **cond)
        return r["ETag"]

    def list(self, prefix: str = "") -> list[str]:
        full = (f"{self.prefix}/" if self.prefix else "") + prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        token = None
        while True:
            kw = {"Prefix": full, **({"ContinuationToken": token} if token else {})}
            r = self._call("list_objects_v2", prefix or None, **kw)
            out.extend(o["Key"][strip:] for o in r.get("Contents", []))
            if not r.get("IsTruncated"):
                break
            token = r.get("NextContinuationToken")
        return sorted(out)

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Key=self._k(key))

    def _head(self, key: str) -> dict:
        return self._call("head_object", key, Key=self._k(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except NotFoundError:
            return False

    # ---- blobs ------------------------------------------------------------------------------------

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def mtime(self, key: str) -> float:
        return self._head(key)["LastModified"].timestamp()

    def touch(self, key: str) -> None:
        """A copy of the object onto itself refreshes LastModified. CopyObject copies at most
        :data:`MAX_COPY_SIZE` (5 GiB); a bigger blob is copied onto itself as a multipart upload whose
        parts are server-side copies (UploadPartCopy), each pinned to the ETag read first, so a blob
        deleted meanwhile fails the touch (NotFoundError) rather than leaving a partial object."""
        k = self._k(key)
        source = {"Bucket": self.bucket, "Key": k}
        head = self._head(key)
        size = int(head["ContentLength"])
        if size <= self.max_copy_size:
            self._call("copy_object", key, Key=k, CopySource=source, CopySourceIfMatch=head["ETag"],
                       MetadataDirective="REPLACE")
            return
        part = max(self.part_size, -(-size // MAX_PARTS))
        n = -(-size // part)
        upload_id = self._call("create_multipart_upload", key, Key=k, ChecksumAlgorithm="SHA256")["UploadId"]

        def copy(i: int) -> dict:
            r = self._call("upload_part_copy", key, Key=k, UploadId=upload_id, PartNumber=i + 1, CopySource=source,
                           CopySourceIfMatch=head["ETag"],
                           CopySourceRange=f"bytes={i * part}-{min(size, (i + 1) * part) - 1}")["CopyPartResult"]
            entry = {"PartNumber": i + 1, "ETag": r["ETag"]}
            if r.get("ChecksumSHA256"):
                entry["ChecksumSHA256"] = r["ChecksumSHA256"]
            return entry

        try:
            parts = parallel_map(copy, range(n), self.max_workers)
            self._call("complete_multipart_upload", key, Key=k, UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
            raise

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        r = self._call("get_object", key, Key=self._k(key), Range=f"bytes={start}-{end - 1}")
        return self._read_body(r, key, lambda body: body.read())

    def read_range_into(self, key: str, start: int, buf: memoryview) -> None:
        """Ranged GETs read straight into ``buf`` (no intermediate copy of the whole range). A body
        cut off mid-way (a reset connection: botocore retries requests, not bodies) is resumed once
        from where it stopped."""
        want, got = len(buf), [0]

        def fill(body) -> None:
            while got[0] < want:
                n = body.readinto(buf[got[0]: got[0] + _READ_CHUNK])
                if not n:
                    break
                got[0] += n

        for attempt in range(2):
            if got[0] >= want:
                return
            first = start + got[0]
            r = self._call("get_object", key, Key=self._k(key), Range=f"bytes={first}-{start + want - 1}")
            if int(r.get("ContentLength", -1)) != want - got[0]:
                r["Body"].close()
                raise IntegrityError(f"{self.url}/{key}: asked for {want - got[0]} bytes at offset {first}, "
                                     f"the server sent {r.get('ContentLength')} (changed in the bucket?)")
            try:
                self._read_body(r, key, fill)
            except _BrokenOff:
                if attempt:
                    raise
        if got[0] != want:
            raise _BrokenOff(f"{self.url}/{key}: get_object failed: the connection to "
                             f"{self.endpoint or 'the S3 endpoint'} broke off ({got[0]} of {want} bytes)")

    def _read_body(self, r: dict, key: str, read):
        """``read(body)`` with botocore's streaming errors mapped to ours; the body is always closed."""
        from botocore.exceptions import BotoCoreError

        body = r["Body"]
        try:
            return read(body)
        except BotoCoreError as e:
            raise self._error(e, key, "get_object") from None
        finally:
            body.close()

    def put_file(self, key, path, *, sha256=None, if_absent=True, progress: Progress | None = None) -> bool:
        size = os.path.getsize(path)
        cond = {"IfNoneMatch": "*"} if if_absent else {}
        if if_absent and self.exists(key):
            return False
        try:
            if size <= self.multipart_threshold:
                with open(path, "rb") as f:
                    data = f.read()
                digest = hashlib.sha256(data).digest()
                if sha256 is not None and digest.hex() != sha256:
                    raise IntegrityError(f"{path}: changed while uploading (sha256:{digest.hex()[:16]}, expected sha256:{sha256[:16]})")
                self._call("put_object", key, Key=self._k(key), Body=data,
                           ChecksumSHA256=base64.b64encode(digest).decode("ascii"), **cond)
                if progress:
                    progress(size)
            else:
                self._multipart(key, path, size, sha256, cond, progress)
        except ConflictError:
            if if_absent:
                return False
            raise
        except NotFoundError:
            # The upload this push resumed was completed (or aborted) by another pusher of the same blob.
            if if_absent and self.exists(key):
                return False
            raise
        return True

    def _upload_part(self, key: str, k: str, upload_id: str, number: int, data: bytes) -> dict:
        """Upload one part with its SHA256 checksum; the entry ``complete_multipart_upload`` needs."""
        checksum = _b64_sha256(data)
        r = self._call("upload_part", key, Key=k, UploadId=upload_id, PartNumber=number, Body=data,
                       ChecksumSHA256=checksum)
        return {"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": r.get("ChecksumSHA256") or checksum}

    def _pending_upload(self, key: str, k: str) -> tuple[str | None, dict[int, dict]]:
        """The most recent unfinished multipart upload of ``k`` (a push that was killed or lost its
        server) and the parts it holds, by part number; ``(None, {})`` when there is none."""
        uploads: list[dict] = []
        kw: dict[str, Any] = {"Prefix": k}
        while True:
            r = self._call("list_multipart_uploads", key, **kw)
            uploads += [u for u in r.get("Uploads", []) if u.get("Key") == k]
            if not r.get("IsTruncated"):
                break
            kw.update(KeyMarker=r.get("NextKeyMarker"), UploadIdMarker=r.get("NextUploadIdMarker"))
        if not uploads:
            return None, {}
        upload_id = max(uploads, key=lambda u: u["Initiated"])["UploadId"]
        parts: dict[int, dict] = {}
        kw = {}
        while True:
            try:
                r = self._call("list_parts", key, Key=k, UploadId=upload_id, **kw)
            except NotFoundError:  # completed or aborted since it was listed
                return None, {}
            parts.update((p["PartNumber"], p) for p in r.get("Parts", []))
            if not r.get("IsTruncated"):
                return upload_id, parts
            kw = {"PartNumberMarker": r["NextPartNumberMarker"]}

    def _multipart(self, key, path, size, sha256, cond, progress) -> None:
        """Upload ``path`` in parts, continuing an unfinished upload of the same key when there is one:
        a part it already holds with the same size and checksum (its SHA256, or where the server lists
        none, the ETag that is the part's MD5) is not sent again. The key names the blob's sha256, so
        an unfinished upload of it is an earlier attempt at the same bytes; each part is still checked."""
        k = self._k(key)
        upload_id, held = self._pending_upload(key, k)
        if upload_id is None:
            upload_id = self._call("create_multipart_upload", key, Key=k, ChecksumAlgorithm="SHA256")["UploadId"]
        n = (size + self.part_size - 1) // self.part_size
        lock = threading.Lock()

        def part(i: int) -> dict:
            with open(path, "rb") as f:
                f.seek(i * self.part_size)
                data = f.read(self.part_size)
            old = held.get(i + 1)
            checksum = _b64_sha256(data)
            if old is not None and int(old.get("Size", -1)) == len(data) and (
                old.get("ChecksumSHA256") == checksum
                if old.get("ChecksumSHA256")
                else str(old.get("ETag", "")).strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest()
            ):
                entry = {"PartNumber": i + 1, "ETag": old["ETag"], "ChecksumSHA256": checksum}
            else:
                entry = self._upload_part(key, k, upload_id, i + 1, data)
            if progress:
                with lock:
                    progress(len(data))
            return entry

        pool = worker_pool(min(self.max_workers, n), "slmpkg-part")
        try:
            try:
                futures = [pool.submit(part, i) for i in range(n)]
                parts = results(futures)
            finally:
                # The first failure (a dead server) cancels the parts not yet started.
                pool.shutdown(wait=True, cancel_futures=True)
            if sha256 is not None:  # the file may have changed between hashing and upload: check before completing
                whole = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        whole.update(chunk)
                if whole.hexdigest() != sha256:
                    raise IntegrityError(f"{path}: changed while uploading (expected sha256:{sha256[:16]})")
            # Nothing is visible under the key until this call succeeds.
            self._call("complete_multipart_upload", key, Key=k, UploadId=upload_id,
                       MultipartUpload={"Parts": parts}, **cond)
        except (_Unreachable, _BrokenOff, KeyboardInterrupt):
            # Cut off (server gone, connection lost) or stopped (Ctrl-C, SIGTERM): the parts stay, and the
            # next push of this blob continues from them. gc aborts uploads older than its grace period.
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
            raise

    def clean_incomplete(self, older_than: float, *, dry_run: bool = False) -> int:
        """Abort multipart uploads under this store's prefix started more than ``older_than`` seconds
        ago: a push killed mid-blob leaves its parts stored (invisible, but billed) until then."""
        import time

        prefix = f"{self.prefix}/" if self.prefix else ""
        now, n = time.time(), 0
        kw: dict[str, Any] = {"Prefix": prefix}
        while True:
            r = self._call("list_multipart_uploads", None, **kw)
            for u in r.get("Uploads", []):
                if now - u["Initiated"].timestamp() >= older_than:
                    if not dry_run:
                        self._call("abort_multipart_upload", u["Key"][len(prefix):] or None, Key=u["Key"],
                                   UploadId=u["UploadId"])
                    n += 1
            if not r.get("IsTruncated"):
                return n
            kw.update(KeyMarker=r.get("NextKeyMarker"), UploadIdMarker=r.get("NextUploadIdMarker"))

    def download(self, key: str, f: BinaryIO, *, size: int | None = None, progress: Progress | None = None) -> int:
        """Ranged parallel GETs of ``part_size``, delivered to ``f`` in order (so a hashing writer sees
        the bytes in sequence); at most ``max_workers + 1`` ranges are in memory at once. Pulls use
        :func:`~slmpkg.registry.store.fetch_resumable` instead, which also survives interruptions."""
        total = self.size(key) if size is None else size
        starts = iter(range(0, total, self.part_size))
        done = 0

        def get(start: int) -> bytearray:
            buf = bytearray(min(total, start + self.part_size) - start)
            self.read_range_into(key, start, memoryview(buf))
            return buf

        pool = worker_pool(self.max_workers, "slmpkg-range")
        pending: list[concurrent.futures.Future] = []
        try:
            for s in starts:
                pending.append(pool.submit(get, s))
                if len(pending) > self.max_workers:
                    break
            while pending:
                data = results([pending.pop(0)])[0]
                nxt = next(starts, None)
                if nxt is not None:
                    pending.append(pool.submit(get, nxt))
                f.write(data)
                done += len(data)
                if progress:
                    progress(len(data))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if done != total:
            raise IntegrityError(f"{self.url}/{key}: got {done} bytes, expected {total}")
        return done
