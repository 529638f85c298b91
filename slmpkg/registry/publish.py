"""Publishing: :func:`push` an artifact for one target of a release, point a :func:`tag` at a release.

Publishing order is blobs -> manifest -> index -> tag, so a reader never sees a reference to something
missing; concurrent pushes of different targets of one release merge through compare-and-swap on the
signed index.

Example:
    >>> from slmpkg.registry import open_store, push                        # doctest: +SKIP
    >>> from slmpkg.signing import KeySigner                                # doctest: +SKIP
    >>> push(open_store("/srv/registry"), "tiny-llama:1.0", "out/tiny-q4", "cpu-x86_64", KeySigner("release.pem"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from slmpkg.signing import Signer, Verifier

from .errors import ConflictError, MixAndMatchError, NotFoundError, RegistryError
from .manifest import MANIFEST_MEDIA_TYPE, build_manifest
from .names import blob_key, check_name, check_release, check_target, index_key, parse_ref, tag_key
from .signed import (
    DEFAULT_EXPIRES,
    INDEX_PREDICATE,
    TAG_PREDICATE,
    check_int,
    fmt_time,
    now_utc,
    open_doc,
    sha256_hex,
    sign_doc,
    verifier_for,
)
from .store import Progress, Store, parallel_map

__all__ = ["PushResult", "Refreshed", "push", "refresh", "tag"]


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


def _create_or_touch(store: Store, key: str, create: Callable[[], bool], attempts: int = 3) -> bool:
    """Create the blob ``key`` with ``create()`` (True), or, when it already exists, touch it so that a
    concurrent gc keeps it (False). A gc may delete it between the existence check and the touch:
    then it is created again."""
    for _ in range(attempts):
        if create():
            return True
        try:
            store.touch(key)
            return False
        except NotFoundError:
            continue  # collected in between: upload it again
    raise ConflictError(f"{store.url}/{key}: deleted {attempts} times while this push wrote it "
                        "(a gc with no grace period running alongside?)")


def _refuse_tag_name(store: Store, name: str, release: str) -> None:
    """A version may not shadow a tag (nor a tag a version, see :func:`tag`): ``NAME:X`` must name one
    thing, or which release a pull installs would depend on a lookup order."""
    if store.exists(tag_key(name, release)):
        raise RegistryError(f"{name}:{release}: is a tag, not a version; pick another version name")


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
    sign_artifact: bool = True,
    max_workers: int = 4,
    max_attempts: int = 100,
    progress: Progress | None = None,
) -> PushResult:
    """Publish ``artifact`` as ``target`` of ``NAME:RELEASE``: blobs, then the manifest, then the signed
    index (merged by compare-and-swap with concurrent pushers of other targets), then ``tags``.

    An artifact without its own ``model.sig`` gets one made with ``signer`` (unless
    ``sign_artifact=False``), published with it and never written into ``artifact``: see
    :func:`~slmpkg.registry.manifest.build_manifest`. Every pulled copy then verifies with
    ``model_signing verify key``.

    Re-pushing identical content is a no-op; replacing a target's content needs ``force=True``.
    ``verifier`` checks the index being updated (derived from a :class:`KeySigner` when omitted).
    """
    name, release = parse_ref(ref)
    check_target(target)
    check = verifier_for(signer, verifier)
    _refuse_tag_name(store, name, release)
    manifest, entries = build_manifest(
        artifact, name, release, target, format=format, quant=quant, bits_per_weight=bits_per_weight,
        source_digest=source_digest, options=options, signer=signer if sign_artifact else None,
    )

    # 1. blobs (create-only; a blob that exists is touched so a concurrent gc keeps it)
    uploaded = existing = 0
    creators: dict[str, Callable[[], bool]] = {}

    def upload(item: tuple[dict[str, Any], Path | bytes]) -> tuple[bool, int]:
        f, local = item
        key = blob_key(f["digest"])
        if isinstance(local, bytes):  # made here (the artifact's signature)
            creators[key] = lambda: store.put_if_absent(key, local)
        else:
            creators[key] = lambda: store.put_file(key, local, sha256=f["digest"].removeprefix("sha256:"),
                                                   if_absent=True, progress=progress)
        return _create_or_touch(store, key, creators[key]), f["size"]

    unique = list({f["digest"]: (f, p) for f, p in entries}.values())
    # Small blobs side by side; blobs the store splits into parallel parts one after another, from this
    # thread, so that an interrupt stops their parts (it is raised here, not in a worker thread).
    split = store.multipart_threshold
    small = [x for x in unique if split is None or x[0]["size"] <= split]
    large = [x for x in unique if split is not None and x[0]["size"] > split]
    for created, size in parallel_map(upload, small, max_workers) + [upload(x) for x in large]:
        if created:
            uploaded += size
        else:
            existing += size

    # 2. manifest
    mbytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    mdigest = f"sha256:{sha256_hex(mbytes)}"
    mkey = blob_key(mdigest)
    creators[mkey] = lambda: store.put_if_absent(mkey, mbytes)
    _create_or_touch(store, mkey, creators[mkey])

    # 3. index, by compare-and-swap
    ikey = index_key(name, release)
    source = f"{store.url}/{ikey}"
    entry = {"digest": mdigest, "size": len(mbytes), "mediaType": MANIFEST_MEDIA_TYPE}
    version = 0
    for attempt in range(max_attempts):
        try:
            data, etag = store.get_with_etag(ikey)
            old = open_doc(data, check, INDEX_PREDICATE, source)
            if old.get("name") != name or old.get("release") != release:
                raise MixAndMatchError(f"{source}: index is for {old.get('name')}:{old.get('release')}, expected {name}:{release}")
            old_version = check_int(old.get("version"), "version", source)
            targets = dict(old.get("targets") or {})
        except NotFoundError:
            etag, old_version, targets = None, 0, {}
            _refuse_tag_name(store, name, release)  # again: a tag may have appeared while blobs went up
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
        now = now_utc()
        predicate = {
            "name": name,
            "release": release,
            "version": old_version + 1,
            "updated": fmt_time(now),
            "expires": fmt_time(now + expires_in),
            "targets": dict(sorted(targets.items())),
        }
        try:
            store.compare_and_swap(ikey, etag, sign_doc(signer, INDEX_PREDICATE, f"{name}:{release}", predicate))
        except ConflictError:
            _retry_sleep(attempt)
            continue
        version = old_version + 1
        break
    else:
        raise ConflictError(f"{source}: gave up after {max_attempts} concurrent updates")

    # A gc that checked a reused blob's age just before this push touched it may still delete it
    # (stores whose check-and-delete is not one step): make sure what the index references is there.
    for key, create in creators.items():
        if not store.exists(key):
            _create_or_touch(store, key, create)

    # 4. tags
    for t in tags:
        tag(store, f"{name}:{t}", release, signer, verifier=check, expires_in=expires_in)

    return PushResult(name, release, target, mdigest, version, uploaded, existing, tuple(f["path"] for f, _ in entries))


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
    check_release(release)
    check = verifier_for(signer, verifier)
    if not store.exists(index_key(name, release)):
        raise NotFoundError(f"{name}:{release}: no such version in {store.url}")
    if store.exists(index_key(name, t)):
        raise RegistryError(f"{name}:{t}: is a version, not a tag; pick another tag name")
    key = tag_key(name, t)
    source = f"{store.url}/{key}"
    for attempt in range(max_attempts):
        try:
            data, etag = store.get_with_etag(key)
            old = open_doc(data, check, TAG_PREDICATE, source)
            old_version = check_int(old.get("version"), "version", source)
            if old.get("release") == release:
                return old_version
        except NotFoundError:
            etag, old_version = None, 0
        now = now_utc()
        predicate = {
            "name": name,
            "tag": t,
            "release": release,
            "version": old_version + 1,
            "updated": fmt_time(now),
            "expires": fmt_time(now + expires_in),
        }
        try:
            store.compare_and_swap(key, etag, sign_doc(signer, TAG_PREDICATE, f"{name}:{t}", predicate))
            return old_version + 1
        except ConflictError:
            _retry_sleep(attempt)
    raise ConflictError(f"{source}: gave up after {max_attempts} concurrent updates")




@dataclasses.dataclass(frozen=True)
class Refreshed:
    """One signed document :func:`refresh` re-signed: ``"index NAME:VERSION"`` or ``"tag NAME:TAG"``,
    its new version and expiry."""

    what: str
    version: int
    expires: str


def refresh(
    store: Store,
    ref: str,
    signer: Signer,
    *,
    verifier: Verifier | None = None,
    expires_in: dt.timedelta = DEFAULT_EXPIRES,
    max_attempts: int = 100,
) -> list[Refreshed]:
    """Re-sign signed metadata with a new expiry, content unchanged: the index of ``NAME:VERSION``, the
    tag ``NAME:TAG``, or every index and tag of ``NAME``. Each gets ``version + 1`` (so clients that saw
    the old one accept it, and never go back to it) and ``expires = now + expires_in``.

    Signed metadata expires so that a registry frozen by an attacker (or a stale mirror) is noticed;
    a release that should stay installable needs a refresh before it expires, e.g. from a scheduled job.
    The current document must verify (``verifier``, derived from a :class:`KeySigner` when omitted),
    expired or not: a refresh never re-signs what someone else wrote.

    Example:
        >>> [r.what for r in refresh(store, "tiny", KeySigner("release.pem"))]   # doctest: +SKIP
        ['index tiny:1.0', 'index tiny:2.0', 'tag tiny:stable']
    """
    check = verifier_for(signer, verifier)
    if ":" in ref:
        name, part = parse_ref(ref)
        if store.exists(index_key(name, part)):
            docs = [(index_key(name, part), part)]
        elif store.exists(tag_key(name, part)):
            docs = [(tag_key(name, part), part)]
        else:
            raise NotFoundError(f"{name}:{part}: no such version or tag in {store.url}")
    else:
        name = check_name(ref)
        docs = [(k, k.rpartition("/")[2][: -len(".json")])
                for prefix in (f"indexes/{name}/", f"tags/{name}/") for k in store.list(prefix)
                if k.endswith(".json") and "/" not in k[len(prefix):]]
        if not docs:
            raise NotFoundError(f"{name}: not in {store.url}")
    return [_resign(store, key, name, part, signer, check, expires_in, max_attempts) for key, part in docs]


def _resign(store: Store, key: str, name: str, part: str, signer: Signer, check: Verifier,
            expires_in: dt.timedelta, max_attempts: int) -> Refreshed:
    is_tag = key.startswith("tags/")
    predicate_type, field = (TAG_PREDICATE, "tag") if is_tag else (INDEX_PREDICATE, "release")
    source = f"{store.url}/{key}"
    for attempt in range(max_attempts):
        data, etag = store.get_with_etag(key)
        old = open_doc(data, check, predicate_type, source)
        if old.get("name") != name or old.get(field) != part:
            raise MixAndMatchError(f"{source}: signed document is for {old.get('name')}:{old.get(field)}, "
                                   f"expected {name}:{part}")
        version = check_int(old.get("version"), "version", source) + 1
        now = now_utc()
        predicate = {**old, "version": version, "updated": fmt_time(now), "expires": fmt_time(now + expires_in)}
        try:
            store.compare_and_swap(key, etag, sign_doc(signer, predicate_type, f"{name}:{part}", predicate))
        except ConflictError:
            _retry_sleep(attempt)
            continue
        return Refreshed(f"{'tag' if is_tag else 'index'} {name}:{part}", version, predicate["expires"])
    raise ConflictError(f"{source}: gave up after {max_attempts} concurrent updates")
