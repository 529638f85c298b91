"""Where a build's input comes from: a local file or directory, or a Hugging Face Hub repo (``hf://``), and
the sha256 of every file in it (the provenance's resolved dependencies and the build's cache key).

Hub sources are fetched with ``huggingface_hub.snapshot_download`` into a folder of the build
(``HF_ENDPOINT`` and ``HF_TOKEN`` apply); an interrupted download keeps its partial files and the next
run continues them. Digests are remembered by file identity (size, mtime, inode), so a rebuild with
unchanged inputs reads no source bytes.

Example:
    >>> src = resolve_source("tiny-llama", state_dir="slmpkg-build/.state")    # doctest: +SKIP
    >>> src.digest, [f.name for f in src.files][:2]                             # doctest: +SKIP
    ('6a1f...', ['config.json', 'model.safetensors'])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ._io import atomic_writes
from .errors import SlmpkgError, UsageError

__all__ = ["Source", "SourceFile", "SourceError", "DigestCache", "resolve_source", "parse_hub_url", "file_digest"]

PathLike = Union[str, "os.PathLike[str]"]

_HUB_RE = re.compile(r"hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?/?\Z")


class SourceError(SlmpkgError):
    """A source that cannot be read or fetched; the message names it."""


@dataclass(frozen=True)
class SourceFile:
    name: str  # POSIX path relative to the source directory (the file name for a single file)
    sha256: str
    size: int


@dataclass(frozen=True)
class Source:
    """A resolved build input."""

    uri: str  # as the recipe wrote it, with a Hub revision resolved to its commit
    path: Path  # the local file or directory the readers open
    files: tuple[SourceFile, ...]
    revision: Optional[str] = None  # the Hub commit, for hf:// sources

    @property
    def digest(self) -> str:
        """sha256 over the files' raw digests in name order (model_signing's root digest of a directory)."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.name):
            h.update(bytes.fromhex(f.sha256))
        return h.hexdigest()


def parse_hub_url(url: str) -> tuple[str, Optional[str]]:
    """``hf://org/repo[@revision]`` → ``(repo_id, revision)``.

    >>> parse_hub_url("hf://Qwen/Qwen2.5-0.5B@main")
    ('Qwen/Qwen2.5-0.5B', 'main')
    """
    m = _HUB_RE.match(url)
    if not m:
        raise UsageError(f"{url!r}: expected hf://org/repo or hf://org/repo@revision")
    return m["repo"], m["rev"]


class DigestCache:
    """sha256 of files remembered by (size, mtime_ns, inode), in a JSON file; a file whose identity
    changed is hashed again. Thread-safe; saved atomically."""

    def __init__(self, path: Optional[PathLike] = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}
        if self.path is not None:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(self.path.read_text())
                if isinstance(loaded, dict):
                    self._entries = loaded

    def digest(self, path: Path) -> tuple[str, int]:
        st = path.stat()
        key = str(path.resolve())
        ident = [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._lock:
            hit = self._entries.get(key)
        if hit and hit[:3] == ident:
            return hit[3], st.st_size
        digest = file_digest(path)
        with self._lock:
            self._entries[key] = [*ident, digest]
        return digest, st.st_size

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, atomic_writes([self.path]) as (f,):
            f.write(json.dumps(self._entries, indent=0, sort_keys=True).encode())


def file_digest(path: PathLike) -> str:
    """sha256 hex of one file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(bytearray(1 << 20))
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def _listing(root: Path) -> list[tuple[str, Path]]:
    """Files of a source directory, hidden entries (.git, .cache, .gitattributes) left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if not name.startswith("."):
                out.append(((rel / name).as_posix(), Path(dirpath) / name))
    return out


def resolve_source(
    uri: str, *, download_dir: Optional[PathLike] = None, cache: Optional[DigestCache] = None,
) -> Source:
    """Resolve ``uri`` (a local path, or ``hf://org/repo[@rev]`` fetched into ``download_dir``) and
    digest its files (remembered in ``cache``)."""
    cache = cache or DigestCache()
    revision = None
    if uri.startswith("hf://"):
        if download_dir is None:
            raise UsageError(f"{uri}: a Hub source needs a download folder")
        path, revision = fetch_hub(uri, Path(download_dir))
        resolved = f"hf://{parse_hub_url(uri)[0]}@{revision}"
    else:
        path, resolved = Path(uri), uri
        if not path.exists():
            raise SourceError(f"{path}: no such file or directory")
    files = [(path.name, path)] if path.is_file() else _listing(path)
    if not files:
        raise SourceError(f"{path}: the source directory holds no files")
    try:
        entries = []
        for name, p in files:
            digest, size = cache.digest(p)
            entries.append(SourceFile(name, digest, size))
    except OSError as e:
        raise SourceError(f"{e.filename or path}: cannot read ({e.strerror or e})") from None
    cache.save()
    return Source(resolved, path, tuple(entries), revision)


def fetch_hub(url: str, download_dir: Path) -> tuple[Path, str]:
    """Download ``hf://org/repo[@rev]`` into ``download_dir/org--repo`` (resuming partial files);
    return the folder and the commit it holds."""
    repo_id, revision = parse_hub_url(url)
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise SourceError(f"{url}: needs huggingface_hub") from None
    target = download_dir / repo_id.replace("/", "--")
    try:
        commit = HfApi().model_info(repo_id, revision=revision).sha
        if not commit:
            raise SourceError(f"{url}: the Hub did not say which commit {revision or 'main'} is")
        path = Path(snapshot_download(repo_id, revision=commit, local_dir=target))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise SourceError(f"{url}: {type(e).__name__.replace('Error', '').lower()} ({_first_line(e)})") from None
    except LocalEntryNotFoundError as e:
        raise SourceError(f"{url}: cannot reach the Hub and no local copy ({_first_line(e)})") from None
    except (HfHubHTTPError, OSError) as e:
        kept = sum(p.stat().st_size for p in target.rglob("*.incomplete")) if target.exists() else 0
        hint = f"; {kept / 1e6:.1f} MB kept, rerun to resume" if kept else ""
        raise SourceError(f"{url}: download failed ({_first_line(e)}){hint}") from None
    except Exception as e:  # requests/httpx transport errors have no common base the hub re-exports
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"):
            raise
        kept = sum(p.stat().st_size for p in target.rglob("*.incomplete")) if target.exists() else 0
        hint = f"; {kept / 1e6:.1f} MB kept, rerun to resume" if kept else ""
        raise SourceError(f"{url}: download failed ({_first_line(e)}){hint}") from None
    return path, commit


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
