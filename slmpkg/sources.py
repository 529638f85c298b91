"""Where a build's input comes from: a local file or directory, or a Hugging Face Hub repo (``hf://``), and
the sha256 of every file in it (the provenance's resolved dependencies and the build's cache key).

Hub sources are fetched through huggingface_hub's HTTP session into a folder of the build
(``HF_ENDPOINT`` and ``HF_TOKEN`` apply); an interrupted download keeps its partial files and the next
run continues them with range requests. Digests are remembered by file identity (size, mtime, inode), so a rebuild with
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
from typing import Any, Callable, Optional, Union

from ._io import atomic_writes, sha256_file
from .errors import SlmpkgError, UsageError

__all__ = ["Source", "SourceFile", "SourceError", "DigestCache", "resolve_source", "parse_hub_url"]

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
        self._dirty = False
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
        digest = sha256_file(path)
        with self._lock:
            self._entries[key] = [*ident, digest]
            self._dirty = True
        return digest, st.st_size

    def save(self) -> None:
        """Write the file if anything was hashed since it was read."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, atomic_writes([self.path]) as (f,):
            f.write(json.dumps(self._entries, indent=0, sort_keys=True).encode())
            self._dirty = False


def _listing(root: Path) -> list[tuple[str, Path]]:
    """Files of a source directory; hidden entries (.git, .cache, .gitattributes) and the partial
    files of an interrupted download left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if not name.startswith(".") and not name.endswith(".partial"):
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


_FETCH_RECORD = ".slmpkg-fetch.json"


def fetch_hub(url: str, download_dir: Path, progress: Optional[Callable[[int], None]] = None) -> tuple[Path, str]:
    """Download ``hf://org/repo[@rev]`` into ``download_dir/repo``; return the folder and the commit.

    The revision is resolved to a commit once and every file is read at that commit. Each file is
    fetched with huggingface_hub's HTTP session (``HF_ENDPOINT``, ``HF_TOKEN``, the Hub's redirects to
    its storage) into ``NAME.partial``; a partial file left by an interrupted run is continued with a
    ``Range`` request, so a rerun downloads only what is missing. huggingface_hub's own downloader
    (2.x) deletes its partial files when a download fails, hence this loop. LFS files are checked
    against the sha256 the Hub lists, every file against its size; files already complete at the same
    commit are not fetched again.
    """
    repo_id, revision = parse_hub_url(url)
    try:
        from huggingface_hub import HfApi, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
        from huggingface_hub.hf_api import RepoFile
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise SourceError(f"{url}: needs huggingface_hub") from None
    # named as the repo (a build has one source), as a clone would be: converters name models after it
    target = download_dir / repo_id.split("/")[1]
    # the endpoint as the environment says now (huggingface_hub reads HF_ENDPOINT once, at import)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint)
    try:
        commit = api.model_info(repo_id, revision=revision).sha
        if not commit:
            raise SourceError(f"{url}: the Hub did not say which commit {revision or 'main'} is")
        entries = [e for e in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(e, RepoFile)]
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise SourceError(f"{url}: {_first_line(e)}") from None
    except HfHubHTTPError as e:
        raise SourceError(f"{url}: the Hub refused the request ({_first_line(e)})") from None
    except Exception as e:
        if not _transport_error(e):
            raise
        raise SourceError(f"{url}: cannot reach the Hub at {api.endpoint} ({_first_line(e)})") from None
    files = {e.path: e for e in entries if not any(part.startswith(".") for part in e.path.split("/"))}
    if not files:
        raise SourceError(f"{url}: the repo holds no files at {commit}")
    target.mkdir(parents=True, exist_ok=True)
    record_path = target / _FETCH_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    done: dict[str, Any] = record.get("files", {}) if record.get("commit") == commit else {}
    for name, entry in sorted(files.items()):
        dest = target / name
        want = {"size": entry.size, "blob": entry.blob_id, "sha256": entry.lfs.sha256 if entry.lfs else None}
        if done.get(name) == want and dest.is_file() and dest.stat().st_size == entry.size:
            continue
        _download(hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint), dest, entry.size, want["sha256"],
                  f"{url}/{name}", progress)
        done[name] = want
        with atomic_writes([record_path]) as (f,):
            f.write(json.dumps({"commit": commit, "files": done}, indent=1).encode())
    # files of an earlier revision that this commit does not have
    for p in list(target.rglob("*")):
        rel = p.relative_to(target).as_posix()
        if p.is_file() and rel not in files and not rel.startswith(".") and not rel.endswith(".partial"):
            p.unlink()
    return target, commit


def _download(url: str, dest: Path, size: int, sha256: Optional[str], what: str,
              progress: Optional[Callable[[int], None]]) -> None:
    """One file into ``dest`` through ``dest.partial``, resuming it; checked, then renamed."""
    from huggingface_hub.utils import build_hf_headers, get_session

    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    headers = build_hf_headers()
    if 0 < have < size:
        headers["Range"] = f"bytes={have}-"
    try:
        if have < size or size == 0:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=30) as r:
                if r.status_code == 200:
                    have = 0  # the server sent the whole file
                elif r.status_code != 206 or not headers.get("Range"):
                    r.read()
                    raise SourceError(f"{what}: the Hub answered HTTP {r.status_code}")
                with open(partial, "r+b" if have else "wb") as f:
                    f.seek(have)
                    f.truncate()
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
    except SourceError:
        raise
    except Exception as e:
        if not _transport_error(e):
            raise
        kept = partial.stat().st_size if partial.exists() else 0
        hint = f"; {kept / 1e6:.1f} of {size / 1e6:.1f} MB kept, rerun to resume" if kept else ""
        raise SourceError(f"{what}: download failed ({_first_line(e)}){hint}") from None
    got = partial.stat().st_size
    if got != size:
        raise SourceError(f"{what}: the Hub sent {got} bytes, {size} expected; {got / 1e6:.1f} MB kept, rerun to resume")
    if sha256 is not None and sha256_file(partial) != sha256:
        partial.unlink()
        raise SourceError(f"{what}: downloaded bytes do not match the sha256 the Hub lists; removed, rerun to fetch again")
    os.replace(partial, dest)


def _transport_error(e: BaseException) -> bool:
    """A network failure: an OSError, or one of the HTTP client's own errors (huggingface_hub's
    session is httpx's, whose errors have no base class huggingface_hub exports)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
