"""Garbage collection: :func:`gc` deletes blobs no index references.

Example:
    >>> gc(open_store("/srv/registry"), grace=dt.timedelta(hours=24)).freed_bytes   # doctest: +SKIP
    1073741824
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import time

from .errors import IntegrityError, NotFoundError, TrustError
from .listing import read_index
from .names import blob_key
from .store import Store

__all__ = ["DEFAULT_GRACE", "GcResult", "gc"]

DEFAULT_GRACE = dt.timedelta(hours=24)


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
            pred = read_index(store, k, None)
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
