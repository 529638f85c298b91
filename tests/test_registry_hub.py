"""The registry over the Hugging Face Hub client (huggingface_hub's HfApi, LFS path, HF_HUB_DISABLE_XET=1)
against tests/hub_server.py on loopback: store semantics, a multi-MB blob through LFS, push/pull, a
wrong token. What the local server does not prove is listed in its docstring."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import uuid

import pytest

# Before huggingface_hub is imported anywhere: our server, no Xet, never offline.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

hub_server = pytest.importorskip("hub_server")
pytest.importorskip("huggingface_hub")

from slmpkg.registry import (
    AuthError,
    ConflictError,
    NotFoundError,
    core,
    pull,
    push,
)
from slmpkg.registry.hub import HubStore

from slmpkg import signing

TOKEN = "hf_test_" + "s3cr3t" * 4


@pytest.fixture(scope="module")
def hub():
    import huggingface_hub.constants as c

    c.HF_HUB_DISABLE_XET = True  # in case huggingface_hub was imported before this module
    c.HF_HUB_OFFLINE = False
    with hub_server.HubServer(token=TOKEN, lfs_threshold=1 << 20) as server:
        os.environ["HF_ENDPOINT"] = server.endpoint
        yield server


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
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


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


def test_big_blob_through_lfs(store, hub, tmp_path):
    data = os.urandom((5 << 20) + 7)
    digest = hashlib.sha256(data).hexdigest()
    src = tmp_path / "big"
    src.write_bytes(data)
    n = len(hub.requests)
    seen = []
    assert store.put_file("blobs/sha256/" + digest, src, sha256=digest, progress=seen.append)
    assert sum(seen) == len(data)
    paths = [p for _, p in hub.requests[n:]]
    assert any(p.endswith(".git/info/lfs/objects/batch") for p in paths)
    assert any(p.startswith("/lfs/") for p in paths)  # the bytes went to the other origin
    assert not store.put_file("blobs/sha256/" + digest, src, sha256=digest)
    data2, etag = store.get_with_etag("blobs/sha256/" + digest)
    assert etag == digest and hashlib.sha256(data2).hexdigest() == digest  # X-Linked-Etag = sha256
    assert store.size("blobs/sha256/" + digest) == len(data)
    assert store.read_range("blobs/sha256/" + digest, 3 << 20, (3 << 20) + 10) == data[3 << 20:(3 << 20) + 10]
    buf = io.BytesIO()
    assert store.download("blobs/sha256/" + digest, buf) == len(data)
    assert hashlib.sha256(buf.getvalue()).hexdigest() == digest


def test_lfs_server_refuses_bad_bytes(hub):
    import httpx2 as httpx  # huggingface_hub's HTTP client

    good = b"x" * 100
    oid = hashlib.sha256(good).hexdigest()
    url = f"{hub.cdn}/lfs/{oid}?size=100&sig={hub._sign(f'put:{oid}:100')}"
    assert httpx.put(url, content=b"y" * 100).status_code == 400
    assert oid not in hub.lfs
    assert httpx.put(url, content=good).status_code == 200


def test_round_trip(store, keys, tmp_path):
    signer, verifier = keys
    art = make_artifact(tmp_path / "art", size=(2 << 20) + 123)  # model.gguf goes through LFS
    r = push(store, "tiny:1.0", art, "cpu-x86_64", signer)
    assert r.uploaded_bytes > 2 << 20
    got = pull(store, "tiny:1.0", "cpu-x86_64", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert got.downloaded_bytes == r.uploaded_bytes
    assert same_tree(art, tmp_path / "out")
    again = pull(store, "tiny:1.0", "cpu-x86_64", tmp_path / "out2", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert again.downloaded_bytes == 0 and same_tree(art, tmp_path / "out2")
    assert push(store, "tiny:1.0", art, "cpu-x86_64", signer).uploaded_bytes == 0
    m = json.loads(store.get(core.blob_key(r.manifest_digest)))
    assert {f["path"] for f in m["files"]} == {"model.gguf", "tokenizer.json"}


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
