"""The artifact registry: content-addressed blobs, per-target manifests, signed indexes and tags over a
small :class:`~slmpkg.registry.store.Store` interface (local directory, S3, Hugging Face Hub).

Modules, one concern each: :mod:`~.names` (references and store keys), :mod:`~.manifest` (artifact
manifests), :mod:`~.signed` (signed indexes and tags, the client's rollback memory), :mod:`~.publish`
(push, tag, refresh), :mod:`~.pulling` (pull) over :mod:`~.cache` (the local blob cache),
:mod:`~.listing` (ls), :mod:`~.collect` (gc); :mod:`~.store` is the interface, :mod:`~.local`,
:mod:`~.s3` and :mod:`~.hub` implement it. (No module is named after a function the package
exports, so ``slmpkg.registry.pull`` is always the function.)

Example:
    >>> from slmpkg.registry import open_store, push, pull      # doctest: +SKIP
    >>> store = open_store("s3://models/registry")               # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from .cache import fetch_blob
from .collect import DEFAULT_GRACE, GcResult, gc
from .listing import ls
from .manifest import MANIFEST_MEDIA_TYPE, build_manifest
from .names import blob_key, index_key, parse_ref, tag_key
from .publish import PushResult, Refreshed, push, refresh, tag
from .pulling import Chooser, PullResult, pull
from .signed import DEFAULT_EXPIRES, INDEX_PREDICATE, TAG_PREDICATE, TrustState
from .errors import (
    AuthError,
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
from .local import LocalStore, default_root
from .store import Store

__all__ = [
    "DEFAULT_EXPIRES", "DEFAULT_GRACE", "INDEX_PREDICATE", "MANIFEST_MEDIA_TYPE", "TAG_PREDICATE",
    "AuthError", "Chooser", "ConflictError", "ExpiredError", "GcResult", "IntegrityError", "LocalStore", "MixAndMatchError",
    "NotFoundError", "PullResult", "PushResult", "Refreshed", "RegistryError", "RollbackError", "Store", "StoreError",
    "TrustError", "TrustState", "UnsafePathError",
    "blob_key", "build_manifest", "default_root", "fetch_blob", "gc", "index_key", "ls", "open_store", "parse_ref",
    "pull", "push", "refresh", "tag", "tag_key",
]


def open_store(url: str | os.PathLike[str] | None = None, **options) -> Store:
    """A store for ``url``: a path or ``file://`` URL (default ``$SLMPKG_HOME/registry``) or
    ``s3://bucket/prefix`` (options go to :class:`~slmpkg.registry.s3.S3Store`, e.g. ``endpoint_url``) or
    ``hf://org/repo`` (a Hugging Face Hub model repo; ``HF_ENDPOINT``/``HF_TOKEN`` apply).

    Example:
        >>> open_store("/tmp/reg")                                 # doctest: +SKIP
        LocalStore('/tmp/reg')
    """
    if url is None:
        return LocalStore(default_root())
    s = os.fspath(url)
    if s.startswith("s3://"):
        from .s3 import S3Store

        return S3Store(s, **options)
    if s.startswith("hf://"):
        from .hub import HubStore

        return HubStore(s, **options)
    if s.startswith("file://"):
        s = s[len("file://"):]
    elif "://" in s:
        raise RegistryError(f"{s}: unsupported registry URL (use a path, file://, s3:// or hf://)")
    return LocalStore(Path(s).expanduser())
