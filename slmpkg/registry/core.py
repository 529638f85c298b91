"""Registry logic over a :class:`~slmpkg.registry.store.Store`: push, pull, ls, tag, gc.

Layout in the store (content-addressed like OCI)::

    blobs/sha256/<hex>               immutable: artifact files and artifact manifests (create-only)
    indexes/<name>/<release>.json    signed index of NAME:RELEASE (targets -> manifest digests), CAS
    tags/<name>/<tag>.json           signed tag NAME:TAG -> release, CAS

Signed documents (index, tag) are Sigstore bundles written by a :class:`slmpkg.signing.Signer`: a DSSE
envelope (``application/vnd.in-toto+json``) over an in-toto statement v1 whose predicate is the index
(predicate type :data:`INDEX_PREDICATE`) or the tag (:data:`TAG_PREDICATE`) and whose one subject is
``{name: "NAME:RELEASE", digest: {sha256: sha256(canonical predicate JSON)}}``. The same key pair that
signs artifacts with ``slmpkg sign`` signs the registry metadata, and the same
:class:`slmpkg.signing.Verifier` checks it.

A pull checks, TUF-style: the signature (wrong key or altered bytes), the name and release inside the
signed index against the ones asked for (mix-and-match), ``expires`` (freeze), the index ``version``
against the highest this client has seen for that registry and NAME:RELEASE (rollback; remembered in a
state file), the manifest digest and its name/release/target, every file path (no ``..``, absolute
paths, backslashes or duplicates) and every blob's sha256 and size. Blobs land in a content-addressed
cache, downloaded in ranges that an interrupted pull keeps (``cache/tmp/<hex>.partial`` and its range
ledger), so running the same pull again reads only what is missing; a blob enters the cache only once
its digest matched. The output directory is assembled beside its destination (hard links into the
cache, or copies) and renamed into place only when everything verified.

Publishing order is blobs -> manifest -> index -> tag, so a reader never sees a reference to something
missing; concurrent pushes of different targets of one release merge through compare-and-swap.

Example:
    >>> from slmpkg.registry import open_store, push, pull                  # doctest: +SKIP
    >>> from slmpkg.signing import KeySigner, KeyVerifier                   # doctest: +SKIP
    >>> store = open_store("/srv/registry")                                 # doctest: +SKIP
    >>> push(store, "tiny-llama:1.0", "out/tiny-q4", "cpu-x86_64", KeySigner("release.pem"))  # doctest: +SKIP
    >>> pull(store, "tiny-llama:1.0", "cpu-x86_64", "models/tiny", KeyVerifier("release.pub.pem"))  # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slmpkg import __version__
from slmpkg.errors import SignatureError
from slmpkg.signing import (
    DEFAULT_SIGNATURE_NAME,
    PAYLOAD_TYPE,
    KeySigner,
    KeyVerifier,
    Signer,
    Verifier,
    hash_artifact,
    stale_signature,
)

from .errors import (
    ConflictError,
    ExpiredError,
    IntegrityError,
    MixAndMatchError,
    NotFoundError,
    RegistryError,
    RollbackError,
    StoreError,
    TrustError,
    UnsafePathError,
)
from .store import Progress, Store, default_home, fetch_resumable

__all__ = [
    "INDEX_PREDICATE",
    "MANIFEST_MEDIA_TYPE",
    "TAG_PREDICATE",
    "GcResult",
    "PullResult",
    "PushResult",
    "TrustState",
    "gc",
    "ls",
    "parse_ref",
    "pull",
    "push",
    "tag",
]

MANIFEST_MEDIA_TYPE = "application/vnd.slmpkg.manifest.v1+json"
INDEX_PREDICATE = "https://slmpkg.dev/registry/index/v1"
TAG_PREDICATE = "https://slmpkg.dev/registry/tag/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
DEFAULT_EXPIRES = dt.timedelta(days=365)
DEFAULT_GRACE = dt.timedelta(hours=24)

_NAME_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*\Z")
_RELEASE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_TARGET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_HEX_RE = re.compile(r"[0-9a-f]{64}\Z")

_MEDIA_TYPES = {
    ".gguf": "application/vnd.gguf",
    ".onnx": "application/vnd.onnx",
    ".safetensors": "application/vnd.safetensors",
    ".json": "application/json",
    ".sig": "application/vnd.dev.sigstore.bundle.v0.3+json",
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".model": "application/vnd.sentencepiece.model",
}
_FORMATS = {".gguf": "gguf", ".onnx": "onnx", ".safetensors": "safetensors"}


# ---------------------------------------------------------------------------------------------------
# names and keys


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``NAME:RELEASE`` (a release or a tag), checking both parts.

    Example:
        >>> parse_ref("org/tiny-llama:1.0")
        ('org/tiny-llama', '1.0')
    """
    name, sep, release = str(ref).rpartition(":")
    if not sep:
        raise RegistryError(f"{ref!r}: expected NAME:VERSION (or NAME:TAG)")
    _check_name(name)
    _check_release(release, ref)
    return name, release


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name) or len(name) > 200:
        raise RegistryError(f"{name!r}: invalid name (lowercase letters, digits, '.', '_', '-', '/' between parts)")
    return name


def _check_release(release: str, ref: str | None = None) -> str:
    if not _RELEASE_RE.match(release):
        raise RegistryError(f"{ref or release!r}: invalid version or tag {release!r} (letters, digits, '.', '_', '-')")
    return release


def _check_target(target: str) -> str:
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise RegistryError(f"{target!r}: invalid target name (lowercase letters, digits, '.', '_', '-')")
    return target


def blob_key(digest: str) -> str:
    """``blobs/sha256/<hex>`` for ``sha256:<hex>`` or ``<hex>``."""
    hexd = digest.removeprefix("sha256:")
    if not _HEX_RE.match(hexd):
        raise IntegrityError(f"{digest!r}: not a sha256 digest")
    return f"blobs/sha256/{hexd}"


def index_key(name: str, release: str) -> str:
    return f"indexes/{name}/{release}.json"


def tag_key(name: str, tag: str) -> str:
    return f"tags/{name}/{tag}.json"


# ---------------------------------------------------------------------------------------------------
# time and canonical JSON


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(s: Any, source: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    except ValueError:
        raise TrustError(f"{source}: malformed time {s!r}") from None
    if t.tzinfo is None:
        raise TrustError(f"{source}: time {s!r} has no time zone")
    return t


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------
# signed documents


def _sign_doc(signer: Signer, predicate_type: str, subject: str, predicate: Mapping[str, Any]) -> bytes:
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject, "digest": {"sha256": _sha256(_canonical(predicate))}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }
    bundle = signer.sign(json.dumps(statement, indent=2, sort_keys=False).encode("utf-8"))
    return json.dumps(bundle, separators=(",", ":")).encode("utf-8")


def _open_doc(data: bytes, verifier: Verifier | None, predicate_type: str, source: str) -> dict[str, Any]:
    """Verify (when ``verifier`` is given) and parse a signed document; return its predicate."""
    try:
        bundle = json.loads(data)
        if not isinstance(bundle, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise TrustError(f"{source}: malformed signed document: {e}") from None
    if verifier is not None:
        try:
            payload = verifier.verify(bundle, source)
        except TrustError:
            raise
        except SignatureError as e:
            raise TrustError(str(e)) from None
    else:  # unverified read (gc, ls without a key): parse only
        import base64

        try:
            env = bundle["dsseEnvelope"]
            if env.get("payloadType") != PAYLOAD_TYPE:
                raise ValueError("payloadType")
            payload = base64.b64decode(env["payload"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TrustError(f"{source}: malformed signed document ({e})") from None
    try:
        st = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise TrustError(f"{source}: signed payload is not JSON ({e})") from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise TrustError(f"{source}: signed payload is not an in-toto statement v1")
    if st.get("predicateType") != predicate_type:
        raise MixAndMatchError(f"{source}: predicate type {st.get('predicateType')!r}, expected {predicate_type!r}")
    pred = st.get("predicate")
    subjects = st.get("subject")
    if not isinstance(pred, dict) or not isinstance(subjects, list) or len(subjects) != 1:
        raise TrustError(f"{source}: malformed statement (predicate or subject)")
    digest = (subjects[0].get("digest") or {}).get("sha256") if isinstance(subjects[0], dict) else None
    if digest != _sha256(_canonical(pred)):
        raise TrustError(f"{source}: subject digest does not match the predicate")
    return pred


def _verifier_for(signer: Signer, verifier: Verifier | None) -> Verifier:
    if verifier is not None:
        return verifier
    key = getattr(signer, "_key", None)
    if isinstance(signer, KeySigner) and key is not None:
        return KeyVerifier(key.public_key())
    raise RegistryError("push: pass verifier= for this signer (needed to check the index it updates)")


def _check_int(v: Any, what: str, source: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise TrustError(f"{source}: {what} {v!r} is not a positive integer")
    return v


# ---------------------------------------------------------------------------------------------------
# client trust state (rollback protection)


class TrustState:
    """The highest signed-metadata versions this client has accepted, per registry, in a JSON file
    (default ``$SLMPKG_HOME/trust.json``), updated under an ``fcntl`` lock with an atomic rename.

    Example:
        >>> st = TrustState(tmp_path / "trust.json")                # doctest: +SKIP
        >>> st.check_and_record("/reg", "index tiny:1.0", 3, "src")  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_home() / "trust.json"

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_bytes())
                if not isinstance(state, dict):
                    raise ValueError
            except FileNotFoundError:
                state = {}
            except ValueError:
                raise RegistryError(f"{self.path}: corrupt trust state; move it aside to start over") from None
            yield state
        finally:
            os.close(fd)

    def _save(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def seen(self, registry: str, what: str) -> int:
        with self._locked() as state:
            return int(state.get(registry, {}).get(what, 0))

    def check_and_record(self, registry: str, what: str, version: int, source: str) -> None:
        """Raise :class:`RollbackError` if ``version`` is below the highest seen; else remember it."""
        with self._locked() as state:
            seen = int(state.get(registry, {}).get(what, 0))
            if version < seen:
                raise RollbackError(
                    f"{source}: {what} is at version {version}, older than version {seen} this client already "
                    "accepted (rollback)"
                )
            if version > seen:
                state.setdefault(registry, {})[what] = version
                self._save(state)


# ---------------------------------------------------------------------------------------------------
# manifests


def _safe_path(p: Any, source: str) -> str:
    if not isinstance(p, str) or not p or p.startswith("/") or "\\" in p or "\x00" in p or re.match(r"[A-Za-z]:", p):
        raise UnsafePathError(f"{source}: unsafe file path {p!r} (absolute, empty or with a backslash)")
    if any(part in ("", ".", "..") for part in p.split("/")):
        raise UnsafePathError(f"{source}: unsafe file path {p!r} (empty, '.' or '..' component)")
    return p


def _check_manifest(m: Any, source: str, name: str, release: str, target: str) -> list[dict[str, Any]]:
    if not isinstance(m, dict) or m.get("mediaType") != MANIFEST_MEDIA_TYPE:
        raise IntegrityError(f"{source}: not an slmpkg artifact manifest")
    for key, want in (("name", name), ("release", release), ("target", target)):
        if m.get(key) != want:
            raise MixAndMatchError(f"{source}: manifest is for {key} {m.get(key)!r}, expected {want!r}")
    files = m.get("files")
    if not isinstance(files, list) or not files:
        raise IntegrityError(f"{source}: manifest lists no files")
    paths: set[str] = set()
    for f in files:
        if not isinstance(f, dict):
            raise IntegrityError(f"{source}: malformed file entry")
        p = _safe_path(f.get("path"), source)
        if p in paths:
            raise UnsafePathError(f"{source}: file path {p!r} listed twice")
        paths.add(p)
        blob_key(str(f.get("digest", "")))
        if not isinstance(f.get("size"), int) or f["size"] < 0:
            raise IntegrityError(f"{source}: file {p!r} has no valid size")
    for p in paths:  # "a" and "a/b" cannot both be files
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise UnsafePathError(f"{source}: {p!r} lies under file {'/'.join(parts[:i])!r}")
    return files


def build_manifest(
    artifact: str | os.PathLike[str],
    name: str,
    release: str,
    target: str,
    *,
    format: str | None = None,
    quant: str | None = None,
    bits_per_weight: float | None = None,
    source_digest: str | None = None,
    options: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], Path]]]:
    """Hash ``artifact`` (a file or directory) into a manifest dict; also return ``(file entry, local
    path)`` pairs for upload. Symlinks and special files are refused (by :func:`slmpkg.signing.hash_artifact`)."""
    root = Path(artifact)
    try:
        hashed = hash_artifact(root, ignore_git_paths=True, progress=progress)
        if root.is_dir() and (root / DEFAULT_SIGNATURE_NAME).is_file():
            # a signature that travels with the artifact must still describe it, or every device
            # that checks it (model_signing verify) would refuse what this push publishes
            stale = stale_signature(root, hashed)
            if stale is not None:
                raise RegistryError(f"{stale}; re-run `slmpkg sign` before pushing")
    except SignatureError as e:
        raise RegistryError(str(e)) from None
    single = root.is_file()
    entries: list[tuple[dict[str, Any], Path]] = []
    for r in hashed.resources:
        path = root.name if single else r.name
        local = root if single else root.joinpath(*r.name.split("/"))
        ext = os.path.splitext(path)[1].lower()
        entries.append(
            (
                {
                    "path": path,
                    "digest": f"sha256:{r.digest}",
                    "size": r.size,
                    "mediaType": _MEDIA_TYPES.get(ext, "application/octet-stream"),
                },
                local,
            )
        )
    if not entries:
        raise RegistryError(f"{root}: no files to push")
    if format is None:
        found = {_FORMATS[e] for e in (os.path.splitext(f["path"])[1].lower() for f, _ in entries) if e in _FORMATS}
        format = found.pop() if len(found) == 1 else None
    manifest: dict[str, Any] = {
        "schemaVersion": 1,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "name": name,
        "release": release,
        "target": target,
        "format": format,
        "quant": quant,
        "bitsPerWeight": bits_per_weight,
        "files": [f for f, _ in entries],
        "provenance": {
            "sourceDigest": source_digest,
            "slmpkgVersion": __version__,
            "options": dict(options or {}),
        },
    }
    return manifest, entries


# ---------------------------------------------------------------------------------------------------
# push


@dataclasses.dataclass(frozen=True)
class PushResult:
    name: str
    release: str
    target: str
    manifest_digest: str
    index_version: int
    uploaded_bytes: int
    existing_bytes: int
    files: tuple[str, ...]


def _parallel(fn, items: Iterable[Any], max_workers: int) -> list[Any]:
    """``[fn(x) for x in items]`` on up to ``max_workers`` threads. The first failure cancels what has
    not started (a dead server should fail the command once, not once per remaining file) and is
    raised after the running calls return."""
    items = list(items)
    if not items:
        return []
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(max_workers, len(items))))
    try:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _retry_sleep(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.02 * (2**attempt), 1.0)))


def push(
    store: Store,
    ref: str,
    artifact: str | os.PathLike[str],
    target: str,
    signer: Signer,
    *,
    verifier: Verifier | None = None,
    format: str | None = None,
    quant: str | None = None,
    bits_per_weight: float | None = None,
    source_digest: str | None = None,
    options: Mapping[str, Any] | None = None,
    expires_in: dt.timedelta = DEFAULT_EXPIRES,
    force: bool = False,
    tags: Iterable[str] = (),
    max_workers: int = 4,
    max_attempts: int = 100,
    progress: Progress | None = None,
) -> PushResult:
    """Publish ``artifact`` as ``target`` of ``NAME:RELEASE``: blobs, then the manifest, then the signed
    index (merged by compare-and-swap with concurrent pushers of other targets), then ``tags``.

    Re-pushing identical content is a no-op; replacing a target's content needs ``force=True``.
    ``verifier`` checks the index being updated (derived from a :class:`KeySigner` when omitted).
    """
    name, release = parse_ref(ref)
    _check_target(target)
    check = _verifier_for(signer, verifier)
    manifest, entries = build_manifest(
        artifact, name, release, target, format=format, quant=quant, bits_per_weight=bits_per_weight,
        source_digest=source_digest, options=options,
    )

    # 1. blobs (create-only; a blob that exists is touched so a concurrent gc keeps it)
    uploaded = existing = 0

    def upload(item: tuple[dict[str, Any], Path]) -> tuple[bool, int]:
        f, local = item
        key = blob_key(f["digest"])
        created = store.put_file(key, local, sha256=f["digest"].removeprefix("sha256:"), if_absent=True, progress=progress)
        if not created:
            store.touch(key)
        return created, f["size"]

    unique = list({f["digest"]: (f, p) for f, p in entries}.values())
    for created, size in _parallel(upload, unique, max_workers):
        if created:
            uploaded += size
        else:
            existing += size

    # 2. manifest
    mbytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    mdigest = f"sha256:{_sha256(mbytes)}"
    if not store.put_if_absent(blob_key(mdigest), mbytes):
        store.touch(blob_key(mdigest))

    # 3. index, by compare-and-swap
    ikey = index_key(name, release)
    source = f"{store.url}/{ikey}"
    entry = {"digest": mdigest, "size": len(mbytes), "mediaType": MANIFEST_MEDIA_TYPE}
    version = 0
    for attempt in range(max_attempts):
        try:
            data, etag = store.get_with_etag(ikey)
            old = _open_doc(data, check, INDEX_PREDICATE, source)
            if old.get("name") != name or old.get("release") != release:
                raise MixAndMatchError(f"{source}: index is for {old.get('name')}:{old.get('release')}, expected {name}:{release}")
            old_version = _check_int(old.get("version"), "version", source)
            targets = dict(old.get("targets") or {})
        except NotFoundError:
            etag, old_version, targets = None, 0, {}
        current = targets.get(target)
        if current is not None and current.get("digest") == mdigest:
            version = old_version
            break
        if current is not None and not force:
            raise ConflictError(
                f"{name}:{release} already has target {target} with other content ({current.get('digest', '')[:23]}); "
                "push a new version or pass force"
            )
        targets[target] = entry
        now = _now()
        predicate = {
            "name": name,
            "release": release,
            "version": old_version + 1,
            "updated": _fmt_time(now),
            "expires": _fmt_time(now + expires_in),
            "targets": dict(sorted(targets.items())),
        }
        try:
            store.compare_and_swap(ikey, etag, _sign_doc(signer, INDEX_PREDICATE, f"{name}:{release}", predicate))
        except ConflictError:
            _retry_sleep(attempt)
            continue
        version = old_version + 1
        break
    else:
        raise ConflictError(f"{source}: gave up after {max_attempts} concurrent updates")

    # 4. tags
    for t in tags:
        tag(store, f"{name}:{t}", release, signer, verifier=check, expires_in=expires_in)

    return PushResult(name, release, target, mdigest, version, uploaded, existing, tuple(f["path"] for f, _ in entries))


# ---------------------------------------------------------------------------------------------------
# tags


def tag(
    store: Store,
    ref: str,
    release: str,
    signer: Signer,
    *,
    verifier: Verifier | None = None,
    expires_in: dt.timedelta = DEFAULT_EXPIRES,
    max_attempts: int = 100,
) -> int:
    """Point ``NAME:TAG`` at ``release`` (which must exist) with a signed tag moved by
    compare-and-swap; return the tag's new version."""
    name, t = parse_ref(ref)
    _check_release(release)
    check = _verifier_for(signer, verifier)
    if not store.exists(index_key(name, release)):
        raise NotFoundError(f"{name}:{release}: no such version in {store.url}")
    if store.exists(index_key(name, t)):
        raise RegistryError(f"{name}:{t}: is a version, not a tag; pick another tag name")
    key = tag_key(name, t)
    source = f"{store.url}/{key}"
    for attempt in range(max_attempts):
        try:
            data, etag = store.get_with_etag(key)
            old = _open_doc(data, check, TAG_PREDICATE, source)
            old_version = _check_int(old.get("version"), "version", source)
            if old.get("release") == release:
                return old_version
        except NotFoundError:
            etag, old_version = None, 0
        now = _now()
        predicate = {
            "name": name,
            "tag": t,
            "release": release,
            "version": old_version + 1,
            "updated": _fmt_time(now),
            "expires": _fmt_time(now + expires_in),
        }
        try:
            store.compare_and_swap(key, etag, _sign_doc(signer, TAG_PREDICATE, f"{name}:{t}", predicate))
            return old_version + 1
        except ConflictError:
            _retry_sleep(attempt)
    raise ConflictError(f"{source}: gave up after {max_attempts} concurrent updates")


# ---------------------------------------------------------------------------------------------------
# pull


@dataclasses.dataclass(frozen=True)
class PullResult:
    name: str
    release: str
    target: str
    out_dir: Path
    manifest_digest: str
    index_version: int
    files: tuple[str, ...]
    downloaded_bytes: int  # read from the store by this pull
    cached_bytes: int  # blobs already complete in the cache
    changed: bool  # False when out_dir already held exactly this artifact
    resumed_bytes: int = 0  # kept from an interrupted earlier pull (not read again)


def _check_fresh(pred: Mapping[str, Any], now: dt.datetime, source: str) -> None:
    expires = _parse_time(pred.get("expires"), source)
    if expires <= now:
        raise ExpiredError(f"{source}: expired at {_fmt_time(expires)} (the registry may be frozen or stale)")


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(bytearray(1 << 20))
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``fcntl`` lock on ``path`` (created if missing), held for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class _Fetched:
    path: Path
    fetched: int  # bytes read from the store by this pull
    resumed: int  # bytes kept from an interrupted earlier pull
    cached: bool  # the blob was already complete in the cache


def _fetch_blob(
    store: Store, digest: str, size: int, cache: Path, *, verify_cache: bool, progress: Progress | None
) -> _Fetched:
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
            if path.stat().st_size == size and (not verify_cache or _hash_file(path) == hexd):
                return True
            path.unlink()  # corrupt cache entry: fetch again
        return False

    if cached():
        return _Fetched(path, 0, 0, True)
    tmpdir = cache / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = tmpdir / f"{hexd}.partial"
    ledger = tmpdir / f"{hexd}.partial.ranges"
    with _file_lock(tmpdir / f"{hexd}.lock"):
        if cached():  # another pull finished it while we waited for the lock
            return _Fetched(path, 0, 0, True)
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
    return _Fetched(path, fetched, resumed, False)


def _ranges_kept(ledger: Path, size: int) -> int:
    """Bytes an interrupted fetch recorded in its ledger (for the error message)."""
    try:
        lines = ledger.read_text("ascii").split("\n")
        rs = int(lines[0].split()[-1])
    except (OSError, ValueError, IndexError):
        return 0
    done = {int(x) for x in lines[1:-1] if x.isdigit()}
    return sum(min(size, (i + 1) * rs) - i * rs for i in done if i * rs < size)


def _out_matches(out: Path, files: Sequence[Mapping[str, Any]], blobs: Mapping[str, Path]) -> bool:
    """Whether ``out`` holds exactly ``files`` (same inode as the cache blob, or same size and digest)."""
    want = {f["path"]: f for f in files}
    have = set()
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            have.add(n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}")
    if have != set(want):
        return False
    for p, f in want.items():
        local = out.joinpath(*p.split("/"))
        st = os.lstat(local)
        if not stat.S_ISREG(st.st_mode) or st.st_size != f["size"]:
            return False
        cst = os.stat(blobs[f["digest"]])
        if (st.st_ino, st.st_dev) != (cst.st_ino, cst.st_dev) and _hash_file(local) != f["digest"].removeprefix("sha256:"):
            return False
    return True


def _trusted_doc(
    store: Store, key: str, verifier: Verifier, predicate_type: str, expected: Mapping[str, str],
    state: TrustState, now: dt.datetime, missing: str,
) -> tuple[dict[str, Any], int]:
    """A signed index or tag at ``key``, checked as a pull must: signature, that it names what was
    asked for (mix-and-match), expiry (freeze) and that its version never goes back (rollback).
    Returns the predicate and its version."""
    source = f"{store.url}/{key}"
    try:
        data = store.get(key)
    except NotFoundError:
        raise NotFoundError(missing) from None
    what = "tag" if predicate_type == TAG_PREDICATE else "index"
    pred = _open_doc(data, verifier, predicate_type, source)
    if any(pred.get(k) != v for k, v in expected.items()):
        found = ":".join(str(pred.get(k)) for k in expected)
        raise MixAndMatchError(f"{source}: signed {what} is for {found}, expected {':'.join(expected.values())}")
    _check_fresh(pred, now, source)
    version = _check_int(pred.get("version"), "version", source)
    state.check_and_record(store.url, f"{what} {':'.join(expected.values())}", version, source)
    return pred, version


def _resolve(store: Store, name: str, ref: str, verifier: Verifier, state: TrustState, now: dt.datetime) -> str:
    """The release ``NAME:REF`` names: ``REF`` itself when it is a version, else the tag's target."""
    if store.exists(index_key(name, ref)):
        return ref
    pred, _ = _trusted_doc(store, tag_key(name, ref), verifier, TAG_PREDICATE, {"name": name, "tag": ref},
                           state, now, f"{name}:{ref}: no such version or tag in {store.url}")
    return _check_release(str(pred.get("release")))


def pull(
    store: Store,
    ref: str,
    target: str | Sequence[str],
    out_dir: str | os.PathLike[str],
    verifier: Verifier,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    state: TrustState | str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    link: bool = True,
    verify_cache: bool = True,
    max_workers: int = 4,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Fetch, verify and install ``target`` of ``NAME:RELEASE`` (or ``NAME:TAG``) into ``out_dir``.

    ``target`` is one target or a ranked list (most specific first; the first one published wins).
    Nothing appears at ``out_dir`` unless every check passed; an existing non-empty ``out_dir`` holding
    something else is replaced only with ``overwrite=True``. ``cache_dir`` defaults to
    ``$SLMPKG_HOME/cache``; ``state`` (the rollback memory) to ``$SLMPKG_HOME/trust.json``.
    If the pull fails half-way (server gone, Ctrl-C), the ranges it fetched stay in the cache and the
    same pull run again fetches only the rest (``PullResult.resumed_bytes``).
    """
    name, ref_part = parse_ref(ref)
    candidates = [target] if isinstance(target, str) else list(target)
    for t in candidates:
        _check_target(t)
    if not candidates:
        raise RegistryError(f"{ref}: no target given")
    now = now or _now()
    trust = state if isinstance(state, TrustState) else TrustState(state)
    cache = Path(cache_dir) if cache_dir is not None else default_home() / "cache"
    out = Path(out_dir)

    # 1. the signed index: signature, name/release, expiry, rollback
    release = _resolve(store, name, ref_part, verifier, trust, now)
    ikey = index_key(name, release)
    source = f"{store.url}/{ikey}"
    idx, version = _trusted_doc(store, ikey, verifier, INDEX_PREDICATE, {"name": name, "release": release},
                                trust, now, f"{name}:{release}: no such version in {store.url}")

    targets = idx.get("targets")
    if not isinstance(targets, dict):
        raise TrustError(f"{source}: index has no targets")
    chosen = next((t for t in candidates if t in targets), None)
    if chosen is None:
        raise NotFoundError(
            f"{name}:{release} has no artifact for {', '.join(candidates)} (published: {', '.join(sorted(targets)) or 'none'})"
        )
    entry = targets[chosen]
    mdigest = str(entry.get("digest", "")) if isinstance(entry, dict) else ""

    # 2. the manifest (content-addressed: its digest is signed)
    mkey = blob_key(mdigest)
    msource = f"{store.url}/{mkey}"
    try:
        mbytes = store.get(mkey)
    except NotFoundError:
        raise IntegrityError(f"{msource}: manifest of {name}:{release} {chosen} is missing from the store") from None
    if f"sha256:{_sha256(mbytes)}" != mdigest:
        raise IntegrityError(f"{msource}: manifest does not match its signed digest; refusing it")
    try:
        manifest = json.loads(mbytes)
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError(f"{msource}: manifest is not JSON") from None
    files = _check_manifest(manifest, msource, name, release, chosen)

    # 3. blobs into the cache, each verified; an interrupted earlier pull's ranges are kept
    blobs: dict[str, Path] = {}
    downloaded = cached = resumed = 0
    unique = {f["digest"]: f["size"] for f in files}

    def fetch(item: tuple[str, int]) -> tuple[str, _Fetched]:
        d, size = item
        return d, _fetch_blob(store, d, size, cache, verify_cache=verify_cache, progress=progress)

    # Small blobs side by side; blobs of several ranges one after another, since each already reads
    # store.range_concurrency ranges at once (more would only add connections and memory).
    small = [(d, n) for d, n in unique.items() if n <= store.range_size]
    large = [(d, n) for d, n in unique.items() if n > store.range_size]
    for d, got in _parallel(fetch, small, max_workers) + [fetch(x) for x in large]:
        blobs[d] = got.path
        downloaded += got.fetched
        resumed += got.resumed
        if got.cached:
            cached += unique[d]

    result = dict(
        name=name, release=release, target=chosen, out_dir=out, manifest_digest=mdigest, index_version=version,
        files=tuple(f["path"] for f in files), downloaded_bytes=downloaded, cached_bytes=cached,
        resumed_bytes=resumed,
    )

    # 4. assemble beside out_dir, then rename into place
    if out.is_dir() and not out.is_symlink() and _out_matches(out, files, blobs):
        return PullResult(**result, changed=False)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RegistryError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RegistryError(f"{out}: not empty and holds something else; pass overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.pull-", dir=out.parent))
    try:
        for f in files:
            dest = staging.joinpath(*f["path"].split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = blobs[f["digest"]]
            if link:
                try:
                    os.link(src, dest)
                    continue
                except OSError:
                    pass  # other file system, or links not allowed: copy
            shutil.copyfile(src, dest)
            os.chmod(dest, 0o644)
        os.chmod(staging, 0o755)
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, backup / "d")
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(backup / "d", out)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return PullResult(**result, changed=True)


# ---------------------------------------------------------------------------------------------------
# ls and gc


def _read_index(store: Store, key: str, verifier: Verifier | None) -> dict[str, Any]:
    return _open_doc(store.get(key), verifier, INDEX_PREDICATE, f"{store.url}/{key}")


def ls(store: Store, ref: str | None = None, *, verifier: Verifier | None = None) -> Any:
    """What the registry holds, as JSON-ready data.

    - ``ls(store)``: ``[name, ...]``
    - ``ls(store, "NAME")``: ``{"name", "versions": {release: {"version", "expires", "targets": [..]}}, "tags": {tag: release}}``
    - ``ls(store, "NAME:RELEASE")``: the index predicate plus each target's manifest under ``manifests``.

    Signed documents are verified when ``verifier`` is given, else only parsed.
    """
    if ref is None:
        return sorted({k[len("indexes/"):].rpartition("/")[0] for k in store.list("indexes/") if k.endswith(".json")})
    if ":" not in ref:
        name = _check_name(ref)
        versions = {}
        for k in store.list(f"indexes/{name}/"):
            rel = k[len(f"indexes/{name}/"):]
            if "/" in rel or not rel.endswith(".json"):
                continue
            pred = _read_index(store, k, verifier)
            versions[rel[:-5]] = {
                "version": pred.get("version"),
                "expires": pred.get("expires"),
                "targets": sorted(pred.get("targets") or {}),
            }
        tags = {}
        for k in store.list(f"tags/{name}/"):
            rel = k[len(f"tags/{name}/"):]
            if "/" in rel or not rel.endswith(".json"):
                continue
            pred = _open_doc(store.get(k), verifier, TAG_PREDICATE, f"{store.url}/{k}")
            tags[rel[:-5]] = pred.get("release")
        if not versions and not tags:
            raise NotFoundError(f"{name}: not in {store.url}")
        return {"name": name, "versions": versions, "tags": tags}
    name, release = parse_ref(ref)
    try:
        pred = _read_index(store, index_key(name, release), verifier)
    except NotFoundError:
        raise NotFoundError(f"{name}:{release}: no such version in {store.url}") from None
    out = dict(pred)
    out["manifests"] = {}
    for t, e in sorted((pred.get("targets") or {}).items()):
        mbytes = store.get(blob_key(e["digest"]))
        if f"sha256:{_sha256(mbytes)}" != e["digest"]:
            raise IntegrityError(f"{store.url}/{blob_key(e['digest'])}: manifest does not match its digest")
        out["manifests"][t] = json.loads(mbytes)
    return out


@dataclasses.dataclass(frozen=True)
class GcResult:
    deleted: tuple[str, ...]
    freed_bytes: int
    kept_young: tuple[str, ...]  # unreferenced, but inside the grace period
    referenced: int
    incomplete_cleaned: int = 0  # leftovers of interrupted writes (e.g. S3 multipart uploads) removed


def gc(store: Store, *, grace: dt.timedelta = DEFAULT_GRACE, dry_run: bool = False, now: float | None = None) -> GcResult:
    """Delete blobs no index references (directly as a manifest or through one), except those written or
    touched within ``grace``: a push uploads (or touches) its blobs before it writes the index that
    references them, so a concurrent push's blobs survive as long as it finishes within the grace period.
    """
    live: set[str] = set()
    for k in store.list("indexes/"):
        if not k.endswith(".json"):
            continue
        try:
            pred = _read_index(store, k, None)
        except (TrustError, NotFoundError):
            continue  # unreadable index: it references nothing we can see (and cannot be pulled)
        for e in (pred.get("targets") or {}).values():
            d = str(e.get("digest", "")) if isinstance(e, dict) else ""
            try:
                mk = blob_key(d)
            except IntegrityError:
                continue
            live.add(mk)
            try:
                m = json.loads(store.get(mk))
                for f in m.get("files", []):
                    with contextlib.suppress(IntegrityError, AttributeError, TypeError):
                        live.add(blob_key(str(f.get("digest", ""))))
            except (NotFoundError, ValueError, UnicodeDecodeError, AttributeError):
                continue
    now = time.time() if now is None else now
    deleted, young, freed = [], [], 0
    for k in store.list("blobs/sha256/"):
        if k in live:
            continue
        try:
            if now - store.mtime(k) < grace.total_seconds():
                young.append(k)
                continue
            size = store.size(k)
        except NotFoundError:
            continue
        if not dry_run:
            store.delete(k)
        deleted.append(k)
        freed += size
    # A push killed mid-upload leaves parts behind; one older than the grace period is abandoned.
    incomplete = store.clean_incomplete(grace.total_seconds(), dry_run=dry_run)
    return GcResult(tuple(deleted), freed, tuple(young), len(live), incomplete)
