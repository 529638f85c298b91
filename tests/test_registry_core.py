"""push / pull / tag / ls / gc on the local store: trust checks (signature, mix-and-match, freeze,
rollback, digests, paths), concurrent pushers, the content-addressed cache."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading

import pytest

from slmpkg import signing
from slmpkg.registry import (
    ConflictError,
    ExpiredError,
    IntegrityError,
    LocalStore,
    MixAndMatchError,
    NotFoundError,
    RegistryError,
    RollbackError,
    TrustError,
    UnsafePathError,
    gc,
    ls,
    pull,
    push,
    tag,
)
from slmpkg._io import sha256_file as hash_file
from slmpkg.registry.listing import read_index
from slmpkg.registry.manifest import MANIFEST_MEDIA_TYPE
from slmpkg.registry.names import blob_key
from slmpkg.registry.signed import INDEX_PREDICATE, TAG_PREDICATE, sha256_hex, sign_doc


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub = signing.generate_keypair(d / "release")
    other_priv, other_pub = signing.generate_keypair(d / "other")
    return {
        "signer": signing.KeySigner(priv),
        "verifier": signing.KeyVerifier(pub),
        "other_signer": signing.KeySigner(other_priv),
        "other_verifier": signing.KeyVerifier(other_pub),
        "private_key": priv,
        "public_key": pub,
    }


def make_artifact(root, seed=0, size=64 << 10):
    root.mkdir(parents=True)
    rnd = __import__("random").Random(seed)
    (root / "model.gguf").write_bytes(rnd.randbytes(size))
    (root / "tokenizer.json").write_text(json.dumps({"seed": seed}))
    (root / "sub").mkdir()
    (root / "sub" / "config.json").write_text("{}")
    return root


@pytest.fixture
def env(tmp_path, keys):
    class Env:
        store = LocalStore(tmp_path / "reg")
        cache = tmp_path / "cache"
        state = tmp_path / "trust.json"
        art = make_artifact(tmp_path / "art")
        tmp = tmp_path

        def pull(self, ref="tiny:1.0", target="cpu-x86_64", out="out", **kw):
            kw.setdefault("verifier", keys["verifier"])
            kw.setdefault("state", self.state)
            return pull(self.store, ref, target, self.tmp / out, cache_dir=self.cache, **kw)

    return Env()


def same_tree(a, b):
    """``b`` (pulled) holds ``a``'s files, byte for byte, plus the model.sig push adds to an unsigned
    artifact (its content is checked by test_pull_model_signing.py)."""
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    added = [] if "model.sig" in fa else ["model.sig"]
    return fb == sorted(fa + added) and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def test_round_trip(env, keys):
    r = push(env.store, "tiny:1.0", env.art, "cpu-x86_64", keys["signer"], quant="Q4_K", bits_per_weight=4.5,
             source_digest="sha256:" + "ab" * 32, options={"arch": "llama"})
    assert r.index_version == 1 and r.uploaded_bytes > 64 << 10 and r.existing_bytes == 0
    assert sorted(r.files) == ["model.gguf", "model.sig", "sub/config.json", "tokenizer.json"]
    got = env.pull()
    assert got.changed and got.downloaded_bytes == r.uploaded_bytes and got.cached_bytes == 0
    assert same_tree(env.art, env.tmp / "out")
    m = json.loads(env.store.get(blob_key(r.manifest_digest)))
    assert m["format"] == "gguf" and m["quant"] == "Q4_K" and m["bitsPerWeight"] == 4.5 and m["target"] == "cpu-x86_64"
    assert m["provenance"]["sourceDigest"] == "sha256:" + "ab" * 32
    f = {e["path"]: e for e in m["files"]}
    assert f["model.gguf"]["mediaType"] == "application/vnd.gguf" and f["model.gguf"]["size"] == 64 << 10
    # Pulled files are hard links to the read-only cache.
    st = os.stat(env.tmp / "out" / "model.gguf")
    assert st.st_nlink == 2 and not st.st_mode & 0o222
    # Again into the same directory: nothing changes; into another: nothing is downloaded.
    again = env.pull()
    assert not again.changed and again.downloaded_bytes == 0
    other = env.pull(out="out2", link=False)
    assert other.changed and other.downloaded_bytes == 0 and other.cached_bytes == r.uploaded_bytes
    assert same_tree(env.art, env.tmp / "out2")
    # Re-pushing the same content is a no-op.
    r2 = push(env.store, "tiny:1.0", env.art, "cpu-x86_64", keys["signer"], quant="Q4_K", bits_per_weight=4.5,
              source_digest="sha256:" + "ab" * 32, options={"arch": "llama"})
    assert r2.index_version == 1 and r2.uploaded_bytes == 0


def test_single_file_and_ranked_targets(env, keys):
    push(env.store, "tiny:1.0", env.art / "model.gguf", "cpu-x86_64", keys["signer"])
    got = env.pull(target=["cuda-sm80", "cpu-x86_64-avx2", "cpu-x86_64"])
    assert got.target == "cpu-x86_64" and got.files == ("model.gguf", "model.sig")
    assert (env.tmp / "out" / "model.gguf").read_bytes() == (env.art / "model.gguf").read_bytes()
    with pytest.raises(NotFoundError, match=r"no artifact for cuda-sm80 \(published: cpu-x86_64\)"):
        env.pull(target="cuda-sm80", out="o3")
    with pytest.raises(NotFoundError, match="no such version or tag"):
        env.pull(ref="tiny:9.9", out="o4")


def test_concurrent_pushers_merge(env, keys):
    targets = [f"t{i}" for i in range(8)]
    arts = [make_artifact(env.tmp / f"a{i}", seed=i, size=4096) for i in range(8)]
    errors = []
    barrier = threading.Barrier(8)

    def one(i):
        try:
            barrier.wait()
            push(LocalStore(env.store.root), "tiny:1.0", arts[i], targets[i], keys["signer"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    idx = ls(env.store, "tiny:1.0", verifier=keys["verifier"])
    assert sorted(idx["targets"]) == targets and idx["version"] == 8
    for i in (0, 7):
        env.pull(target=targets[i], out=f"o{i}")
        assert same_tree(arts[i], env.tmp / f"o{i}")


def test_replace_target_needs_force(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    other = make_artifact(env.tmp / "b", seed=1)
    with pytest.raises(ConflictError, match="already has target cpu with other content"):
        push(env.store, "tiny:1.0", other, "cpu", keys["signer"])
    assert push(env.store, "tiny:1.0", other, "cpu", keys["signer"], force=True).index_version == 2
    # An index signed by another key is not silently re-signed by a pusher.
    with pytest.raises(TrustError, match="signed by a different key"):
        push(env.store, "tiny:1.0", other, "gpu", keys["other_signer"])


def test_wrong_key_and_tampered_index(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    with pytest.raises(TrustError, match="different key"):
        env.pull(target="cpu", verifier=keys["other_verifier"])
    key = "indexes/tiny/1.0.json"
    bundle = json.loads(env.store.get(key))
    import base64

    st = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    st["predicate"]["expires"] = "2999-01-01T00:00:00Z"
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    env.store.put(key, json.dumps(bundle).encode())
    with pytest.raises(TrustError, match="bad signature"):
        env.pull(target="cpu")
    assert not (env.tmp / "out").exists()


def test_mix_and_match(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    env.store.put("indexes/tiny/2.0.json", env.store.get("indexes/tiny/1.0.json"))
    with pytest.raises(MixAndMatchError, match="signed index is for tiny:1.0, expected tiny:2.0"):
        env.pull(ref="tiny:2.0", target="cpu")
    # A manifest of another target listed under this one (signed by a careless or hostile pusher).
    r = push(env.store, "tiny:1.0", env.art, "gpu", keys["signer"])
    pred = read_index(env.store, "indexes/tiny/1.0.json", None)
    pred["targets"]["cpu"] = pred["targets"]["gpu"]
    pred["version"] += 1
    env.store.put("indexes/tiny/1.0.json", sign_doc(keys["signer"], INDEX_PREDICATE, "tiny:1.0", pred))
    with pytest.raises(MixAndMatchError, match="manifest is for target 'gpu', expected 'cpu'"):
        env.pull(target="cpu")
    assert r.index_version == 2


def test_expired(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"], expires_in=dt.timedelta(days=1))
    env.pull(target="cpu", now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=23))
    with pytest.raises(ExpiredError, match="expired at"):
        env.pull(target="cpu", out="o2", now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2))


def test_rollback(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    old = env.store.get("indexes/tiny/1.0.json")
    push(env.store, "tiny:1.0", env.art, "gpu", keys["signer"])
    assert env.pull(target="cpu").index_version == 2
    env.store.put("indexes/tiny/1.0.json", old)  # an attacker (or stale mirror) serves the old index
    with pytest.raises(RollbackError, match="version 1, older than version 2"):
        env.pull(target="cpu", out="o2")
    # Another client with no memory accepts it (that is what the state file is for).
    env.pull(target="cpu", out="o3", state=env.tmp / "fresh.json")


def test_altered_blob_refused(env, keys):
    r = push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    m = json.loads(env.store.get(blob_key(r.manifest_digest)))
    big = next(f for f in m["files"] if f["path"] == "model.gguf")
    p = env.store._path(blob_key(big["digest"]))
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="blob does not match its digest"):
        env.pull(target="cpu")
    assert not (env.tmp / "out").exists()
    assert not any(env.tmp.glob(".out.pull-*"))
    assert not (env.cache / "blobs" / "sha256" / big["digest"][7:]).exists()
    # A manifest altered in place is caught by its signed digest.
    mp = env.store._path(blob_key(r.manifest_digest))
    mp.write_bytes(mp.read_bytes().replace(b'"quant": null', b'"quant": "Q8_0"'))
    with pytest.raises(IntegrityError, match="manifest does not match its signed digest"):
        env.pull(target="cpu")


@pytest.mark.parametrize("bad", ["../evil", "/etc/evil", "a/../../evil", "a\\evil", "", "a//b", "./a"])
def test_unsafe_paths_refused(env, keys, bad):
    blob = b"evil"
    d = "sha256:" + sha256_hex(blob)
    env.store.put_if_absent(blob_key(d), blob)
    manifest = {"mediaType": MANIFEST_MEDIA_TYPE, "name": "tiny", "release": "1.0", "target": "cpu",
                "files": [{"path": bad, "digest": d, "size": 4, "mediaType": "x"}]}
    mbytes = json.dumps(manifest).encode()
    md = "sha256:" + sha256_hex(mbytes)
    env.store.put_if_absent(blob_key(md), mbytes)
    pred = {"name": "tiny", "release": "1.0", "version": 1, "expires": "2999-01-01T00:00:00Z",
            "targets": {"cpu": {"digest": md, "size": len(mbytes), "mediaType": MANIFEST_MEDIA_TYPE}}}
    env.store.put("indexes/tiny/1.0.json", sign_doc(keys["signer"], INDEX_PREDICATE, "tiny:1.0", pred))
    with pytest.raises(UnsafePathError, match="unsafe file path"):
        env.pull(target="cpu", out="sub/out")
    assert not (env.tmp / "evil").exists() and not (env.tmp / "sub").exists()


def test_symlink_artifact_refused(env, keys):
    os.symlink("/etc/passwd", env.art / "link")
    with pytest.raises(RegistryError, match="is a symlink"):
        push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    assert env.store.list("indexes/") == []


def test_out_dir_rules(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    out = env.tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(RegistryError, match="not empty"):
        env.pull(target="cpu")
    assert (out / "old.txt").exists()
    env.pull(target="cpu", overwrite=True)
    assert same_tree(env.art, out)
    (out / "extra").write_text("y")  # no longer exactly the artifact: replaced only with overwrite
    with pytest.raises(RegistryError, match="not empty"):
        env.pull(target="cpu")
    assert env.pull(target="cpu", overwrite=True).changed
    assert same_tree(env.art, out)


def test_tags(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"], tags=["stable"])
    push(env.store, "tiny:2.0", make_artifact(env.tmp / "b", seed=2), "cpu", keys["signer"])
    assert env.pull(ref="tiny:stable", target="cpu").release == "1.0"
    old_tag = env.store.get("tags/tiny/stable.json")
    assert tag(env.store, "tiny:stable", "2.0", keys["signer"]) == 2
    assert tag(env.store, "tiny:stable", "2.0", keys["signer"]) == 2  # already there
    got = env.pull(ref="tiny:stable", target="cpu", out="o2")
    assert got.release == "2.0" and same_tree(env.tmp / "b", env.tmp / "o2")
    env.store.put("tags/tiny/stable.json", old_tag)
    with pytest.raises(RollbackError, match="tag tiny:stable"):
        env.pull(ref="tiny:stable", target="cpu", out="o3")
    with pytest.raises(NotFoundError, match="no such version"):
        tag(env.store, "tiny:latest", "3.0", keys["signer"])
    with pytest.raises(RegistryError, match="is a version, not a tag"):
        tag(env.store, "tiny:1.0", "2.0", keys["signer"])
    assert ls(env.store) == ["tiny"]
    listing = ls(env.store, "tiny", verifier=keys["verifier"])
    assert listing["tags"] == {"stable": "1.0"} and sorted(listing["versions"]) == ["1.0", "2.0"]
    detail = ls(env.store, "tiny:2.0")
    assert detail["manifests"]["cpu"]["release"] == "2.0"


def test_bad_refs(env, keys):
    for ref in ("tiny", "Tiny:1.0", "tiny:", "tiny:../x", "../x:1"):
        with pytest.raises(RegistryError):
            push(env.store, ref, env.art, "cpu", keys["signer"])
    with pytest.raises(RegistryError, match="invalid target"):
        push(env.store, "tiny:1.0", env.art, "../cpu", keys["signer"])


def test_gc(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    other = make_artifact(env.tmp / "b", seed=1)
    push(env.store, "tiny:1.0", other, "cpu", keys["signer"], force=True)  # orphans the first manifest, 2 blobs and model.sig
    before = set(env.store.list("blobs/"))
    young = gc(env.store)
    assert young.deleted == () and len(young.kept_young) == 4 and set(env.store.list("blobs/")) == before
    dry = gc(env.store, grace=dt.timedelta(0), dry_run=True)
    assert len(dry.deleted) == 4 and set(env.store.list("blobs/")) == before
    done = gc(env.store, grace=dt.timedelta(0))
    assert sorted(done.deleted) == sorted(dry.deleted) and done.freed_bytes > 64 << 10
    assert len(env.store.list("blobs/")) == len(before) - 4
    env.pull(target="cpu")
    assert same_tree(other, env.tmp / "out")
    # Pushing the old artifact again re-uploads the collected blobs.
    push(env.store, "tiny:1.1", env.art, "cpu", keys["signer"])
    env.pull(ref="tiny:1.1", target="cpu", out="o2")
    assert same_tree(env.art, env.tmp / "o2")


def test_push_refuses_an_artifact_changed_after_signing(env, keys, tmp_path):
    """A model.sig that travels with the artifact must still describe it: devices that check it with
    model_signing would refuse what the push publishes. Another signer's key is fine (the digests are
    what is checked); ignored paths stay ignored; nothing is published on refusal."""
    art = make_artifact(tmp_path / "signed-art")
    (art / "notes.txt").write_text("not signed")
    signing.sign(art, keys["other_signer"], ignore_paths=["notes.txt"])
    push(env.store, "m:1", art, "cpu-x86_64", keys["signer"])  # signed by another key, unchanged: accepted

    (art / "model.gguf").write_bytes(b"retrained")
    with pytest.raises(RegistryError, match=r"model.gguf: digest mismatch.*re-run `slmpkg sign`"):
        push(env.store, "m:2", art, "cpu-x86_64", keys["signer"])
    signing.sign(art, keys["signer"], ignore_paths=["notes.txt"])
    (art / "extra.bin").write_bytes(b"x")
    with pytest.raises(RegistryError, match="extra.bin: file added"):
        push(env.store, "m:2", art, "cpu-x86_64", keys["signer"])
    assert list(ls(env.store, "m")["versions"]) == ["1"]


def test_pull_reports_progress_of_every_downloaded_byte(env, keys, tmp_path):
    art = make_artifact(tmp_path / "progress-art", size=3 << 20)
    push(env.store, "p:1", art, "cpu-x86_64", keys["signer"])
    moved = []
    lock = threading.Lock()

    def progress(n):
        with lock:
            moved.append(n)

    result = pull(env.store, "p:1", "cpu-x86_64", tmp_path / "out", keys["verifier"], cache_dir=tmp_path / "cache",
                  progress=progress)
    assert sum(moved) == result.downloaded_bytes > 3 << 20


# ---- gc against concurrent pushes and unreadable metadata ------------------------------------------


def age(store, keys, seconds=7200):
    """Make blobs look written ``seconds`` ago."""
    import time

    for k in keys:
        t = time.time() - seconds
        os.utime(store._path(k), (t, t))


def test_gc_fails_closed_on_unreadable_index_or_manifest(env, keys):
    """An index or manifest gc cannot read references blobs it cannot know: gc deletes nothing."""
    r = push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    push(env.store, "tiny:2.0", make_artifact(env.tmp / "b", seed=1), "cpu", keys["signer"])
    orphan = env.store.put_if_absent(blob_key("sha256:" + sha256_hex(b"orphan")), b"orphan")
    assert orphan
    blobs = set(env.store.list("blobs/"))
    ikey = "indexes/tiny/1.0.json"
    good_index = env.store.get(ikey)
    mkey = blob_key(r.manifest_digest)
    good_manifest = env.store.get(mkey)

    def unchanged_after_gc(match):
        with pytest.raises(RegistryError, match=match):
            gc(env.store, grace=dt.timedelta(0))
        assert set(env.store.list("blobs/")) >= blobs - {mkey}

    env.store.put(ikey, good_index[: len(good_index) // 2])  # torn or bit-rotten
    unchanged_after_gc(r"indexes/tiny/1.0.json: malformed signed document.*gc deleted nothing")
    env.store.put(ikey, good_index)
    env.store.delete(mkey)
    unchanged_after_gc(r"indexes/tiny/1.0.json \(target cpu\): its manifest sha256:\w+ is missing")
    env.store.put(mkey, good_manifest.replace(b"model.gguf", b"model.GGUF"))
    unchanged_after_gc(r"manifest does not match its digest")
    # Readable again: only the orphan goes.
    env.store.put(mkey, good_manifest)
    done = gc(env.store, grace=dt.timedelta(0))
    assert done.deleted == (blob_key("sha256:" + sha256_hex(b"orphan")),)
    env.pull(target="cpu")
    assert same_tree(env.art, env.tmp / "out")


def test_gc_keeps_a_blob_a_push_touches_between_gc_looking_and_deleting(env, keys):
    """The race gc has with a push reusing an old unreferenced blob: gc reads the blob's age, the push
    touches it (then writes an index referencing it), gc deletes. The age is re-checked when deleting."""
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    push(env.store, "tiny:1.0", make_artifact(env.tmp / "b", seed=1), "cpu", keys["signer"], force=True)
    orphans = sorted(gc(env.store, grace=dt.timedelta(0), dry_run=True).deleted)
    assert len(orphans) == 4
    age(env.store, orphans)
    victim = orphans[0]

    class Racing(LocalStore):
        def mtime(self, key):
            t = super().mtime(key)
            if key == victim:
                LocalStore(self.root).touch(key)  # a push reusing it, right after gc looked
            return t

    done = gc(Racing(env.store.root), grace=dt.timedelta(hours=1))
    assert sorted(done.deleted) == orphans[1:] and done.kept_young == (victim,)
    assert env.store.exists(victim)


def test_push_uploads_again_a_blob_gc_deleted_under_it(env, keys):
    """A reused blob deleted by gc between the push's existence check and its touch, or right after
    the touch (before the index lands): the push uploads it again, and the release pulls."""
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    big = blob_key("sha256:" + hash_file(env.art / "model.gguf"))

    class GcBeforeTouch(LocalStore):
        def touch(self, key):
            if key == big:
                self.delete(key)
            return super().touch(key)

    r = push(GcBeforeTouch(env.store.root), "tiny:2.0", env.art, "cpu", keys["signer"])
    assert r.uploaded_bytes == 64 << 10 and env.store.exists(big)

    class GcAfterTouch(LocalStore):
        def compare_and_swap(self, key, etag, data):
            self.delete(big)  # gc looked before the touch, deletes after it
            return super().compare_and_swap(key, etag, data)

    push(GcAfterTouch(env.store.root), "tiny:3.0", env.art, "cpu", keys["signer"])
    assert env.store.exists(big)
    env.pull(ref="tiny:3.0", target="cpu")
    assert same_tree(env.art, env.tmp / "out")


# ---- names: a version never shadows a tag ------------------------------------------------------------


def test_a_version_may_not_shadow_a_tag_nor_a_tag_a_version(env, keys):
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"], tags=["stable"])
    with pytest.raises(RegistryError, match="tiny:stable: is a tag, not a version"):
        push(env.store, "tiny:stable", env.art, "cpu", keys["signer"])
    with pytest.raises(RegistryError, match="tiny:1.0: is a version, not a tag"):
        tag(env.store, "tiny:1.0", "1.0", keys["signer"])
    assert env.store.list("indexes/") == ["indexes/tiny/1.0.json"]

    # A tag created while a push of that name uploads its blobs: the index is still not written.
    class TagMeanwhile(LocalStore):
        def put_file(self, key, path, **kw):
            if not self.exists("tags/tiny/2.0.json"):
                tag(LocalStore(self.root), "tiny:2.0", "1.0", keys["signer"])
            return super().put_file(key, path, **kw)

    with pytest.raises(RegistryError, match="tiny:2.0: is a tag, not a version"):
        push(TagMeanwhile(env.store.root), "tiny:2.0", make_artifact(env.tmp / "b", seed=1), "cpu", keys["signer"])
    assert env.store.list("indexes/") == ["indexes/tiny/1.0.json"]

    # A registry that holds both anyway (older slmpkg, a hand edit): a pull refuses to guess.
    push(env.store, "tiny:3.0", env.art, "cpu", keys["signer"])
    pred = {"name": "tiny", "tag": "3.0", "release": "1.0", "version": 1, "expires": "2999-01-01T00:00:00Z"}
    env.store.put("tags/tiny/3.0.json", sign_doc(keys["signer"], TAG_PREDICATE, "tiny:3.0", pred))
    with pytest.raises(RegistryError, match="tiny:3.0: is both a version and a tag"):
        env.pull(ref="tiny:3.0", target="cpu")


# ---- pull --target auto: chosen from the index the pull installs ------------------------------------


def test_pull_chooses_from_the_release_it_installs(env, keys):
    big = make_artifact(env.tmp / "big", seed=1, size=1 << 20)
    push(env.store, "tiny:1.0", env.art, "cpu-x86_64", keys["signer"])
    push(env.store, "tiny:1.0", big, "cpu-x86_64-avx2", keys["signer"])
    seen = []

    def smallest(sizes):
        seen.append(dict(sizes))
        return min(sizes, key=sizes.get)

    got = env.pull(target=smallest)
    assert got.target == "cpu-x86_64" and same_tree(env.art, env.tmp / "out")
    payload = sum(p.stat().st_size for p in env.art.rglob("*") if p.is_file())
    sig = {t: next(f["size"] for f in m["files"] if f["path"] == "model.sig")
           for t, m in ls(env.store, "tiny:1.0")["manifests"].items()}
    assert seen == [{"cpu-x86_64": payload + sig["cpu-x86_64"],
                     "cpu-x86_64-avx2": payload - (64 << 10) + (1 << 20) + sig["cpu-x86_64-avx2"]}]
    with pytest.raises(RegistryError, match="chooser picked 'cuda-sm80', which is not published"):
        env.pull(target=lambda sizes: "cuda-sm80", out="o2")


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86-64 target ladder")
def test_cli_pull_auto_reads_the_tag_once(env, keys, tmp_path, monkeypatch):
    """`slmpkg pull NAME:TAG --target auto` while the tag moves to a release with other targets: the
    target is chosen from the release the pull installs, never from one read a moment earlier."""
    from click.testing import CliRunner

    import slmpkg.registry
    from slmpkg import cli

    monkeypatch.setenv("SLMPKG_HOME", str(tmp_path / "home"))
    push(env.store, "tiny:1.0", env.art, "cpu-x86_64", keys["signer"], tags=["stable"])
    push(env.store, "tiny:2.0", make_artifact(env.tmp / "b", seed=2), "cuda-sm90", keys["signer"])

    class TagMovesAfterRead(LocalStore):
        def get(self, key):
            data = super().get(key)
            if key == "tags/tiny/stable.json" and b"2.0" not in data:
                tag(LocalStore(self.root), "tiny:stable", "2.0", keys["signer"])
            return data

    monkeypatch.setattr(slmpkg.registry, "open_store", lambda *a, **kw: TagMovesAfterRead(env.store.root))
    r = CliRunner().invoke(cli.main, ["pull", "tiny:stable", "-o", str(tmp_path / "auto"), "--pub",
                                      str(keys["public_key"]), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert (got["release"], got["target"]) == ("1.0", "cpu-x86_64")
    assert same_tree(env.art, tmp_path / "auto")


# ---- refreshing expiry -------------------------------------------------------------------------------


def test_refresh_extends_expiry_and_nothing_else(env, keys, tmp_path):
    from click.testing import CliRunner

    from slmpkg import cli
    from slmpkg.registry import refresh

    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"], tags=["stable"], expires_in=dt.timedelta(days=1))
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    with pytest.raises(ExpiredError):
        env.pull(ref="tiny:stable", target="cpu", now=later)
    before = ls(env.store, "tiny:1.0", verifier=keys["verifier"])
    with pytest.raises(TrustError, match="signed by a different key"):
        refresh(env.store, "tiny", keys["other_signer"])

    done = refresh(env.store, "tiny", keys["signer"], expires_in=dt.timedelta(days=30))
    assert [(r.what, r.version) for r in done] == [("index tiny:1.0", 2), ("tag tiny:stable", 2)]
    after = ls(env.store, "tiny:1.0", verifier=keys["verifier"])
    assert after["targets"] == before["targets"] and after["version"] == 2 and after["expires"] == done[0].expires
    got = env.pull(ref="tiny:stable", target="cpu", now=later)  # the same client: versions went up
    assert got.index_version == 2 and same_tree(env.art, env.tmp / "out")
    with pytest.raises(NotFoundError, match="tiny:9: no such version or tag"):
        refresh(env.store, "tiny:9", keys["signer"])

    r = CliRunner().invoke(cli.main, ["refresh", "tiny:stable", "--key", str(keys["private_key"]), "--expires-in", "0.5",
                                      "--registry", str(env.store.root)])
    assert r.exit_code == 0, r.output
    (one,) = json.loads(r.output)
    assert one["what"] == "tag tiny:stable" and one["version"] == 3
    assert ls(env.store, "tiny", verifier=keys["verifier"])["versions"]["1.0"]["version"] == 2


# ---- durability and the local cache's temporary files -----------------------------------------------


def test_every_rename_into_a_directory_is_followed_by_a_sync_of_that_directory(env, keys, monkeypatch):
    """A rename or link survives a power cut only once its directory is synced: the registry (blobs,
    manifest, index), the cache, the pulled directory and the client's trust state all do it."""
    import stat as st_

    events = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        s = os.fstat(fd)
        if st_.S_ISDIR(s.st_mode):
            events.append(("sync", (s.st_dev, s.st_ino)))
        return real_fsync(fd)

    def moved(dst):
        s = os.stat(os.path.dirname(os.path.abspath(dst)))
        events.append(("move", (s.st_dev, s.st_ino), str(dst)))

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        moved(dst)

    def link(src, dst, **kw):
        real_link(src, dst, **kw)
        moved(dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    env.pull(target="cpu")
    moves = [e for e in events if e[0] == "move"]
    where = {e[2].split("/")[-1] if "/out/" not in e[2] else "out/*" for e in moves}
    assert any(e[2].endswith("indexes/tiny/1.0.json") for e in moves) and any("/cache/blobs/" in e[2] for e in moves)
    assert any(e[2] == str(env.tmp / "out") for e in moves) and any(e[2] == str(env.state) for e in moves)
    for i, e in enumerate(events):
        if e[0] != "move" or "/.out.pull-" in e[2]:
            continue  # links into the staging directory are synced before it is renamed (checked below)
        assert ("sync", e[1]) in events[i + 1:], f"{e[2]}: its directory was not synced after the rename ({where})"
    staged = [i for i, e in enumerate(events) if e[0] == "move" and "/.out.pull-" in e[2]]
    installed = next(i for i, e in enumerate(events) if e[0] == "move" and e[2] == str(env.tmp / "out"))
    assert staged and all(any(x == ("sync", events[i][1]) for x in events[i + 1: installed]) for i in staged)


def test_partial_downloads_have_unpredictable_names_in_a_private_directory(env, keys, tmp_path):
    """A file planted at a predictable name (a symlink to something of the user's) is never written
    through: partial downloads get mkstemp names in a 0700 directory."""
    import stat as st_

    art = make_artifact(tmp_path / "big", size=3 << 20)
    push(env.store, "big:1", art, "cpu", keys["signer"])
    hexd = hash_file(art / "model.gguf")
    (env.cache / "tmp").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (f"{hexd}.partial", f"{hexd}.partial.ranges"):
        os.symlink(victim, env.cache / "tmp" / name)
    env.store.range_size = 1 << 20  # three ranges; stop after the first
    seen = []

    def stop_after_one(n):
        seen.append(n)
        if sum(seen) >= 1 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        env.pull(ref="big:1", target="cpu", progress=stop_after_one, max_workers=1)
    assert victim.read_text() == "precious"
    kept = [p.name for p in (env.cache / "tmp").glob(f"{hexd}.*.partial")]
    assert len(kept) == 1 and kept[0] != f"{hexd}.partial"
    got = env.pull(ref="big:1", target="cpu")
    assert got.resumed_bytes >= 1 << 20 and got.resumed_bytes + got.downloaded_bytes == 3 << 20  # resumed from it
    assert same_tree(art, env.tmp / "out") and victim.read_text() == "precious"
    assert st_.S_IMODE(os.stat(env.cache / "tmp").st_mode) == 0o700


def test_stale_partials_are_pruned_unless_a_pull_holds_them(env, keys, tmp_path):
    import time

    from slmpkg.registry.cache import file_lock, prune_partials

    tmpdir = env.cache / "tmp"
    tmpdir.mkdir(parents=True)
    old = time.time() - 8 * 86400
    for hexd in ("aa" * 32, "bb" * 32, "cc" * 32):
        for name in (f"{hexd}.x1.partial", f"{hexd}.x1.partial.ranges"):
            (tmpdir / name).write_bytes(b"x")
            if hexd != "cc" * 32:  # cc: recent activity, kept
                os.utime(tmpdir / name, (old, old))
    (tmpdir / f"{'dd' * 32}.lock").touch()
    os.utime(tmpdir / f"{'dd' * 32}.lock", (old, old))  # a lock left by a pull killed before its first range
    with file_lock(tmpdir / f"{'bb' * 32}.lock"):  # bb: a pull is working on it
        assert prune_partials(env.cache) == 1
    assert sorted(p.name for p in tmpdir.iterdir()) == sorted(
        [f"{'bb' * 32}.x1.partial", f"{'bb' * 32}.x1.partial.ranges", f"{'bb' * 32}.lock",
         f"{'cc' * 32}.x1.partial", f"{'cc' * 32}.x1.partial.ranges"])
    # Every pull prunes on its way in.
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    env.pull(target="cpu")
    assert sorted(p.name for p in tmpdir.iterdir()) == sorted(
        [f"{'cc' * 32}.x1.partial", f"{'cc' * 32}.x1.partial.ranges"])


def test_a_lock_file_removed_by_its_holder_is_not_shared_by_two_waiters(tmp_path):
    """The holder of a blob's lock removes the lock file when done. A pull that opened the old file
    and one that creates a new file must still take turns: after locking, the path is re-checked."""
    import threading
    import time

    from slmpkg.registry import cache

    lock = tmp_path / "x.lock"
    inside, overlaps = [], []
    guard = threading.Lock()
    opened = threading.Event()
    real_open = os.open

    def holding(name):
        with guard:
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
        time.sleep(0.2)
        with guard:
            inside.remove(name)

    def second():  # opens the old lock file, then waits on it
        def spy(path, *a, **kw):
            fd = real_open(path, *a, **kw)
            opened.set()
            return fd

        cache.os.open = spy
        try:
            with cache.file_lock(lock):
                holding("second")
        finally:
            cache.os.open = real_open

    with cache.file_lock(lock):
        t2 = threading.Thread(target=second)
        t2.start()
        assert opened.wait(5)
        time.sleep(0.1)
        lock.unlink()  # done with it, as fetch_blob does

        def third():
            with cache.file_lock(lock):  # a new lock file at the same path
                holding("third")

        t3 = threading.Thread(target=third)
        t3.start()
        time.sleep(0.05)
    t2.join(5), t3.join(5)
    assert overlaps == []


# ---- SIGTERM: the commands stop cleanly ----------------------------------------------------------------

# The real `slmpkg` command in a child that stops itself (SIGSTOP) once PAUSE_AFTER bytes went through
# the named method (ProgressBar.advance, or LocalStore.read_range_into with 1 MiB ranges), so the test can
# send a signal at that exact point and let it go on; from then on every call of it holds its thread a
# moment first, so the main thread handles the signal before the workers could do much more (else a race).
SIGNAL_CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from slmpkg import _progress
from slmpkg.registry import local
local.LocalStore.range_size = 1 << 20
where, pause_after = sys.argv[1], int(sys.argv[2])
owner = _progress.ProgressBar if where == "advance" else local.LocalStore
method = "advance" if where == "advance" else "read_range_into"
orig, seen, continued = getattr(owner, method), [0], []
def paused(self, *a, **kw):
    if continued:
        time.sleep(0.5)
    r = orig(self, *a, **kw)
    n = a[0] if where == "advance" else len(a[-1])
    before = seen[0]
    seen[0] += n
    if before < pause_after <= seen[0]:
        os.kill(os.getpid(), signal.SIGSTOP)
        continued.append(True)
        time.sleep(0.5)
    return r
setattr(owner, method, paused)
from slmpkg.cli import main
sys.argv = ["slmpkg"] + sys.argv[3:]
main()
"""


def signalled(tmp_path, where, pause_after, sig, *args):
    """Run ``slmpkg ARGS`` until ``pause_after`` bytes went through ``where`` (see SIGNAL_CHILD), send
    it ``sig``, let it go on; return its exit code, stdout and stderr."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "SLMPKG_HOME": str(tmp_path / "home")}
    out, err = open(tmp_path / "stdout", "w+b"), open(tmp_path / "stderr", "w+b")
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD, where, str(pause_after), *map(str, args)], env=env,
                            stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        err.seek(0)
        pytest.fail(f"the command ended before the pause point: {err.read().decode()}")
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    rc = proc.wait()
    out.seek(0), err.seek(0)
    return rc, out.read().decode(), err.read().decode()


def test_sigterm_mid_push_and_mid_pull_leaves_nothing_behind(keys, tmp_path, monkeypatch):
    """SIGTERM unwinds like Ctrl-C: exit 143, one line, no temporary file in the registry, no staging
    directory beside the output; what a pull fetched stays (as its resumable partial) and the next pull
    resumes from it."""
    import signal

    reg = tmp_path / "reg"
    art = make_artifact(tmp_path / "art", size=(3 << 20) + 17)
    (art / "model.gguf").rename(art / "model.bin")  # not a GGUF: the CLI would inspect one
    push_args = ("push", "m:1", art, "--target", "cpu-x86_64", "--key", keys["private_key"], "--registry", reg, "--json")
    rc, out, err = signalled(tmp_path, "advance", 1 << 20, signal.SIGTERM, *push_args)
    assert (rc, out, err) == (143, "", "slmpkg: error: terminated\n")
    assert list((reg / ".tmp").iterdir()) == [] and not (reg / "indexes").exists()

    push(LocalStore(reg), "m:1", art, "cpu-x86_64", keys["signer"])
    out_dir = tmp_path / "models" / "m"
    out_dir.parent.mkdir()
    pull_args = ("pull", "m:1", "--target", "cpu-x86_64", "-o", out_dir, "--pub", keys["public_key"],
                 "--registry", reg, "--json")
    rc, out, err = signalled(tmp_path, "range", 1 << 20, signal.SIGTERM, *pull_args)
    assert (rc, out, err) == (143, "", "slmpkg: error: terminated\n")
    assert not out_dir.exists() and list(out_dir.parent.iterdir()) == []
    kept = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "home" / "cache" / "tmp").iterdir())
    assert len(kept) == 2 and kept[0].endswith(".partial") and kept[1] == kept[0] + ".ranges"  # no lock file

    from click.testing import CliRunner

    from slmpkg.cli import main

    monkeypatch.setenv("SLMPKG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(LocalStore, "range_size", 1 << 20)  # as in the child: the ledger is kept per range size
    r = CliRunner().invoke(main, [str(a) for a in pull_args])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["resumed_bytes"] >= 1 << 20 and same_tree(art, out_dir)
    assert list((tmp_path / "home" / "cache" / "tmp").iterdir()) == []


@pytest.mark.parametrize("when", ["staging", "between the renames"])
def test_interrupted_install_leaves_the_old_directory_and_no_staging(env, keys, monkeypatch, when):
    """Stopped while the pulled directory is assembled or swapped in (overwrite): the previous contents
    stay, and no staging or backup directory is left beside it."""
    push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"])
    out = env.tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_link, real_replace = os.link, os.replace

    def link(src, dst, **kw):
        if when == "staging" and "/.out.pull-" in str(dst) and os.listdir(os.path.dirname(dst)):
            raise KeyboardInterrupt  # SIGTERM or Ctrl-C arriving here
        return real_link(src, dst, **kw)

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        if when == "between the renames" and str(src) == str(out):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        env.pull(target="cpu", overwrite=True)
    assert sorted(os.listdir(env.tmp)) == sorted(["art", "cache", "out", "reg", "trust.json", "trust.json.lock"])
    assert os.listdir(out) == ["old.txt"]


def test_push_adds_a_signature_only_where_none_travels(env, keys, tmp_path):
    """The model.sig push adds is left out on request, never replaces the artifact's own, and the name
    is reserved: a directory called model.sig, or a lone signature file, is not pushed."""
    r = push(env.store, "tiny:1.0", env.art, "cpu", keys["signer"], sign_artifact=False)
    assert "model.sig" not in r.files
    signing.sign(env.art, keys["other_signer"])  # signed by someone else: it travels as it is
    own = (env.art / "model.sig").read_bytes()
    r = push(env.store, "tiny:2.0", env.art, "cpu", keys["signer"])
    env.pull(ref="tiny:2.0", target="cpu")
    assert "model.sig" in r.files and (env.tmp / "out" / "model.sig").read_bytes() == own
    odd = make_artifact(tmp_path / "odd")
    (odd / "model.sig").mkdir()
    (odd / "model.sig" / "x").write_text("x")
    with pytest.raises(RegistryError, match="model.sig: not a signature file"):
        push(env.store, "tiny:3.0", odd, "cpu", keys["signer"])
    with pytest.raises(RegistryError, match="a signature file is not an artifact"):
        push(env.store, "tiny:3.0", env.art / "model.sig", "cpu", keys["signer"])
