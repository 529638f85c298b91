"""Registry errors. Each is a :class:`slmpkg.errors.SlmpkgError` whose message is one line naming the
registry key or reference and what failed; none ever includes a credential."""

from __future__ import annotations

from slmpkg.errors import SignatureError, SlmpkgError

__all__ = [
    "AuthError",
    "ConflictError",
    "ExpiredError",
    "IntegrityError",
    "MixAndMatchError",
    "NotFoundError",
    "RegistryError",
    "RollbackError",
    "StoreError",
    "TrustError",
    "UnsafePathError",
]


class RegistryError(SlmpkgError):
    """Base class of the registry's errors."""


class StoreError(RegistryError):
    """The store itself failed: unreachable endpoint, I/O error, unexpected server answer."""


class AuthError(StoreError):
    """The store rejected the credentials (wrong key, bad signature, access denied)."""


class NotFoundError(RegistryError, KeyError):
    """A key, reference, version, tag or target does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConflictError(RegistryError):
    """A compare-and-swap lost: the key changed (or appeared) since it was read."""


class IntegrityError(RegistryError):
    """Bytes do not match their digest or size (a blob altered in the store, a truncated download)."""


class UnsafePathError(IntegrityError):
    """A manifest names a path that would escape the output directory (``..``, absolute, backslash)."""


class TrustError(RegistryError, SignatureError):
    """Signed metadata cannot be trusted: bad signature, wrong key, malformed statement."""


class RollbackError(TrustError):
    """The store serves older signed metadata than this client has already seen."""


class ExpiredError(TrustError):
    """Signed metadata is past its ``expires`` time (a frozen or stale registry)."""


class MixAndMatchError(TrustError):
    """Signed metadata for one name/version/target is served under another."""
