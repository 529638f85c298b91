"""Pulling: fetch, verify and install the artifact of one target of a release.

A pull checks, TUF-style: the signature of the index (and of the tag, when pulling ``NAME:TAG``), the
name and release inside them against the ones asked for (mix-and-match), ``expires`` (freeze), their
``version`` against the highest this client has seen (rollback), the manifest digest and its
name/release/target, every file path (no ``..``, absolute paths, backslashes or duplicates) and every
blob's sha256 and size. Blobs land in the content-addressed cache (:mod:`slmpkg.registry.cache`); the
output directory is assembled beside its destination (hard links into the cache, or copies) and renamed
into place only when everything verified.

Example:
    >>> from slmpkg.registry import open_store, pull                        # doctest: +SKIP
    >>> from slmpkg.signing import KeyVerifier                              # doctest: +SKIP
    >>> pull(open_store("/srv/registry"), "tiny-llama:1.0", "cpu-x86_64", "models/tiny", KeyVerifier("release.pub.pem"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slmpkg._io import sha256_file
from slmpkg.signing import Verifier

from .cache import Fetched, fetch_blob, prune_partials
from .errors import IntegrityError, NotFoundError, RegistryError, TrustError
from .manifest import check_manifest
from .names import blob_key, check_release, check_target, index_key, parse_ref, tag_key
from .signed import INDEX_PREDICATE, TAG_PREDICATE, TrustState, now_utc, sha256_hex, trusted_doc
from .store import Progress, Store, default_home, fsync_dir, parallel_map

__all__ = ["Chooser", "PullResult", "pull"]


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
        if (st.st_ino, st.st_dev) != (cst.st_ino, cst.st_dev) and sha256_file(local) != f["digest"].removeprefix("sha256:"):
            return False
    return True


def _resolve(store: Store, name: str, ref: str, verifier: Verifier, state: TrustState, now: dt.datetime) -> str:
    """The release ``NAME:REF`` names: ``REF`` itself when it is a version, else the tag's target.
    A name that is both (push and tag refuse to make one; an older registry or a hand edit may hold
    one) is refused: which release a pull installs must not depend on a lookup order."""
    is_version = store.exists(index_key(name, ref))
    if is_version and store.exists(tag_key(name, ref)):
        raise RegistryError(f"{name}:{ref}: is both a version and a tag in {store.url}; remove one of them")
    if is_version:
        return ref
    pred, _ = trusted_doc(store, tag_key(name, ref), verifier, TAG_PREDICATE, {"name": name, "tag": ref},
                          state, now, f"{name}:{ref}: no such version or tag in {store.url}")
    return check_release(str(pred.get("release")))


def _manifest(store: Store, name: str, release: str, target: str, entry: Any) -> tuple[str, list[dict[str, Any]]]:
    """The manifest the signed index lists for ``target`` (checked against its signed digest and for
    what it names): its digest and file entries."""
    mdigest = str(entry.get("digest", "")) if isinstance(entry, dict) else ""
    mkey = blob_key(mdigest)
    msource = f"{store.url}/{mkey}"
    try:
        mbytes = store.get(mkey)
    except NotFoundError:
        raise IntegrityError(f"{msource}: manifest of {name}:{release} {target} is missing from the store") from None
    if f"sha256:{sha256_hex(mbytes)}" != mdigest:
        raise IntegrityError(f"{msource}: manifest does not match its signed digest; refusing it")
    try:
        manifest = json.loads(mbytes)
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError(f"{msource}: manifest is not JSON") from None
    return mdigest, check_manifest(manifest, msource, name, release, target)


#: ``choose({target: artifact bytes, ...}) -> target``: picks one of the published targets of the release
#: being pulled (e.g. the best one this host runs that fits its memory: :func:`slmpkg.targets.choose_artifact`).
Chooser = Callable[[Mapping[str, int]], str]


def pull(
    store: Store,
    ref: str,
    target: str | Sequence[str] | Chooser,
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

    ``target`` is one target, a ranked list (most specific first; the first one published wins), or a
    :data:`Chooser` called with the size of every target's artifact in the release being installed:
    the choice is made from the same verified index the pull installs from, so a tag moved meanwhile
    cannot pair one release's choice with another release's artifact.
    Nothing appears at ``out_dir`` unless every check passed; an existing non-empty ``out_dir`` holding
    something else is replaced only with ``overwrite=True``. ``cache_dir`` defaults to
    ``$SLMPKG_HOME/cache``; ``state`` (the rollback memory) to ``$SLMPKG_HOME/trust.json``.
    If the pull fails half-way (server gone, Ctrl-C), the ranges it fetched stay in the cache and the
    same pull run again fetches only the rest (``PullResult.resumed_bytes``).

    Example:
        >>> pull(store, "tiny:stable", lambda sizes: min(sizes, key=sizes.get), "models/tiny", verifier)  # doctest: +SKIP
    """
    name, ref_part = parse_ref(ref)
    choose = target if callable(target) else None
    candidates = [] if choose else [target] if isinstance(target, str) else list(target)
    for t in candidates:
        check_target(t)
    if not candidates and not choose:
        raise RegistryError(f"{ref}: no target given")
    now = now or now_utc()
    trust = state if isinstance(state, TrustState) else TrustState(state)
    cache = Path(cache_dir) if cache_dir is not None else default_home() / "cache"
    out = Path(out_dir)
    with contextlib.suppress(OSError):  # housekeeping: never the reason a pull fails
        prune_partials(cache)

    # 1. the signed index: signature, name/release, expiry, rollback
    release = _resolve(store, name, ref_part, verifier, trust, now)
    ikey = index_key(name, release)
    source = f"{store.url}/{ikey}"
    idx, version = trusted_doc(store, ikey, verifier, INDEX_PREDICATE, {"name": name, "release": release},
                               trust, now, f"{name}:{release}: no such version in {store.url}")

    targets = idx.get("targets")
    if not isinstance(targets, dict):
        raise TrustError(f"{source}: index has no targets")

    # 2. the target and its manifest (content-addressed: its digest is signed)
    if choose is not None:
        listed = parallel_map(lambda t: (t, _manifest(store, name, release, t, targets[t])), sorted(targets),
                              max_workers)
        manifests = dict(listed)
        chosen = choose({t: sum(f["size"] for f in files) for t, (_, files) in manifests.items()})
        if chosen not in manifests:
            raise RegistryError(f"{name}:{release}: the target chooser picked {chosen!r}, which is not published")
        mdigest, files = manifests[chosen]
    else:
        chosen = next((t for t in candidates if t in targets), None)
        if chosen is None:
            raise NotFoundError(
                f"{name}:{release} has no artifact for {', '.join(candidates)} "
                f"(published: {', '.join(sorted(targets)) or 'none'})"
            )
        mdigest, files = _manifest(store, name, release, chosen, targets[chosen])

    # 3. blobs into the cache, each verified; an interrupted earlier pull's ranges are kept
    blobs: dict[str, Path] = {}
    downloaded = cached = resumed = 0
    unique = {f["digest"]: f["size"] for f in files}

    # Small blobs side by side. Blobs of several ranges two at a time, sharing store.range_concurrency
    # ranges in flight: while one blob's last ranges are hashed, the next one's keep the connections
    # busy (one after another, the connections idled during every blob's hash tail). An interrupt
    # (raised in this thread) sets `cancel`: no new range starts, the ones in flight finish and stay.
    slots, cancel = threading.Semaphore(max(1, store.range_concurrency)), threading.Event()

    def fetch(item: tuple[str, int]) -> tuple[str, Fetched]:
        d, size = item
        return d, fetch_blob(store, d, size, cache, verify_cache=verify_cache, progress=progress,
                             slots=slots, cancel=cancel)

    small = [(d, n) for d, n in unique.items() if n <= store.range_size]
    large = [(d, n) for d, n in unique.items() if n > store.range_size]
    fetched = parallel_map(fetch, small, max_workers, cancel=cancel) + parallel_map(fetch, large, 2, cancel=cancel)
    for d, got in fetched:
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
        dirs = {staging}
        for f in files:
            dest = staging.joinpath(*f["path"].split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            dirs.update(p for p in dest.parents if p.is_relative_to(staging))
            src = blobs[f["digest"]]
            if link:
                try:
                    os.link(src, dest)
                    continue
                except OSError:
                    pass  # other file system, or links not allowed: copy
            shutil.copyfile(src, dest)
            os.chmod(dest, 0o644)
            with open(dest, "rb") as copied:
                os.fsync(copied.fileno())
        os.chmod(staging, 0o755)
        for d in sorted(dirs, key=lambda p: -len(p.parts)):  # names inside, deepest first
            fsync_dir(d)
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            try:
                os.replace(out, backup / "d")
                os.replace(staging, out)
            finally:
                if (backup / "d").exists() and not out.exists():
                    os.replace(backup / "d", out)  # interrupted between the two renames: put it back
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out)
        fsync_dir(out.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return PullResult(**result, changed=True)
