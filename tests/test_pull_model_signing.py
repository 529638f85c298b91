"""A pulled artifact still verifies with the real OpenSSF ``model_signing`` CLI.

The release engineer signs the artifact directory (``slmpkg sign`` writes the model-signing bundle to
``DIR/model.sig``), pushes it, and a device pulls it: the bundle travels as one more file of the
artifact, so the pulled directory carries it. Here ``slmpkg`` and ``model_signing`` both run as the
programs users run (console scripts in subprocesses), against:

- the local registry (a directory);
- the Hub test server (tests/hub_server.py), once with ``HF_HUB_DISABLE_XET=1`` (LFS) and once on the
  default Xet path (hf_xet with a ``local://`` CAS); the requests show which path the bytes took.

``model_signing verify key PULLED --signature PULLED/model.sig --public_key PUB`` must accept the pulled
directory, and reject it once one byte of a pulled file is flipped (and, on the local registry, once a
file is added). model_signing leaves the signature file itself out of the hashed set.

An artifact pushed without a model.sig (a directory, or a single file) gets one from ``push --key``,
made from the files published: the pulled copy verifies the same way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmpkg import signing

TOKEN = "hf_test_" + "m0d3l" * 5
REF = "tiny:1.0"
TARGET = "cpu-x86_64"


def _model_signing_cmd() -> list[str]:
    try:
        import model_signing  # noqa: F401
        import OpenSSL  # noqa: F401  (model_signing 1.1.1 imports it even for key verification)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"model_signing peer missing ({e}); `pip install -e '.[dev]'` installs it")
        pytest.skip(f"model_signing is not installed ({e})")
    exe = shutil.which("model_signing")
    return [exe] if exe else [sys.executable, "-m", "model_signing"]


def _slmpkg_cmd() -> list[str]:
    exe = shutil.which("slmpkg")
    return [exe] if exe else [sys.executable, "-c", "from slmpkg.cli import main; main()"]


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)


def model_signing_verify(pulled: Path, pub: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run([*_model_signing_cmd(), "verify", "key", str(pulled), "--signature", str(pulled / "model.sig"),
                "--public_key", str(pub)], env)


def flip_byte(path: Path, offset: int) -> None:
    # In place (r+b): pulled files may be hard links into the cache, and a real tamperer edits in place too.
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    """A signed artifact directory (model.sig inside) and the key pair."""
    d = tmp_path_factory.mktemp("release")
    priv, pub = signing.generate_keypair(d / "release")
    art = d / "artifact"
    (art / "tokenizer").mkdir(parents=True)
    rnd = random.Random(7)
    # Above the Hub server's 1 MiB LFS threshold: the big file goes through LFS or Xet.
    (art / "weights.bin").write_bytes(rnd.randbytes((3 << 19) + 11))
    (art / "config.json").write_text(json.dumps({"arch": "llama", "n_layer": 2}))
    (art / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab": {"a": 0, "b": 1}}))
    env = {**os.environ}
    r = run([*_slmpkg_cmd(), "sign", str(art), "--key", str(priv)], env)
    assert r.returncode == 0, r.stderr
    assert (art / "model.sig").is_file()
    return {"priv": priv, "pub": pub, "art": art}


@pytest.fixture(params=["local", "hub-lfs", "hub-xet"])
def registry(request, tmp_path):
    """``(registry URL, env for the subprocesses, hub server or None)``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SLMPKG_"))}
    env["SLMPKG_HOME"] = str(tmp_path / "home")  # cache and trust state of this "device"
    if request.param == "local":
        yield str(tmp_path / "registry"), env, None
        return
    hub_server = pytest.importorskip("hub_server")
    pytest.importorskip("huggingface_hub")
    if request.param == "hub-xet":
        pytest.importorskip("hf_xet")
    # HF_XET_CACHE: hf_xet's logs and caches stay in tmp_path, not ~/.cache
    env.update(HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf-home"), HF_XET_CACHE=str(tmp_path / "xet-cache"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if request.param == "hub-lfs":
        env["HF_HUB_DISABLE_XET"] = "1"
    with hub_server.HubServer(token=TOKEN, xet_dir=tmp_path / "cas") as hub:
        env["HF_ENDPOINT"] = hub.endpoint
        hub.mode = request.param.removeprefix("hub-")
        yield "hf://org/models", env, hub


def test_pulled_artifact_verifies_with_model_signing(release, registry, tmp_path):
    url, env, hub = registry
    slmpkg = _slmpkg_cmd()
    r = run([*slmpkg, "push", REF, str(release["art"]), "--target", TARGET, "--key", str(release["priv"]),
             "--registry", url, "--json"], env)
    assert r.returncode == 0, r.stderr
    pulled = tmp_path / "pulled"
    r = run([*slmpkg, "pull", REF, "--target", TARGET, "-o", str(pulled), "--pub", str(release["pub"]),
             "--registry", url, "--json"], env)
    assert r.returncode == 0, r.stderr

    # The bundle travelled with the artifact, byte for byte, and so did every signed file.
    names = sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file())
    assert names == ["config.json", "model.sig", "tokenizer/tokenizer.json", "weights.bin"]
    assert all((pulled / n).read_bytes() == (release["art"] / n).read_bytes() for n in names)
    if hub is not None:
        paths = [p for _, p in hub.requests]
        used_xet = any("/xet-write-token/" in p for p in paths) and any("/xet-read-token/" in p for p in paths)
        used_lfs = any(p.endswith("/info/lfs/objects/batch") for p in paths)
        assert (used_xet, used_lfs) == ((True, False) if hub.mode == "xet" else (False, True))

    r = model_signing_verify(pulled, release["pub"], env)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr

    flip_byte(pulled / "weights.bin", 1 << 20)
    r = model_signing_verify(pulled, release["pub"], env)
    assert r.returncode != 0 and "Hash mismatch for" in r.stderr and "weights.bin" in r.stderr, r.stdout + r.stderr


def test_pulled_artifact_with_an_added_file_is_rejected(release, tmp_path):
    """The other tampering model_signing catches on a pulled directory; the local registry suffices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMPKG_")}
    env["SLMPKG_HOME"] = str(tmp_path / "home")
    slmpkg, url, pulled = _slmpkg_cmd(), str(tmp_path / "registry"), tmp_path / "pulled"
    r = run([*slmpkg, "push", REF, str(release["art"]), "--target", TARGET, "--key", str(release["priv"]),
             "--registry", url], env)
    assert r.returncode == 0, r.stderr
    r = run([*slmpkg, "pull", REF, "--target", TARGET, "-o", str(pulled), "--pub", str(release["pub"]),
             "--registry", url], env)
    assert r.returncode == 0, r.stderr
    (pulled / "tokenizer" / "extra.json").write_text("{}")
    r = model_signing_verify(pulled, release["pub"], env)
    assert r.returncode != 0 and "Extra files found" in r.stderr and "tokenizer/extra.json" in r.stderr, r.stderr


def _push_pull(slmpkg, url, env, ref, artifact, priv, pub, pulled):
    r = run([*slmpkg, "push", ref, str(artifact), "--target", TARGET, "--key", str(priv), "--registry", url,
             "--json"], env)
    assert r.returncode == 0, r.stderr
    pushed = json.loads(r.stdout)
    r = run([*slmpkg, "pull", ref, "--target", TARGET, "-o", str(pulled), "--pub", str(pub), "--registry", url,
             "--json"], env)
    assert r.returncode == 0, r.stderr
    return pushed


def test_push_signs_an_unsigned_artifact(release, registry, tmp_path):
    """`push --key` of a directory without model.sig publishes one made from the files it publishes (and
    writes nothing into the directory): the pulled copy verifies with model_signing, a tampered one does
    not. Pushing the same files again is a no-op (the signature is deterministic); changed files pushed
    as a new version get a new signature, never a stale one."""
    url, env, _ = registry
    slmpkg = _slmpkg_cmd()
    art = tmp_path / "unsigned"
    shutil.copytree(release["art"], art, ignore=shutil.ignore_patterns("model.sig"))
    before = sorted(p.relative_to(art).as_posix() for p in art.rglob("*"))
    pulled = tmp_path / "pulled"
    first = _push_pull(slmpkg, url, env, REF, art, release["priv"], release["pub"], pulled)
    assert sorted(p.relative_to(art).as_posix() for p in art.rglob("*")) == before  # the input is untouched
    assert sorted(first["files"]) == ["config.json", "model.sig", "tokenizer/tokenizer.json", "weights.bin"]
    r = model_signing_verify(pulled, release["pub"], env)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr

    again = json.loads(run([*slmpkg, "push", REF, str(art), "--target", TARGET, "--key", str(release["priv"]),
                            "--registry", url, "--json"], env).stdout)
    assert again["manifest_digest"] == first["manifest_digest"] and again["index_version"] == first["index_version"]
    assert again["uploaded_bytes"] == 0

    (art / "config.json").write_text(json.dumps({"arch": "llama", "n_layer": 3}))
    pulled2 = tmp_path / "pulled2"
    _push_pull(slmpkg, url, env, "tiny:1.1", art, release["priv"], release["pub"], pulled2)
    r = model_signing_verify(pulled2, release["pub"], env)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr
    assert (pulled2 / "model.sig").read_bytes() != (pulled / "model.sig").read_bytes()

    flip_byte(pulled2 / "weights.bin", 7)
    r = model_signing_verify(pulled2, release["pub"], env)
    assert r.returncode != 0 and "Hash mismatch for" in r.stderr and "weights.bin" in r.stderr, r.stdout + r.stderr


def test_push_signs_a_single_file_artifact(release, tmp_path):
    """A single-file artifact is installed as DIR/FILE: the signature push adds names it as model_signing
    sees that directory (not as the lone file "." a signature of the file itself would)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMPKG_")}
    env["SLMPKG_HOME"] = str(tmp_path / "home")
    pulled = tmp_path / "pulled"
    pushed = _push_pull(_slmpkg_cmd(), str(tmp_path / "registry"), env, REF, release["art"] / "weights.bin",
                        release["priv"], release["pub"], pulled)
    assert sorted(pushed["files"]) == ["model.sig", "weights.bin"]
    assert sorted(p.name for p in pulled.iterdir()) == ["model.sig", "weights.bin"]
    r = model_signing_verify(pulled, release["pub"], env)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr
    (pulled / "extra.bin").write_bytes(b"x")
    r = model_signing_verify(pulled, release["pub"], env)
    assert r.returncode != 0 and "extra.bin" in r.stderr
