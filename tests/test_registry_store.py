"""The local directory store: atomic writes, create-only writes, compare-and-swap across processes."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from slmpkg.errors import SlmpkgError
from slmpkg.registry import ConflictError, IntegrityError, LocalStore, NotFoundError, StoreError, open_store


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "reg")


def test_get_put_list_delete(store):
    with pytest.raises(NotFoundError, match="a/b: not found"):
        store.get("a/b")
    store.put("a/b", b"1")
    store.put("a/c/d", b"2")
    store.put("b", b"3")
    assert store.get("a/b") == b"1"
    assert store.list("a/") == ["a/b", "a/c/d"]
    assert store.list("a/c") == ["a/c/d"]
    assert store.list() == ["a/b", "a/c/d", "b"]
    store.put("a/b", b"11")
    assert store.get("a/b") == b"11"
    store.delete("a/b")
    store.delete("a/b")  # idempotent
    assert not store.exists("a/b")
    assert store.list("a/") == ["a/c/d"]
    assert not any(store.root.joinpath(".tmp").iterdir())


def test_put_if_absent(store):
    assert store.put_if_absent("k", b"first")
    assert not store.put_if_absent("k", b"second")
    assert store.get("k") == b"first"


def test_compare_and_swap(store):
    e1 = store.compare_and_swap("k", None, b"v1")
    with pytest.raises(ConflictError, match="changed since read"):
        store.compare_and_swap("k", None, b"v2")
    data, etag = store.get_with_etag("k")
    assert (data, etag) == (b"v1", e1)
    e2 = store.compare_and_swap("k", etag, b"v2")
    with pytest.raises(ConflictError):
        store.compare_and_swap("k", e1, b"v3")
    assert store.get_with_etag("k") == (b"v2", e2)
    assert issubclass(ConflictError, SlmpkgError)


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", ".tmp/x", "a/.hidden", "a\\b"])
def test_bad_keys(store, key):
    with pytest.raises(StoreError, match="invalid store key"):
        store.put(key, b"x")


def _increment(root, n):
    s = LocalStore(root)
    for _ in range(n):
        while True:
            try:
                data, etag = s.get_with_etag("counter")
            except NotFoundError:
                data, etag = b"0", None
            try:
                s.compare_and_swap("counter", etag, str(int(data) + 1).encode())
                break
            except ConflictError:
                continue


def test_cas_across_processes(store):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_increment, args=(store.root, 25)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert store.get("counter") == b"150"


def test_blob_writer_and_ranges(store):
    import hashlib

    data = os.urandom(3 << 20)
    digest = hashlib.sha256(data).hexdigest()
    with store.open_blob_writer("blobs/x", digest) as w:
        for i in range(0, len(data), 100_000):
            w.write(data[i : i + 100_000])
    assert w.created
    assert store.size("blobs/x") == len(data)
    assert store.read_range("blobs/x", 10, 20) == data[10:20]
    with store.open_blob_writer("blobs/x", digest) as w:
        w.write(data)
    assert w.created is False


def test_blob_writer_bad_digest_leaves_nothing(store):
    with pytest.raises(IntegrityError, match="expected sha256:"):
        with store.open_blob_writer("blobs/y", "0" * 64) as w:
            w.write(b"hello")
    assert not store.exists("blobs/y")
    with pytest.raises(RuntimeError):
        with store.open_blob_writer("blobs/z") as w:
            w.write(b"partial")
            raise RuntimeError("interrupted")
    assert not store.exists("blobs/z")
    assert not any(store.root.joinpath(".tmp").iterdir())


def test_put_file_checks_digest(store, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    with pytest.raises(IntegrityError, match="changed while uploading"):
        store.put_file("blobs/f", src, sha256="1" * 64)
    assert not store.exists("blobs/f")
    assert store.put_file("blobs/f", src)
    assert not store.put_file("blobs/f", src)


def test_open_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMPKG_HOME", str(tmp_path / "home"))
    assert open_store().root == tmp_path / "home" / "registry"
    assert open_store(f"file://{tmp_path}/r").root == tmp_path / "r"
    with pytest.raises(SlmpkgError, match="unsupported registry URL"):
        open_store("ftp://x")
