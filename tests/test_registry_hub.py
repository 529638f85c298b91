"""The registry over the Hugging Face Hub client (huggingface_hub's HfApi) against tests/hub_server.py on
loopback: store semantics, a multi-MB blob, push/pull, a tampered blob, a wrong token.

Every test runs twice, once per client path (the ``hub`` fixture's ``mode``):
- ``lfs``: ``HF_HUB_DISABLE_XET`` on — big files go through the LFS batch API and a second origin;
- ``xet``: the default path — the real ``hf_xet`` chunks, uploads and downloads big files against its own
  ``local://`` CAS, the server hands out xet tokens and maps sha256 -> Xet hash from the uploaded shards.
The tests check which path the requests actually took. huggingface_hub reads ``HF_HUB_DISABLE_XET``
into ``huggingface_hub.constants`` at import and looks it up there on every call
(``utils._runtime.is_xet_available``), so each mode sets that attribute for its tests and restores it.
What the local server does not prove is listed in its docstring."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import uuid

import pytest

# Before huggingface_hub is imported anywhere: never offline, quiet.
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

hub_server = pytest.importorskip("hub_server")
pytest.importorskip("huggingface_hub")

from slmpkg.registry import (
    AuthError,
    ConflictError,
    IntegrityError,
    NotFoundError,
    StoreError,
    blob_key,
    pull,
    push,
)
from slmpkg.registry.hub import HubStore

from slmpkg import signing

TOKEN = "hf_test_" + "s3cr3t" * 4


MODES = ["lfs", "xet"]


@pytest.fixture(scope="module", params=MODES)
def hub(request, tmp_path_factory):
    """The server (Xet enabled, like the Hub) and the client path of this run: ``hub.mode``."""
    import huggingface_hub.constants as c

    mode = request.param
    if mode == "xet":
        # hf_xet logs (and caches) under HF_XET_CACHE, read when it is imported: keep them out of
        # ~/.cache. Left set: hf_xet stays loaded as long as the process.
        os.environ.setdefault("HF_XET_CACHE", str(tmp_path_factory.mktemp("xet-cache")))
        pytest.importorskip("hf_xet")
    saved = c.HF_HUB_DISABLE_XET, c.HF_HUB_OFFLINE
    c.HF_HUB_DISABLE_XET, c.HF_HUB_OFFLINE = mode == "lfs", False
    try:
        with hub_server.HubServer(token=TOKEN, lfs_threshold=1 << 20,
                                  xet_dir=tmp_path_factory.mktemp(f"cas-{mode}")) as server:
            server.mode = mode
            yield server
    finally:
        c.HF_HUB_DISABLE_XET, c.HF_HUB_OFFLINE = saved


def paths_since(hub, n: int) -> list[str]:
    return [p for _, p in hub.requests[n:]]


def mark(hub) -> int:
    """Where the next operation's requests start; also forgets huggingface_hub's cached Xet read tokens,
    so a read through Xet shows up as a ``xet-read-token`` request."""
    from huggingface_hub.utils import _xet

    _xet.XET_CONNECTION_INFO_CACHE.clear()
    return len(hub.requests)


def assert_upload_path(hub, paths: list[str], digest: str) -> None:
    """The big file went the way ``hub.mode`` says, and only that way."""
    lfs = [p for p in paths if p.endswith(".git/info/lfs/objects/batch") or p.startswith("/lfs/")]
    xet = [p for p in paths if "/xet-write-token/" in p]
    if hub.mode == "lfs":
        assert lfs and not xet
        assert hub.xet.lookup(digest) is None
    else:
        assert xet and not lfs
        assert hub.xet.lookup(digest) is not None  # hf_xet wrote a shard naming this sha256 into the CAS


def assert_download_path(hub, paths: list[str]) -> None:
    via_xet = [p for p in paths if "/xet-read-token/" in p]
    via_http = [p for p in paths if p.startswith(("/lfs/", "/xet/"))]
    if hub.mode == "lfs":
        assert via_http and not via_xet
    else:
        # from the CAS through hf_xet, not through the server's HTTP bridge
        assert via_xet and not via_http, paths


@pytest.fixture
def store(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return HubStore(f"hf://org/t-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    priv, pub = signing.generate_keypair(tmp_path_factory.mktemp("keys") / "release")
    return signing.KeySigner(priv), signing.KeyVerifier(pub)


def make_artifact(root, seed=0, size=64 << 10):
    root.mkdir(parents=True)
    rnd = random.Random(seed)
    (root / "model.gguf").write_bytes(rnd.randbytes(size))
    (root / "tokenizer.json").write_text(json.dumps({"seed": seed}))
    return root


def same_tree(a, b):
    """``b`` (pulled) holds ``a``'s files, byte for byte, plus the model.sig push adds to an unsigned
    artifact (its content is checked by test_pull_model_signing.py)."""
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    added = [] if "model.sig" in fa else ["model.sig"]
    return fb == sorted(fa + added) and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def test_store_semantics(store, hub):
    assert store.url.startswith("hf://org/t-") and TOKEN not in repr(store)
    with pytest.raises(NotFoundError):
        store.get("a")  # the repo does not exist yet
    assert store.list() == []
    assert store.put_if_absent("a", b"1")
    assert not store.put_if_absent("a", b"2")
    data, etag = store.get_with_etag("a")
    assert data == b"1" and etag == hub_server.git_sha1(b"1")  # regular file: git blob sha1
    with pytest.raises(ConflictError):
        store.compare_and_swap("a", None, b"x")
    store.put("other", b"unrelated")  # moves the branch but not "a": the etag stays valid
    e2 = store.compare_and_swap("a", etag, b"3")
    with pytest.raises(ConflictError, match="changed since read"):
        store.compare_and_swap("a", etag, b"4")  # stale etag
    assert store.get_with_etag("a") == (b"3", e2)
    store.put("b/c", b"5")
    assert store.list() == ["a", "b/c", "other"] and store.list("b/") == ["b/c"]
    assert store.read_range("b/c", 0, 1) == b"5" and store.size("b/c") == 1
    with pytest.raises(NotFoundError):
        store.get("b/missing")
    t0 = store.mtime("a")
    store.touch("a")
    assert store.mtime("a") >= t0 and store.list() == ["a", "b/c", "other"]  # the marker is hidden
    store.delete("a")
    store.delete("a")  # idempotent
    assert not store.exists("a") and store.list() == ["b/c", "other"]
    assert not any(p.startswith(".slmpkg-touch/a") for p in store._files(store._head()))


def test_cas_commits_on_the_head_it_checked(store, hub):
    """A commit racing in between our check and our commit makes the Hub answer 412 (parentCommit)."""
    e1 = store.compare_and_swap("tag", None, b"v1")
    real_commit = store._commit
    raced = []

    def racing_commit(ops, message, parent):
        if not raced:
            raced.append(1)
            real_commit([store._add("tag", b"theirs")], "concurrent writer", None)
        return real_commit(ops, message, parent)

    store._commit = racing_commit
    with pytest.raises(ConflictError):
        store.compare_and_swap("tag", e1, b"mine")
    store._commit = real_commit
    assert store.get("tag") == b"theirs"
    assert ("POST", f"/api/models/{store.repo_id}/commit/main") in hub.requests


def test_big_blob(store, hub, tmp_path):
    data = os.urandom((5 << 20) + 7)
    digest = hashlib.sha256(data).hexdigest()
    key = "blobs/sha256/" + digest
    src = tmp_path / "big"
    src.write_bytes(data)
    n = len(hub.requests)
    seen = []
    assert store.put_file(key, src, sha256=digest, progress=seen.append)
    assert sum(seen) == len(data)
    assert_upload_path(hub, paths_since(hub, n), digest)
    assert not store.put_file(key, src, sha256=digest)

    n = mark(hub)
    data2, etag = store.get_with_etag(key)  # huggingface_hub's hf_hub_download
    assert etag == digest and hashlib.sha256(data2).hexdigest() == digest  # X-Linked-Etag = sha256
    assert_download_path(hub, paths_since(hub, n))
    assert store.size(key) == len(data)
    n = mark(hub)
    assert store.read_range(key, 3 << 20, (3 << 20) + 10) == data[3 << 20:(3 << 20) + 10]
    assert store.read_range(key, len(data) - 5, len(data) + 100) == data[-5:]  # clipped at the end
    buf = io.BytesIO()
    assert store.download(key, buf) == len(data)
    assert hashlib.sha256(buf.getvalue()).hexdigest() == digest
    assert_download_path(hub, paths_since(hub, n))  # the store's own ranged reads too


@pytest.mark.parametrize("size", [100, (2 << 20) + 10], ids=["regular", "big"])
def test_file_changed_after_hashing(store, hub, tmp_path, size):
    """The file changes between put_file's hash and the upload (same size): the stored id (git sha1 of a
    regular file, sha256 of an LFS/Xet file) gives it away, put_file fails and leaves no such key."""
    def content() -> bytes:  # hex text: no NUL byte, so small files are stored as regular git files
        return os.urandom(size // 2).hex().encode()

    src = tmp_path / "f"
    data = content()
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    real_add = store._add

    def add_after_rewrite(key, source):
        src.write_bytes(content())  # another writer, after the hash and before huggingface_hub reads
        return real_add(key, source)

    store._add = add_after_rewrite
    with pytest.raises(IntegrityError, match="changed while uploading.*the stored copy was removed"):
        store.put_file("blobs/sha256/" + digest, src, sha256=digest)
    store._add = real_add
    assert not store.exists("blobs/sha256/" + digest)


def test_xet_file_read_without_xet(store, hub, tmp_path):
    """A file uploaded through Xet is readable by a client with Xet disabled (the HTTP redirect)."""
    if hub.mode != "xet":
        pytest.skip("uploads through Xet only in the xet run")
    import huggingface_hub.constants as c

    data = os.urandom((2 << 20) + 3)
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "f").write_bytes(data)
    assert store.put_file("blobs/sha256/" + digest, tmp_path / "f", sha256=digest)
    c.HF_HUB_DISABLE_XET = True
    try:
        n = len(hub.requests)
        buf = io.BytesIO()
        assert store.download("blobs/sha256/" + digest, buf) == len(data) and buf.getvalue() == data
        assert store.read_range("blobs/sha256/" + digest, 1, 9) == data[1:9]
        paths = paths_since(hub, n)
        assert any(p.startswith("/xet/") for p in paths) and not any("/xet-read-token/" in p for p in paths)
    finally:
        c.HF_HUB_DISABLE_XET = False


def test_cas_that_lost_the_bytes(hub, tmp_path):
    """Reads of a Xet file the CAS cannot produce fail with one clear error, never a short blob. hf_xet
    1.8.0's ``download_stream`` does not always raise: for a file hash the CAS does not know it just ends,
    and with a xorb gone it raises XetObjectNotFoundError or (racily) ends early too — so the store
    counts the bytes."""
    if hub.mode != "xet":
        pytest.skip("a Xet-stored file only in the xet run")
    import glob

    with hub_server.HubServer(token=TOKEN, xet_dir=tmp_path / "cas") as own:  # its own CAS to break
        st = HubStore("hf://org/lost", endpoint=own.endpoint, token=TOKEN)
        keys = []
        for i in range(2):
            data = os.urandom((2 << 20) + i)
            keys.append("blobs/sha256/" + hashlib.sha256(data).hexdigest())
            (tmp_path / "f").write_bytes(data)
            assert st.put_file(keys[-1], tmp_path / "f")
        entry = own.repos["org/lost"].commits[own.head("org/lost")].tree[keys[0]]
        object.__setattr__(entry, "xet", "ab" * 32)  # the Hub points at a file the CAS never stored
        with pytest.raises(IntegrityError, match=r"got 0 bytes, expected 2097152"):
            st.download(keys[0], io.BytesIO())
        with pytest.raises(IntegrityError, match=r"got 0 bytes, expected 10"):
            st.read_range(keys[0], 10, 20)

        xorbs = glob.glob(str(tmp_path / "cas" / "**" / "xorbs" / "default.*"), recursive=True)
        assert xorbs
        for x in xorbs:
            os.unlink(x)
        for read in (lambda: st.download(keys[1], io.BytesIO()), lambda: st.read_range(keys[1], 10, 20)):
            with pytest.raises((StoreError, IntegrityError)) as e:
                read()
            msg = str(e.value)
            assert re.search(r"through Xet failed: XetObjectNotFoundError|got \d+ bytes, expected", msg), msg
            assert "\n" not in msg and TOKEN not in msg


def test_commit_of_unknown_sha256_refused(hub):
    """The server accepts an ``lfsFile`` only for bytes it holds: uploaded through LFS, or named by a shard
    hf_xet uploaded to the CAS (with the right size)."""
    import httpx2  # huggingface_hub's HTTP client

    repo = f"org/s-{uuid.uuid4().hex[:8]}"
    assert hub.create_repo(repo)
    missing = hashlib.sha256(b"never uploaded").hexdigest()
    assert hub.xet.lookup(missing) is None
    r = httpx2.post(f"{hub.endpoint}/api/models/{repo}/commit/main",
                    headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
                    content="\n".join([
                        json.dumps({"key": "header", "value": {"summary": "x"}}),
                        json.dumps({"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": missing, "size": 5}}),
                    ]))
    assert r.status_code == 422
    assert [p for p in hub.repos[repo].commits[hub.head(repo)].tree] == [".gitattributes"]


def test_lfs_server_refuses_bad_bytes(hub):
    import httpx2 as httpx  # huggingface_hub's HTTP client

    good = b"x" * 100
    oid = hashlib.sha256(good).hexdigest()
    url = f"{hub.cdn}/lfs/{oid}?size=100&sig={hub._sign(f'put:{oid}:100')}"
    assert httpx.put(url, content=b"y" * 100).status_code == 400
    assert oid not in hub.lfs
    assert httpx.put(url, content=good).status_code == 200


def test_round_trip(store, hub, keys, tmp_path):
    signer, verifier = keys
    art = make_artifact(tmp_path / "art", size=(2 << 20) + 123)  # model.gguf goes through LFS or Xet
    n = len(hub.requests)
    r = push(store, "tiny:1.0", art, "cpu-x86_64", signer)
    assert r.uploaded_bytes > 2 << 20
    assert_upload_path(hub, paths_since(hub, n), hashlib.sha256((art / "model.gguf").read_bytes()).hexdigest())
    n = mark(hub)
    got = pull(store, "tiny:1.0", "cpu-x86_64", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert got.downloaded_bytes == r.uploaded_bytes
    assert_download_path(hub, paths_since(hub, n))
    assert same_tree(art, tmp_path / "out")
    again = pull(store, "tiny:1.0", "cpu-x86_64", tmp_path / "out2", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert again.downloaded_bytes == 0 and same_tree(art, tmp_path / "out2")
    assert push(store, "tiny:1.0", art, "cpu-x86_64", signer).uploaded_bytes == 0
    m = json.loads(store.get(blob_key(r.manifest_digest)))
    assert {f["path"] for f in m["files"]} == {"model.gguf", "model.sig", "tokenizer.json"}


def test_tampered_blob_refused(store, hub, keys, tmp_path):
    """Storage that serves other bytes under a blob's name (same size, same sha256 etag): pull refuses
    and writes nothing."""
    signer, verifier = keys
    art = make_artifact(tmp_path / "art", seed=3, size=(2 << 20) + 5)
    push(store, "tiny:2.0", art, "cpu-x86_64", signer)
    digest = hashlib.sha256((art / "model.gguf").read_bytes()).hexdigest()
    bad = bytearray((art / "model.gguf").read_bytes())
    bad[len(bad) // 2] ^= 1
    hub.tamper(store.repo_id, blob_key("sha256:" + digest), bytes(bad))
    with pytest.raises(IntegrityError):
        pull(store, "tiny:2.0", "cpu-x86_64", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "blobs" / "sha256" / digest).exists()


def test_wrong_token(hub, store, keys, tmp_path, monkeypatch):
    signer, _ = keys
    store.put("k", b"v")
    bad_token = "hf_wrong_" + "x" * 20
    monkeypatch.setenv("HF_TOKEN", bad_token)
    bad = HubStore(store.url)
    for call in (lambda: bad.get("k"), lambda: bad.list(),
                 lambda: push(bad, "tiny:1.0", make_artifact(tmp_path / "art"), "cpu", signer)):
        with pytest.raises(AuthError) as e:
            call()
        msg = str(e.value)
        assert "credentials rejected" in msg and "\n" not in msg
        assert bad_token not in msg and TOKEN not in msg and bad_token not in repr(bad)


def test_quiet_silences_huggingface_hub_bars(hub, tmp_path):
    """`slmpkg push/pull -q` print nothing, not even huggingface_hub's own upload and download
    bars (which it draws to any stderr, terminal or not: the run without -q shows them)."""
    import subprocess
    import sys

    priv, pub = signing.generate_keypair(tmp_path / "release")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SLMPKG_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf-home"),
               HF_XET_CACHE=str(tmp_path / "xet-cache"), HF_HUB_DISABLE_TELEMETRY="1",
               SLMPKG_HOME=str(tmp_path / "home"))
    if hub.mode == "lfs":
        env["HF_HUB_DISABLE_XET"] = "1"
    url = f"hf://org/q-{uuid.uuid4().hex[:8]}"

    def slmpkg(*args):
        return subprocess.run([sys.executable, "-c", "from slmpkg.cli import main; main()", *map(str, args),
                               "--registry", url], env=env, capture_output=True, text=True, timeout=300)

    for version, quiet in (("1", []), ("2", ["-q"])):
        art = make_artifact(tmp_path / f"art{version}", seed=int(version), size=(2 << 20) + 1)
        (art / "model.gguf").rename(art / "model.bin")  # not a GGUF: the CLI would inspect one
        pushed = slmpkg("push", f"m:{version}", art, "--target", "cpu-x86_64", "--key", priv, *quiet)
        pulled = slmpkg("pull", f"m:{version}", "--target", "cpu-x86_64", "-o", tmp_path / f"out{version}",
                        "--pub", pub, *quiet)
        assert pushed.returncode == 0 and pulled.returncode == 0, pushed.stderr + pulled.stderr
        if quiet:
            assert (pushed.stdout, pushed.stderr, pulled.stdout, pulled.stderr) == ("", "", "", "")
        else:
            assert "100%" in pushed.stderr + pulled.stderr  # huggingface_hub's bars, when not silenced


def test_delete_if_stale_checks_again_when_a_touch_lands_in_between(store, hub):
    """gc's delete on the Hub is a commit whose parent is the commit it checked the age at: a touch in
    between moves the branch, the Hub refuses the delete, and the touched blob is kept."""
    import time

    store.put("blobs/sha256/" + "ab" * 32, b"old")
    store.put("blobs/sha256/" + "cd" * 32, b"old too")
    time.sleep(0.05)
    cutoff = time.time()
    touched = []

    class Racing(HubStore):
        def _mtime_at(self, key, head):
            found = super()._mtime_at(key, head)
            if not touched and key.endswith("ab" * 32):
                touched.append(key)
                self.touch(key)  # a push reusing the blob, just after gc looked at its age
            return found

    racing = Racing(store.url)
    assert racing.delete_if_stale("blobs/sha256/" + "ab" * 32, cutoff) is False
    assert racing.delete_if_stale("blobs/sha256/" + "cd" * 32, cutoff) is True
    assert store.exists("blobs/sha256/" + "ab" * 32) and not store.exists("blobs/sha256/" + "cd" * 32)
