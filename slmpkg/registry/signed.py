"""Signed registry metadata: the index of a release and the tags, as Sigstore bundles.

A :class:`slmpkg.signing.Signer` wraps a DSSE envelope (``application/vnd.in-toto+json``) around an
in-toto statement v1 whose predicate is the index (predicate type :data:`INDEX_PREDICATE`) or the tag
(:data:`TAG_PREDICATE`) and whose one subject is ``{name: "NAME:RELEASE", digest: {sha256:
sha256(canonical predicate JSON)}}``. The same key pair that signs artifacts with ``slmpkg sign`` signs
the registry metadata, and the same :class:`slmpkg.signing.Verifier` checks it.

A reader checks, TUF-style (:func:`trusted_doc`): the signature (wrong key or altered bytes), that the
document names what was asked for (mix-and-match), ``expires`` (freeze), and that its ``version`` never
goes below the highest this client has seen (rollback; remembered by :class:`TrustState`).

Example:
    >>> doc = sign_doc(signer, INDEX_PREDICATE, "tiny:1.0", {"name": "tiny", ...})      # doctest: +SKIP
    >>> open_doc(doc, verifier, INDEX_PREDICATE, "indexes/tiny/1.0.json")["name"]         # doctest: +SKIP
    'tiny'
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slmpkg.errors import SignatureError
from slmpkg.signing import PAYLOAD_TYPE, KeySigner, Signer, Verifier

from .errors import ExpiredError, MixAndMatchError, NotFoundError, RegistryError, RollbackError, TrustError
from .store import Store, default_home, fsync_dir

__all__ = [
    "DEFAULT_EXPIRES",
    "INDEX_PREDICATE",
    "STATEMENT_TYPE",
    "TAG_PREDICATE",
    "TrustState",
    "open_doc",
    "sign_doc",
    "trusted_doc",
]

INDEX_PREDICATE = "https://slmpkg.dev/registry/index/v1"
TAG_PREDICATE = "https://slmpkg.dev/registry/tag/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
DEFAULT_EXPIRES = dt.timedelta(days=365)


# ---------------------------------------------------------------------------------------------------
# time and canonical JSON


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: Any, source: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    except ValueError:
        raise TrustError(f"{source}: malformed time {s!r}") from None
    if t.tzinfo is None:
        raise TrustError(f"{source}: time {s!r} has no time zone")
    return t


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------
# signed documents


def sign_doc(signer: Signer, predicate_type: str, subject: str, predicate: Mapping[str, Any]) -> bytes:
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject, "digest": {"sha256": sha256_hex(canonical(predicate))}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }
    bundle = signer.sign(json.dumps(statement, indent=2, sort_keys=False).encode("utf-8"))
    return json.dumps(bundle, separators=(",", ":")).encode("utf-8")


def open_doc(data: bytes, verifier: Verifier | None, predicate_type: str, source: str) -> dict[str, Any]:
    """Verify (when ``verifier`` is given) and parse a signed document; return its predicate."""
    try:
        bundle = json.loads(data)
        if not isinstance(bundle, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise TrustError(f"{source}: malformed signed document: {e}") from None
    if verifier is not None:
        try:
            payload = verifier.verify(bundle, source)
        except TrustError:
            raise
        except SignatureError as e:
            raise TrustError(str(e)) from None
    else:  # unverified read (gc, ls without a key): parse only
        try:
            env = bundle["dsseEnvelope"]
            if env.get("payloadType") != PAYLOAD_TYPE:
                raise ValueError("payloadType")
            payload = base64.b64decode(env["payload"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TrustError(f"{source}: malformed signed document ({e})") from None
    try:
        st = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
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
    try:
        expected = sha256_hex(canonical(pred))
    except UnicodeEncodeError:  # JSON can spell a lone surrogate, which has no UTF-8 form
        raise TrustError(f"{source}: the statement holds text that is not valid Unicode") from None
    if digest != expected:
        raise TrustError(f"{source}: subject digest does not match the predicate")
    return pred


def verifier_for(signer: Signer, verifier: Verifier | None) -> Verifier:
    if verifier is not None:
        return verifier
    if isinstance(signer, KeySigner):
        return signer.verifier()
    raise RegistryError("push: pass verifier= for this signer (needed to check the index it updates)")


def check_int(v: Any, what: str, source: str) -> int:
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
            fsync_dir(self.path.parent)
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


def check_fresh(pred: Mapping[str, Any], now: dt.datetime, source: str) -> None:
    expires = parse_time(pred.get("expires"), source)
    if expires <= now:
        raise ExpiredError(f"{source}: expired at {fmt_time(expires)} (the registry may be frozen or stale)")


def trusted_doc(
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
    pred = open_doc(data, verifier, predicate_type, source)
    if any(pred.get(k) != v for k, v in expected.items()):
        found = ":".join(str(pred.get(k)) for k in expected)
        raise MixAndMatchError(f"{source}: signed {what} is for {found}, expected {':'.join(expected.values())}")
    check_fresh(pred, now, source)
    version = check_int(pred.get("version"), "version", source)
    state.check_and_record(store.url, f"{what} {':'.join(expected.values())}", version, source)
    return pred, version


