"""Listing what a registry holds: :func:`ls`.

Example:
    >>> ls(open_store("/srv/registry"), "tiny-llama")["versions"]            # doctest: +SKIP
    {'1.0': {'version': 2, 'expires': '2027-01-01T00:00:00Z', 'targets': ['cpu-x86_64', 'cuda-sm80']}}
"""

from __future__ import annotations

import json
from typing import Any

from slmpkg.signing import Verifier

from .errors import IntegrityError, NotFoundError
from .names import blob_key, check_name, index_key, parse_ref
from .signed import INDEX_PREDICATE, TAG_PREDICATE, open_doc, sha256_hex
from .store import Store

__all__ = ["ls", "read_index"]


def read_index(store: Store, key: str, verifier: Verifier | None) -> dict[str, Any]:
    return open_doc(store.get(key), verifier, INDEX_PREDICATE, f"{store.url}/{key}")


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
        name = check_name(ref)
        versions = {}
        for k in store.list(f"indexes/{name}/"):
            rel = k[len(f"indexes/{name}/"):]
            if "/" in rel or not rel.endswith(".json"):
                continue
            pred = read_index(store, k, verifier)
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
            pred = open_doc(store.get(k), verifier, TAG_PREDICATE, f"{store.url}/{k}")
            tags[rel[:-5]] = pred.get("release")
        if not versions and not tags:
            raise NotFoundError(f"{name}: not in {store.url}")
        return {"name": name, "versions": versions, "tags": tags}
    name, release = parse_ref(ref)
    try:
        pred = read_index(store, index_key(name, release), verifier)
    except NotFoundError:
        raise NotFoundError(f"{name}:{release}: no such version in {store.url}") from None
    out = dict(pred)
    out["manifests"] = {}
    for t, e in sorted((pred.get("targets") or {}).items()):
        mbytes = store.get(blob_key(e["digest"]))
        if f"sha256:{sha256_hex(mbytes)}" != e["digest"]:
            raise IntegrityError(f"{store.url}/{blob_key(e['digest'])}: manifest does not match its digest")
        out["manifests"][t] = json.loads(mbytes)
    return out
