"""Garbage collection: :func:`gc` deletes blobs no index references.

Example:
    >>> gc(open_store("/srv/registry"), grace=dt.timedelta(hours=24)).freed_bytes   # doctest: +SKIP
    1073741824
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time

from .errors import IntegrityError, NotFoundError, RegistryError, TrustError
from .listing import read_index
from .names import blob_key
from .signed import sha256_hex
from .store import Store

__all__ = ["DEFAULT_GRACE", "GcResult", "gc"]

DEFAULT_GRACE = dt.timedelta(hours=24)


@dataclasses.dataclass(frozen=True)
class GcResult:
    deleted: tuple[str, ...]
    freed_bytes: int
    kept_young: tuple[str, ...]  # unreferenced, but written or touched within the grace period
    referenced: int
    incomplete_cleaned: int = 0  # leftovers of interrupted writes (e.g. S3 multipart uploads) removed


def _live_blobs(store: Store) -> set[str]:
    """Every blob key an index references (its manifests, and the files they list).

    Fails closed: an index or manifest that cannot be read, parsed or checked raises, because the blobs
    it references cannot be known and deleting "unreferenced" blobs could then break a release.
    """
    live: set[str] = set()
    for k in store.list("indexes/"):
        if not k.endswith(".json"):
            continue
        try:
            pred = read_index(store, k, None)
        except NotFoundError:
            continue  # deleted since listed: it references nothing any more
        except TrustError as e:
            raise _unreadable(f"{e}") from None
        targets = pred.get("targets")
        if not isinstance(targets, dict):
            raise _unreadable(f"{store.url}/{k}: index has no targets")
        for target, e in targets.items():
            digest = str(e.get("digest", "")) if isinstance(e, dict) else ""
            source = f"{store.url}/{k} (target {target})"
            try:
                mk = blob_key(digest)
                data = store.get(mk)
            except IntegrityError:
                raise _unreadable(f"{source}: manifest digest {digest!r} is not a sha256 digest") from None
            except NotFoundError:
                raise _unreadable(f"{source}: its manifest {digest} is missing from the store") from None
            if f"sha256:{sha256_hex(data)}" != digest:
                raise _unreadable(f"{store.url}/{mk}: manifest does not match its digest")
            live.add(mk)
            try:
                files = json.loads(data)["files"]
                live.update(blob_key(str(f["digest"])) for f in files)
            except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError, IntegrityError):
                raise _unreadable(f"{store.url}/{mk}: malformed manifest (no readable file list)") from None
    return live


def _unreadable(what: str) -> RegistryError:
    return RegistryError(f"{what}; gc deleted nothing (fix or remove that index first)")


def gc(store: Store, *, grace: dt.timedelta = DEFAULT_GRACE, dry_run: bool = False, now: float | None = None) -> GcResult:
    """Delete blobs no index references (directly as a manifest or through one), except those written or
    touched within ``grace``.

    A push uploads its new blobs, and touches the ones it reuses, before it writes the index that
    references them. So a blob a concurrent push relies on is young (kept), and each deletion re-checks
    the blob's age at the moment of deleting (:meth:`Store.delete_if_stale`): a push that touched it
    since it was listed keeps it, and a push that touches it after it is gone uploads it again.
    An index or manifest gc cannot read stops it before anything is deleted.

    Example:
        >>> gc(store, grace=dt.timedelta(hours=1), dry_run=True).deleted       # doctest: +SKIP
        ('blobs/sha256/9f86...',)
    """
    live = _live_blobs(store)
    now = time.time() if now is None else now
    cutoff = now - grace.total_seconds()
    deleted, young, freed = [], [], 0
    for k in store.list("blobs/sha256/"):
        if k in live:
            continue
        try:
            if store.mtime(k) > cutoff:
                young.append(k)
                continue
            size = store.size(k)
            if not dry_run and not store.delete_if_stale(k, cutoff):
                young.append(k)  # touched since it was listed: a push is reusing it
                continue
        except NotFoundError:
            continue
        deleted.append(k)
        freed += size
    # A push killed mid-upload leaves parts behind; one older than the grace period is abandoned.
    incomplete = store.clean_incomplete(grace.total_seconds(), dry_run=dry_run)
    return GcResult(tuple(deleted), freed, tuple(young), len(live), incomplete)
