"""A small in-memory Hugging Face Hub for tests: stdlib ``http.server`` + threads, loopback only, random
free ports. It speaks the endpoints ``huggingface_hub`` (pinned 2.4.0) calls for the registry's operations,
with the request/response shapes taken from its source (``hf_api.py``, ``_commit_api.py``, ``lfs.py``,
``file_download.py``, ``utils/_http.py``):

- ``POST /api/repos/create`` (409 if it exists; a new repo gets an initial commit with ``.gitattributes``);
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``sha``, ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``recursive``), ``POST /api/models/{repo}/paths-info/{rev}``
  (``expand`` adds ``lastCommit``);
- ``POST /api/models/{repo}/preupload/{rev}``: ``lfs`` for files larger than ``lfs_threshold`` or whose
  sample holds a NUL byte, else ``regular``; ``oid`` of the existing file (git sha1, or sha256 for LFS);
- LFS batch ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer): upload ``href`` on a second
  port (another origin, like S3) signed with an HMAC, no auth header; the PUT is refused unless the bytes
  hash to the oid and have the declared size; ``verify`` action back on the Hub port;
- ``POST /api/models/{repo}/commit/{branch}`` (NDJSON): ``header.parentCommit`` not the head -> 412;
  ``file`` (base64), ``lfsFile`` (must have been uploaded, size checked), ``deletedFile`` (404
  ``EntryNotFound`` if missing), ``deletedFolder``; all applied atomically under one lock;
- ``GET|HEAD /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1), ranges (206);
  LFS files answer 302 to the other origin with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``;
  ``hub.cut_at[oid] = [offset, n]`` makes the next n downloads of an LFS object stop at that offset (a
  dropped connection), and ``hub.ranges`` records every Range header (resumed downloads);
- 404s carry ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (the codes
  ``hf_raise_for_status`` dispatches on); a missing or wrong bearer token gets 401 with
  ``X-Error-Message: Invalid credentials in Authorization header``.

Xet (``HubServer(xet_dir=D)``): the CAS is ``hf_xet``'s own ``local://D`` store, which the client writes
and reads directly (chunking, dedup, xorbs, shards: all real ``hf_xet``); the server plays the Hub's part.
The server does not choose the upload path: huggingface_hub 2.4.0 uploads every non-regular file through
Xet whenever ``hf_xet`` is importable and ``HF_HUB_DISABLE_XET`` is off (``_commit_api._upload_files``),
whatever preupload says, so a server without ``xet_dir`` serves only LFS clients.

- ``GET /api/models/{repo}/xet-write-token/{rev}`` and ``.../xet-read-token/{rev}``: the CAS URL, a token
  and its expiry, both as headers (``X-Xet-Cas-Url``, ``X-Xet-Access-Token``, ``X-Xet-Token-Expiration``:
  what ``huggingface_hub.utils._xet`` parses) and as the JSON body hf_xet's own token refresher parses
  (``casUrl``, ``accessToken``, ``exp``);
- a commit's ``lfsFile`` (sha256 oid) that never came through the LFS batch API is looked up the way the
  Hub does: in the shards the client uploaded to the CAS, whose file entries carry the sha256 (MDB shard
  format, metadata extension); unknown or wrong size -> 422;
- resolve answers 302 to the other origin (a "cas bridge" that reconstructs the bytes with hf_xet, for
  clients without Xet) with ``X-Xet-Hash`` and ``Link: <.../xet-read-token/{commit}>; rel="xet-auth"``,
  so ``hf_hub_download`` goes through ``hf_xet``; tree and paths-info entries carry ``xetHash``.

What this does NOT prove (run against the real Hub for that): the Xet CAS service itself (hf_xet's
``local://`` client stands in for ``cas-server.xethub.hf.co``: no HTTP between client and CAS, the token is
never checked by it, no presigned xorb URLs, no server-side shard validation or global dedup answers,
no token expiry and refresh mid-transfer; the local client's failure modes, e.g. its stream of a file hash
the CAS does not hold ends empty without an error, may differ from the remote client's);
LFS multipart transfer (``chunk_size`` parts + completion);
the real Hub's LFS/regular decision (.gitattributes patterns, 10 MB rule), its rate limits, pagination
(``Link`` headers), commit size limits, gated/private repo semantics, token scopes (read vs write, fine-
grained), eventual consistency between the commit API and the CDN, and exactly which status the real Hub
returns for a stale ``parentCommit`` (we answer 412; the client maps 409 the same way).

Example:
    >>> with HubServer(token="hf_x", xet_dir="cas") as hub:                # doctest: +SKIP
    ...     HfApi(endpoint=hub.endpoint, token="hf_x").create_repo("org/r")
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import hashlib
import hmac
import json
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer"]

GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _xet_hex(raw: bytes) -> str:
    """A Xet hash as the protocol writes it: four little-endian u64 words, each printed as 16 hex digits."""
    return "".join(raw[i:i + 8][::-1].hex() for i in range(0, 32, 8))


def shard_files(shard: bytes) -> dict[str, tuple[str, int]]:
    """``{sha256: (xet file hash, size)}`` of the file entries of one MDB shard that carry a sha256.

    Layout (Xet protocol spec, "MDB Shard File Format"): a 48-byte header (tag, version, footer size), the
    file-info section at the footer's ``file_info_offset``: per file a 48-byte header (file hash, flags,
    entry count), that many 48-byte segment entries (xorb hash, flags, unpacked bytes, chunk range), as
    many verification entries if flag bit 31, one metadata extension (sha256) if flag bit 30; a header
    whose hash is all 0xFF ends the section.
    """
    _version, footer_size = struct.unpack_from("<QQ", shard, 32)
    footer = len(shard) - footer_size
    _fversion, off = struct.unpack_from("<QQ", shard, footer)
    out: dict[str, tuple[str, int]] = {}
    while off + 48 <= footer:
        file_hash = shard[off:off + 32]
        flags, n = struct.unpack_from("<II", shard, off + 32)
        off += 48
        if file_hash == b"\xff" * 32:
            break
        size = sum(struct.unpack_from("<I", shard, off + 48 * i + 36)[0] for i in range(n))
        off += 48 * n
        if flags & (1 << 31):
            off += 48 * n
        if flags & (1 << 30):
            out[_xet_hex(shard[off:off + 32])] = (_xet_hex(file_hash), size)
            off += 48
    return out


class XetCas:
    """The server's view of hf_xet's ``local://`` CAS directory: sha256 -> file lookups from the shards the
    clients uploaded, and reconstruction of a file's bytes (the "cas bridge" for clients without Xet)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = "local://" + self.root
        self._known: dict[str, tuple[str, int]] = {}
        self._seen: set[str] = set()
        self._session = None

    def lookup(self, sha256: str) -> tuple[str, int] | None:
        """``(xet hash, size)`` of the file with this sha256, if a client uploaded it."""
        if sha256 not in self._known:
            # hf_xet's local client keeps uploaded shards as <root>/**/shards/<hash>.mdb
            for path in glob.glob(os.path.join(self.root, "**", "shards", "*.mdb"), recursive=True):
                if path not in self._seen:
                    with open(path, "rb") as f:
                        self._known.update(shard_files(f.read()))
                    self._seen.add(path)
        return self._known.get(sha256)

    def _group(self):
        import hf_xet

        if self._session is None:
            self._session = hf_xet.XetSession()
        # local:// never checks the token; the expiry only has to lie in the future
        return self._session.new_download_stream_group(endpoint=self.url, token="server",
                                                       token_expiry_unix_secs=int(time.time()) + 3600)

    def read(self, xet_hash: str, size: int) -> bytes:
        import hf_xet

        return b"".join(self._group().download_stream(hf_xet.XetFileInfo(xet_hash, size)))

    def write(self, data: bytes) -> str:
        """Store ``data`` in the CAS (used by :meth:`HubServer.tamper`); its Xet hash."""
        import hf_xet

        if self._session is None:
            self._session = hf_xet.XetSession()
        with self._session.new_upload_commit(endpoint=self.url, token="server",
                                             token_expiry_unix_secs=int(time.time()) + 3600) as c:
            h = c.start_upload_bytes(data, sha256=hashlib.sha256(data).hexdigest())
        return h.result().xet_info.hash


@dataclass(frozen=True)
class Entry:
    size: int
    oid: str  # git blob sha1 (of the pointer for LFS files)
    content: bytes | None = None  # regular files
    lfs: str | None = None  # sha256 of LFS files (also of Xet files: the Hub keeps both)
    commit: str = ""  # last commit that touched the path
    xet: str | None = None  # Xet file hash of files stored in the CAS


@dataclass
class Commit:
    sha: str
    parent: str | None
    tree: dict[str, Entry]
    title: str
    date: str


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


class HubServer:
    """Start with ``with HubServer(token=...) as hub:``; ``hub.endpoint`` is the ``HF_ENDPOINT``.
    ``hub.requests`` records ``(method, path)`` of every request, for tests that check the protocol.
    ``xet_dir`` turns on the Xet endpoints with hf_xet's ``local://xet_dir`` as the CAS (else they 404,
    like a Hub without Xet, and only LFS clients can upload)."""

    def __init__(self, token: str = "hf_test_token", lfs_threshold: int = 1 << 20, xet_dir: str | None = None):
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.xet = XetCas(os.fspath(xet_dir)) if xet_dir is not None else None
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of every ranged GET
        # oid -> [offset, times]: the next `times` GETs of that LFS object stop at byte `offset` of the
        # object and drop the connection (a network that keeps failing at the same point)
        self.cut_at: dict[str, list[int]] = {}
        self._secret = os.urandom(16)
        self._n = 0
        hub, cdn = self, self

        class HubHandler(_Handler):
            server_role = "hub"
            owner = hub

        class CdnHandler(_Handler):
            server_role = "cdn"
            owner = cdn

        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), CdnHandler)
        for s in (self._hub, self._cdn):
            s.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> HubServer:
        for s in (self._hub, self._cdn):
            t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        for s in (self._hub, self._cdn):
            s.shutdown()
            s.server_close()

    # ---- state ------------------------------------------------------------------------------------

    def _sign(self, what: str) -> str:
        return hmac.new(self._secret, what.encode(), hashlib.sha256).hexdigest()[:32]

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict[str, Entry], title: str) -> Commit:
        self._n += 1
        sha = hashlib.sha1(f"{repo.repo_id}|{parent}|{self._n}|{title}|{time.time_ns()}".encode()).hexdigest()
        now = datetime.now(timezone.utc)
        date = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        tree = {p: (dataclasses.replace(e, commit=sha) if not e.commit else e) for p, e in tree.items()}
        c = Commit(sha, parent, tree, title, date)
        repo.commits[sha] = c
        return c

    def create_repo(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            repo = Repo(repo_id)
            attributes = Entry(len(GITATTRIBUTES), git_sha1(GITATTRIBUTES), GITATTRIBUTES)
            c = self._new_commit(repo, None, {".gitattributes": attributes}, "initial commit")
            repo.branches["main"] = c.sha
            self.repos[repo_id] = repo
            return True

    def resolve(self, repo: Repo, rev: str) -> Commit | None:
        sha = repo.branches.get(rev) or (rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None)
        return repo.commits.get(sha) if sha else None

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def tamper(self, repo_id: str, path: str, data: bytes) -> None:
        """Replace the bytes behind ``path`` at the head without a commit (a compromised storage): the
        metadata (sha256 etag, size) stays, the bytes served are ``data``."""
        with self.lock:
            e = self.repos[repo_id].commits[self.head(repo_id)].tree[path]
            if e.xet:
                object.__setattr__(e, "xet", self.xet.write(data))
                object.__setattr__(e, "size", len(data))
            elif e.lfs:
                self.lfs[e.lfs] = data
            else:
                object.__setattr__(e, "content", data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_role = "hub"
    owner: HubServer

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---- plumbing ---------------------------------------------------------------------------------

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        h = {"X-Error-Message": message}
        if code:
            h["X-Error-Code"] = code
        self._send(status, {"error": message}, h)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        ok = hmac.compare_digest(auth.encode(), f"Bearer {self.owner.token}".encode())
        if not ok:
            self._body()
            self._error(401, None, "Invalid credentials in Authorization header")
        return ok

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.owner.lock:
            self.owner.requests.append((self.command, url.path))
        try:
            if self.server_role == "cdn":
                return self._cdn(path, query)
            if not self._authorized():
                return
            return self._hub(path, query)
        except BrokenPipeError:
            pass

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # ---- other origin: LFS storage ----------------------------------------------------------------

    def _cdn(self, path: str, query: dict) -> None:
        hub = self.owner
        m = re.fullmatch(r"/xet/([0-9a-f]{64})", path)
        if m and hub.xet is not None and self.command in ("GET", "HEAD"):
            size = int(query.get("size", ["-1"])[0])
            if not hmac.compare_digest(query.get("sig", [""])[0], hub._sign(f"xet:{m.group(1)}:{size}")):
                return self._error(403, None, "bad signature")
            return self._ranged(hub.xet.read(m.group(1), size), {"ETag": f'"{m.group(1)}"'})
        m = re.fullmatch(r"/lfs/([0-9a-f]{64})", path)
        if not m:
            return self._error(404, None, "no such object")
        oid = m.group(1)
        sig = query.get("sig", [""])[0]
        if self.command == "PUT":
            size = int(query.get("size", ["-1"])[0])
            if not hmac.compare_digest(sig, hub._sign(f"put:{oid}:{size}")):
                self._body()
                return self._error(403, None, "bad signature")
            data = self._body()
            if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "uploaded bytes do not match the oid/size (BadDigest)")
            with hub.lock:
                hub.lfs[oid] = data
            return self._send(200)
        if self.command not in ("GET", "HEAD") or not hmac.compare_digest(sig, hub._sign(f"get:{oid}")):
            self._body()
            return self._error(403, None, "bad signature")
        with hub.lock:
            data = hub.lfs.get(oid)
            cut = hub.cut_at.get(oid) if self.command == "GET" else None
            if cut is not None:
                cut[1] -= 1
                if cut[1] <= 0:
                    del hub.cut_at[oid]
        if data is None:
            return self._error(404, None, "no such object")
        if cut is not None:
            return self._ranged(data, {"ETag": f'"{oid}"'}, cut_at=cut[0])
        return self._ranged(data, {"ETag": f'"{oid}"'})

    def _ranged(self, data: bytes, headers: dict, cut_at: int | None = None) -> None:
        """Answer a GET with ``data`` or the range asked for; with ``cut_at``, send the headers of the
        whole answer but only the bytes before offset ``cut_at``, then drop the connection."""
        rng = self.headers.get("Range")
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        status, start, end = 200, 0, len(data) - 1
        if rng:
            with self.owner.lock:
                self.owner.ranges.append((urlsplit(self.path).path, rng))
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                return self._error(416, None, "bad range")
            start = int(m.group(1))
            end = min(len(data) - 1, int(m.group(2)) if m.group(2) else len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}", **headers})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if cut_at is None:
            return self._send(status, data[start:end + 1], headers)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        self.wfile.write(data[start:max(start, min(cut_at, end + 1))])
        self.wfile.flush()
        self.close_connection = True

    # ---- the Hub ----------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.owner.repos.get(repo_id)
        if repo is None:
            self._body()
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit | None:
        c = self.owner.resolve(repo, rev)
        if c is None:
            self._body()
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
        return c

    @staticmethod
    def _file_json(path: str, e: Entry, commit: Commit | None = None, repo: Repo | None = None) -> dict:
        d = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.lfs:
            d["lfs"] = {"oid": e.lfs, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs, e.size))}
        if e.xet:
            d["xetHash"] = e.xet
        if repo is not None:
            c = repo.commits[e.commit]
            d["lastCommit"] = {"id": c.sha, "title": c.title, "date": c.date}
        return d

    def _hub(self, path: str, query: dict) -> None:
        hub, cmd = self.owner, self.command
        if cmd == "POST" and path == "/api/repos/create":
            p = json.loads(self._body() or b"{}")
            if p.get("type", "model") != "model":
                return self._error(400, None, "only model repos here")
            repo_id = f"{p['organization']}/{p['name']}" if p.get("organization") else p["name"]
            if not hub.create_repo(repo_id):
                # The real Hub's 409 carries the url too; create_repo(exist_ok=True) reads it.
                msg = "You already created this model repo"
                return self._send(409, {"error": msg, "url": f"{hub.endpoint}/{repo_id}"}, {"X-Error-Message": msg})
            return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/xet-(read|write)-token/([^/]+)", path)
        if m and cmd == "GET":
            return self._xet_token(*m.groups())

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|paths-info|preupload|commit)/([^/]+)(/.*)?)?", path)
        if m:
            repo_id, op, rev, rest = m.groups()
            with hub.lock:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if op is None or op == "revision":
                    if cmd != "GET":
                        return self._error(405, None, "method not allowed")
                    c = self._commit_at(repo, rev or "main")
                    if c is None:
                        return
                    return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": c.sha, "private": True,
                                            "lastModified": c.date, "siblings": [{"rfilename": p} for p in sorted(c.tree)]})
                if op == "tree" and cmd == "GET":
                    c = self._commit_at(repo, rev)
                    if c is None:
                        return
                    base = (rest or "").strip("/")
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    out, dirs = [], set()
                    for p, e in sorted(c.tree.items()):
                        if base and not p.startswith(base + "/"):
                            continue
                        rel = p[len(base) + 1:] if base else p
                        parts = rel.split("/")
                        for i in range(1, len(parts) if recursive else min(2, len(parts))):
                            dirs.add("/".join(([base] if base else []) + parts[:i]))
                        if recursive or len(parts) == 1:
                            out.append(self._file_json(p, e))
                    if base and not out and not dirs:
                        return self._error(404, "EntryNotFound", f"{base} does not exist")
                    out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(dirs)]
                    return self._send(200, out)
                if op == "paths-info" and cmd == "POST":
                    c = self._commit_at(repo, rev)
                    if c is None:
                        return
                    form = parse_qs(self._body().decode())
                    expand = form.get("expand", ["False"])[0].lower() == "true"
                    out = [self._file_json(p, c.tree[p], c, repo if expand else None) for p in form.get("paths", []) if p in c.tree]
                    return self._send(200, out)
                if op == "preupload" and cmd == "POST":
                    c = self._commit_at(repo, rev)
                    if c is None:
                        return
                    files = []
                    for f in json.loads(self._body())["files"]:
                        sample = base64.b64decode(f["sample"])
                        mode = "lfs" if f["size"] > hub.lfs_threshold or b"\x00" in sample else "regular"
                        e = c.tree.get(f["path"])
                        d = {"path": f["path"], "uploadMode": mode, "shouldIgnore": False}
                        if e is not None:
                            d["oid"] = e.lfs or e.oid
                        files.append(d)
                    return self._send(200, {"files": files, "commitOid": c.sha})
                if op == "commit" and cmd == "POST":
                    return self._commit(repo, rev)
            return self._error(404, None, "no such endpoint")

        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", path)
        if m and cmd == "POST":
            repo_id, op = m.groups()
            with hub.lock:
                if self._repo(repo_id) is None:
                    return
            p = json.loads(self._body())
            if op == "verify":
                with hub.lock:
                    data = hub.lfs.get(p["oid"])
                if data is None or len(data) != p["size"]:
                    return self._error(404, None, "object not uploaded")
                return self._send(200, {"ok": True})
            if p.get("operation") != "upload":
                return self._error(400, None, "only uploads here")
            objs = []
            for o in p["objects"]:
                oid, size = o["oid"], int(o["size"])
                with hub.lock:
                    have = oid in hub.lfs
                d = {"oid": oid, "size": size, "authenticated": True}
                if not have:
                    d["actions"] = {
                        "upload": {"href": f"{hub.cdn}/lfs/{oid}?size={size}&sig={hub._sign(f'put:{oid}:{size}')}", "header": {}},
                        "verify": {"href": f"{hub.endpoint}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                    }
                objs.append(d)
            return self._send(200, {"transfer": "basic", "objects": objs}, {"Content-Type": "application/vnd.git-lfs+json"})

        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and cmd in ("GET", "HEAD"):
            repo_id, rev, fpath = m.groups()
            with hub.lock:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                c = self._commit_at(repo, rev)
                if c is None:
                    return
                e = c.tree.get(fpath)
            if e is None:
                return self._error(404, "EntryNotFound", f"{fpath} does not exist at {rev}")
            h = {"X-Repo-Commit": c.sha, "ETag": f'"{e.oid}"'}
            if e.xet:
                # What the Hub sends for a Xet file: the hash, and where to get a read token for the CAS.
                loc = f"{hub.cdn}/xet/{e.xet}?size={e.size}&sig={hub._sign(f'xet:{e.xet}:{e.size}')}"
                read_token = f"{hub.endpoint}/api/models/{repo_id}/xet-read-token/{c.sha}"
                return self._send(302, b"", {**h, "Location": loc, "X-Linked-Etag": f'"{e.lfs}"', "X-Linked-Size": e.size,
                                             "X-Xet-Hash": e.xet, "Link": f'<{read_token}>; rel="xet-auth"'})
            if e.lfs:
                loc = f"{hub.cdn}/lfs/{e.lfs}?sig={hub._sign(f'get:{e.lfs}')}"
                return self._send(302, b"", {**h, "Location": loc, "X-Linked-Etag": f'"{e.lfs}"', "X-Linked-Size": e.size})
            return self._ranged(e.content or b"", h)
        self._body()
        return self._error(404, None, "no such endpoint")

    def _xet_token(self, repo_id: str, kind: str, rev: str) -> None:
        hub = self.owner
        with hub.lock:
            repo = self._repo(repo_id)
            if repo is None:
                return
            if hub.xet is None:
                return self._error(404, None, "Xet is not enabled on this server")
            # "None" is what the client sends when it will open a PR; branches and commits must exist.
            if rev != "None" and self._commit_at(repo, unquote(rev)) is None:
                return
        exp = int(time.time()) + 3600
        token = f"xet_{kind}_{hub._sign(f'xet-{kind}:{repo_id}:{exp}')}"
        return self._send(200, {"casUrl": hub.xet.url, "accessToken": token, "exp": exp},
                          {"X-Xet-Cas-Url": hub.xet.url, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": exp})

    def _commit(self, repo: Repo, branch: str) -> None:
        hub = self.owner
        if branch not in repo.branches:
            self._body()
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, None, "first line must be the header")
        header = lines[0]["value"]
        head = repo.branches[branch]
        parent = header.get("parentCommit")
        if parent is not None and not head.startswith(parent):
            return self._error(412, None, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[head].tree)
        for item in lines[1:]:
            k, v = item["key"], item["value"]
            p = v["path"]
            if k == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                tree[p] = Entry(len(data), git_sha1(data), data)
            elif k == "lfsFile":
                data = hub.lfs.get(v["oid"])
                xet = hub.xet.lookup(v["oid"]) if data is None and hub.xet is not None else None
                size = len(data) if data is not None else xet[1] if xet is not None else None
                if size is None or ("size" in v and v["size"] != size):
                    return self._error(422, None, f"LFS object {v['oid']} for {p} was not uploaded")
                tree[p] = Entry(size, git_sha1(lfs_pointer(v["oid"], size)), lfs=v["oid"], xet=xet[0] if xet else None)
            elif k == "deletedFile":
                if p not in tree:
                    return self._error(404, "EntryNotFound", "A file with this name doesn't exist")
                del tree[p]
            elif k == "deletedFolder":
                pre = p.rstrip("/") + "/"
                for q in [q for q in tree if q.startswith(pre)]:
                    del tree[q]
            else:
                return self._error(400, None, f"unknown commit operation {k}")
        c = hub._new_commit(repo, head, tree, header.get("summary", ""))
        repo.branches[branch] = c.sha
        return self._send(200, {"success": True, "commitOid": c.sha, "commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{c.sha}"})

