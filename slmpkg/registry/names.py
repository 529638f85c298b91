"""Names in the registry: ``NAME:VERSION`` / ``NAME:TAG`` references, target names, and the store keys
they map to::

    blobs/sha256/<hex>               immutable: artifact files and artifact manifests (create-only)
    indexes/<name>/<version>.json    signed index of NAME:VERSION (targets -> manifest digests), CAS
    tags/<name>/<tag>.json           signed tag NAME:TAG -> version, CAS

Example:
    >>> parse_ref("org/tiny-llama:1.0")
    ('org/tiny-llama', '1.0')
    >>> index_key("org/tiny-llama", "1.0")
    'indexes/org/tiny-llama/1.0.json'
"""

from __future__ import annotations

import re

from .errors import IntegrityError, RegistryError

__all__ = ["blob_key", "check_name", "check_release", "check_target", "index_key", "parse_ref", "tag_key"]

_NAME_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*\Z")
_RELEASE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_TARGET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_HEX_RE = re.compile(r"[0-9a-f]{64}\Z")


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``NAME:RELEASE`` (a release or a tag), checking both parts.

    Example:
        >>> parse_ref("org/tiny-llama:1.0")
        ('org/tiny-llama', '1.0')
    """
    name, sep, release = str(ref).rpartition(":")
    if not sep:
        raise RegistryError(f"{ref!r}: expected NAME:VERSION (or NAME:TAG)")
    check_name(name)
    check_release(release, ref)
    return name, release


def check_name(name: str) -> str:
    """``name`` if it is a valid model name (lowercase parts joined by ``/``), else raise."""
    if not _NAME_RE.match(name) or len(name) > 200:
        raise RegistryError(f"{name!r}: invalid name (lowercase letters, digits, '.', '_', '-', '/' between parts)")
    return name


def check_release(release: str, ref: str | None = None) -> str:
    """``release`` if it is a valid version or tag name, else raise."""
    if not _RELEASE_RE.match(release):
        raise RegistryError(f"{ref or release!r}: invalid version or tag {release!r} (letters, digits, '.', '_', '-')")
    return release


def check_target(target: str) -> str:
    """``target`` if it is a valid target name, else raise."""
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise RegistryError(f"{target!r}: invalid target name (lowercase letters, digits, '.', '_', '-')")
    return target


def blob_key(digest: str) -> str:
    """``blobs/sha256/<hex>`` for ``sha256:<hex>`` or ``<hex>``.

    Example:
        >>> blob_key("sha256:" + "0" * 64)[:20]
        'blobs/sha256/0000000'
    """
    hexd = digest.removeprefix("sha256:")
    if not _HEX_RE.match(hexd):
        raise IntegrityError(f"{digest!r}: not a sha256 digest")
    return f"blobs/sha256/{hexd}"


def index_key(name: str, release: str) -> str:
    """Where the signed index of ``NAME:RELEASE`` lives."""
    return f"indexes/{name}/{release}.json"


def tag_key(name: str, tag: str) -> str:
    """Where the signed tag ``NAME:TAG`` lives."""
    return f"tags/{name}/{tag}.json"
