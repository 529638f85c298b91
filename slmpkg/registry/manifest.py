"""Artifact manifests: one per target of a release, listing the files a pull installs (path, sha256
digest, size, media type) with the format, quantization and provenance. A manifest is stored as an
immutable blob; the signed index names it by digest.

Example:
    >>> manifest, entries = build_manifest("out/tiny-q4", "tiny", "1.0", "cpu-x86_64")   # doctest: +SKIP
    >>> [f["path"] for f in manifest["files"]]                                             # doctest: +SKIP
    ['model.gguf', 'tokenizer.json']
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slmpkg import __version__
from slmpkg.errors import SignatureError
from slmpkg.signing import (
    DEFAULT_SIGNATURE_NAME,
    GIT_PATHS,
    Manifest,
    Resource,
    Signer,
    hash_artifact,
    signature_bytes,
    stale_signature,
)

from .errors import IntegrityError, MixAndMatchError, RegistryError, UnsafePathError
from .names import blob_key

__all__ = ["MANIFEST_MEDIA_TYPE", "build_manifest", "check_manifest"]

MANIFEST_MEDIA_TYPE = "application/vnd.slmpkg.manifest.v1+json"

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


# the longest file name (a path component) file systems take, and a bound on a whole relative path
NAME_MAX = 255
PATH_MAX = 1024


def safe_path(p: Any, source: str) -> str:
    if not isinstance(p, str) or not p or p.startswith("/") or "\\" in p or "\x00" in p or re.match(r"[A-Za-z]:", p):
        raise UnsafePathError(f"{source}: unsafe file path {p!r} (absolute, empty or with a backslash)")
    if any(part in ("", ".", "..") for part in p.split("/")):
        raise UnsafePathError(f"{source}: unsafe file path {p!r} (empty, '.' or '..' component)")
    try:
        encoded = p.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"{source}: unsafe file path {p!r} (not valid Unicode)") from None
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise UnsafePathError(f"{source}: file path {p[:80]!r}... is longer than a file system takes "
                              f"({PATH_MAX} bytes, {NAME_MAX} per name)")
    return p


def check_manifest(m: Any, source: str, name: str, release: str, target: str) -> list[dict[str, Any]]:
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
        p = safe_path(f.get("path"), source)
        if p in paths:
            raise UnsafePathError(f"{source}: file path {p!r} listed twice")
        paths.add(p)
        blob_key(str(f.get("digest", "")))
        if not isinstance(f.get("size"), int) or isinstance(f["size"], bool) or not 0 <= f["size"] < 2**63:
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
    signer: Signer | None = None,
    progress: Any = None,
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], Path | bytes]]]:
    """Hash ``artifact`` (a file or directory) into a manifest dict; also return ``(file entry, local
    path or bytes)`` pairs for upload. Symlinks and special files are refused (by
    :func:`slmpkg.signing.hash_artifact`).

    The files listed are the ones a pull installs: a directory's files by their relative paths (git
    files left out), or a single file by its name. A directory's own ``model.sig`` travels with it and
    must still describe it (else the push is refused). Otherwise, given a ``signer``, the artifact gets a
    ``model.sig`` made here from the same digests — an OpenSSF model-signing bundle of exactly the files
    listed, so ``model_signing verify key PULLED --signature PULLED/model.sig`` accepts a pulled copy.
    It is published only (the artifact on disk is never written to), and since the signer is
    deterministic the same files always give the same signature.

    Example:
        >>> manifest, entries = build_manifest("out/tiny-q4", "tiny", "1.0", "cpu-x86_64", signer=signer)  # doctest: +SKIP
        >>> [f["path"] for f in manifest["files"]]                                                          # doctest: +SKIP
        ['model.gguf', 'model.sig', 'tokenizer.json']
    """
    root = Path(artifact)
    single = root.is_file()
    own_signature = root / DEFAULT_SIGNATURE_NAME
    try:
        hashed = hash_artifact(root, ignore_git_paths=True, progress=progress)
        if not single and (own_signature.exists() or own_signature.is_symlink()):
            if not own_signature.is_file():
                raise RegistryError(f"{own_signature}: not a signature file (the name is reserved for one)")
            # a signature that travels with the artifact must still describe it, or every device
            # that checks it (model_signing verify) would refuse what this push publishes
            stale = stale_signature(root, hashed)
            if stale is not None:
                raise RegistryError(f"{stale}; re-run `slmpkg sign` before pushing")
            signer = None
    except SignatureError as e:
        raise RegistryError(str(e)) from None
    if single and root.name == DEFAULT_SIGNATURE_NAME:
        raise RegistryError(f"{root}: a signature file is not an artifact; push the model it signs")
    entries: list[tuple[dict[str, Any], Path | bytes]] = []

    def add(path: str, digest: str, size: int, local: Path | bytes) -> None:
        ext = os.path.splitext(path)[1].lower()
        entry = {"path": path, "digest": f"sha256:{digest}", "size": size,
                 "mediaType": _MEDIA_TYPES.get(ext, "application/octet-stream")}
        entries.append((entry, local))

    for r in hashed.resources:
        add(root.name if single else r.name, r.digest, r.size, root if single else root.joinpath(*r.name.split("/")))
    if signer is not None and entries:
        installed = Manifest(
            root.name,
            tuple(Resource(f["path"], f["digest"].removeprefix("sha256:"), f["size"]) for f, _ in entries),
            (*GIT_PATHS, DEFAULT_SIGNATURE_NAME),
        )
        sig = signature_bytes(installed, signer)
        add(DEFAULT_SIGNATURE_NAME, hashlib.sha256(sig).hexdigest(), len(sig), sig)
        entries.sort(key=lambda e: e[0]["path"])
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


