"""slmpkg.signing against the real peer: OpenSSF model_signing 1.1.1 (its CLI, in a subprocess).

Each `model_signing` process spends ~1.5 s importing sigstore, so most checks go through one
long-lived subprocess that runs model_signing's own click entry point (`model_signing._cli:main`, the
console script's target) once per command; `test_console_script_accepts_directory` runs the installed
`model_signing` executable itself to show the two are the same program.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from slmpkg import signing
from slmpkg.errors import SlmpkgError
from slmpkg.signing import SignatureError

BIG = "weights/model.safetensors"
BIG_SIZE = 12 * 1024 * 1024 + 12345  # many read buffers, and not a multiple of one


def _require_model_signing() -> None:
    try:
        import model_signing  # noqa: F401
        import OpenSSL  # noqa: F401  (model_signing 1.1.1 imports it for certificate verification)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"model_signing peer missing ({e}); `pip install -e '.[dev]'` installs it")
        pytest.skip(f"model_signing is not installed ({e})")


_DRIVER = r"""
import contextlib, io, json, sys
from model_signing._cli import main
for line in sys.stdin:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main.main(args=json.loads(line), prog_name="model_signing", standalone_mode=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.__stdout__.write(json.dumps({"code": code, "output": out.getvalue()}) + "\n")
    sys.__stdout__.flush()
"""


class ModelSigningCLI:
    """``model_signing ARGS...`` -> (exit code, stdout+stderr), in one persistent subprocess."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def __call__(self, *args: object) -> tuple[int, str]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps([str(a) for a in args]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "model_signing driver died"
        result = json.loads(line)
        return result["code"], result["output"]

    def verify(self, model: Path, sig: Path, pub: Path) -> tuple[int, str]:
        return self("verify", "key", model, "--signature", sig, "--public_key", pub)

    def sign(self, model: Path, sig: Path, priv: Path) -> tuple[int, str]:
        return self("sign", "key", model, "--signature", sig, "--private_key", priv)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ms() -> ModelSigningCLI:
    _require_model_signing()
    cli = ModelSigningCLI()
    yield cli
    cli.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = signing.generate_keypair(d / "release")
    other_priv, other_pub = signing.generate_keypair(d / "other")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory: nested files, one multi-MB file, git files, and names whose order differs
    between string and path-component sorting (``a/b`` vs ``a-b/c``)."""
    d = tmp_path_factory.mktemp("pristine") / "tiny-llama"
    files = {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "tokenizer/special/added_tokens.txt": b"<|im_end|>\n",
        "a/b.txt": b"b",
        "a-b/c.txt": b"c",
        "empty.bin": b"",
        ".gitattributes": b"*.safetensors filter=lfs\n",
        ".git/HEAD": b"ref: refs/heads/main\n",
        BIG: os.urandom(BIG_SIZE),
    }
    for name, data in files.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (d / "empty-dir").mkdir()
    return d


@pytest.fixture
def model(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / pristine.name
    shutil.copytree(pristine, dst)
    return dst


@pytest.fixture
def single_file(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.Q4_K_M.gguf"
    p.write_bytes(b"GGUF" + os.urandom(3 * 1024 * 1024))
    return p


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _statement(sig: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"]))


# --- formats, checked field by field against what model_signing computes ---------------------------


def test_statement_and_bundle_format(model: Path, keys: dict[str, Path], ms: ModelSigningCLI) -> None:
    import model_signing
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    sig = signing.sign(model, keys["priv"])
    assert sig == model / "model.sig"
    bundle = json.loads(sig.read_text())
    assert list(bundle) == ["mediaType", "verificationMaterial", "dsseEnvelope"]
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"] == {
        "publicKey": {"hint": hashlib.sha256(keys["pub"].read_bytes()).hexdigest()},
        "tlogEntries": [],
    }
    env = bundle["dsseEnvelope"]
    assert env["payloadType"] == "application/vnd.in-toto+json"
    assert len(env["signatures"]) == 1 and env["signatures"][0]["keyid"] == ""

    payload = base64.b64decode(env["payload"])
    pub = serialization.load_pem_public_key(keys["pub"].read_bytes())
    pae = b"DSSEv1 28 application/vnd.in-toto+json %d " % len(payload) + payload
    pub.verify(base64.b64decode(env["signatures"][0]["sig"]), pae, ec.ECDSA(hashes.SHA256()))

    st = json.loads(payload)
    assert list(st) == ["_type", "subject", "predicateType", "predicate"]
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://model_signing/signature/v1.0"
    assert st["predicate"]["serialization"] == {
        "allow_symlinks": False,
        "hash_type": "sha256",
        "ignore_paths": [".git", ".gitattributes", ".github", ".gitignore", "model.sig"],
        "method": "files",
    }
    resources = st["predicate"]["resources"]
    assert all(list(r) == ["algorithm", "digest", "name"] and r["algorithm"] == "sha256" for r in resources)

    # model_signing's own hashing of the same directory: same names, digests, order and root digest.
    theirs = (
        model_signing.hashing.Config()
        .set_ignored_paths(paths=["model.sig"], ignore_git_paths=True)
        .hash(model)
    )
    expected = [(rd.identifier, rd.digest.digest_hex) for rd in theirs.resource_descriptors()]
    assert [(r["name"], r["digest"]) for r in resources] == expected
    assert [n for n, _ in expected].index("a/b.txt") < [n for n, _ in expected].index("a-b/c.txt")
    assert dict(expected)[BIG] == hashlib.sha256((model / BIG).read_bytes()).hexdigest()
    root = hashlib.sha256(b"".join(bytes.fromhex(d) for _, d in expected)).hexdigest()
    assert st["subject"] == [{"name": "tiny-llama", "digest": {"sha256": root}}]

    vm = signing.verify(model, keys["pub"])
    assert vm.root_digest == root and vm.signature_path == sig and vm.model_name == "tiny-llama"
    assert vm.digests == dict(expected)
    assert ms.verify(model, sig, keys["pub"]) == (0, "Verification succeeded\n")


def test_single_file_format(single_file: Path, keys: dict[str, Path], ms: ModelSigningCLI) -> None:
    sig = signing.sign(single_file, keys["priv"])
    assert sig == single_file.with_name(single_file.name + ".sig")
    st = _statement(sig)
    digest = hashlib.sha256(single_file.read_bytes()).hexdigest()
    # model_signing names the one resource of a single-file model "." (the file relative to itself).
    assert st["predicate"]["resources"] == [{"algorithm": "sha256", "digest": digest, "name": "."}]
    assert st["subject"] == [
        {"name": single_file.name, "digest": {"sha256": hashlib.sha256(bytes.fromhex(digest)).hexdigest()}}
    ]
    assert ms.verify(single_file, sig, keys["pub"]) == (0, "Verification succeeded\n")
    assert signing.verify(single_file, keys["pub"]).digests == {".": digest}


def test_console_script_accepts_directory(model: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    _require_model_signing()
    exe = shutil.which("model_signing")
    cmd = [exe] if exe else [sys.executable, "-m", "model_signing"]
    sig = signing.sign(model, keys["priv"], tmp_path / "outside.sig")
    r = subprocess.run(
        [*cmd, "verify", "key", str(model), "--signature", str(sig), "--public_key", str(keys["pub"])],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "Verification succeeded" in r.stdout
    _flip_byte(model / BIG, BIG_SIZE - 1)
    r = subprocess.run(
        [*cmd, "verify", "key", str(model), "--signature", str(sig), "--public_key", str(keys["pub"])],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode != 0 and "Hash mismatch for" in r.stderr and BIG in r.stderr


# --- tampering: both verifiers reject, ours names the file ------------------------------------------


def _change(model: Path) -> str:
    _flip_byte(model / BIG, 9 * 1024 * 1024 + 7)  # deep inside, many buffers in
    return BIG


def _add(model: Path) -> str:
    (model / "tokenizer" / "extra.json").write_text("{}")
    return "tokenizer/extra.json"


def _remove(model: Path) -> str:
    (model / "tokenizer" / "special" / "added_tokens.txt").unlink()
    return "tokenizer/special/added_tokens.txt"


@pytest.mark.parametrize(
    "tamper, ours, theirs",
    [
        (_change, "digest mismatch", "Hash mismatch for"),
        (_add, "file added", "Extra files found in model 'tiny-llama': {name}"),
        (_remove, "file removed", "Missing files in model 'tiny-llama': {name}"),
    ],
    ids=["byte-changed", "file-added", "file-removed"],
)
def test_tampered_directory_rejected(model, keys, ms, tamper, ours, theirs) -> None:
    sig = signing.sign(model, keys["priv"])
    name = tamper(model)
    code, out = ms.verify(model, sig, keys["pub"])
    assert code != 0 and theirs.format(name=name) in out and name in out, out
    with pytest.raises(SignatureError) as e:
        signing.verify(model, keys["pub"])
    msg = str(e.value)
    assert "\n" not in msg and f"{name}: {ours}" in msg and str(model) in msg and str(sig) in msg
    assert isinstance(e.value, SlmpkgError)


def test_tampered_single_file_rejected(single_file, keys, ms) -> None:
    sig = signing.sign(single_file, keys["priv"])
    _flip_byte(single_file, 1_000_000)
    code, out = ms.verify(single_file, sig, keys["pub"])
    assert code != 0 and "Hash mismatch for" in out
    with pytest.raises(SignatureError, match=r"\.: digest mismatch"):
        signing.verify(single_file, keys["pub"])


# --- interop the other way: model_signing signs, we verify -----------------------------------------


def test_we_verify_what_model_signing_signs(model, single_file, keys, ms, tmp_path) -> None:
    sig = model / "model.sig"
    assert ms.sign(model, sig, keys["priv"]) == (0, "Signing succeeded\n")
    vm = signing.verify(model, keys["pub"], sig)
    assert vm.root_digest == _statement(sig)["subject"][0]["digest"]["sha256"]
    assert BIG in vm.digests and ".gitattributes" not in vm.digests and "model.sig" not in vm.digests

    file_sig = tmp_path / "file.sig"
    assert ms.sign(single_file, file_sig, keys["priv"])[0] == 0
    assert signing.verify(single_file, keys["pub"], file_sig).digests.keys() == {"."}

    _add(model)
    with pytest.raises(SignatureError, match="tokenizer/extra.json: file added"):
        signing.verify(model, keys["pub"], sig)


# --- keys -------------------------------------------------------------------------------------------


def test_wrong_public_key_rejected(model, keys, ms) -> None:
    sig = signing.sign(model, keys["priv"])
    code, out = ms.verify(model, sig, keys["other_pub"])
    assert code != 0 and "Key mismatch" in out
    with pytest.raises(SignatureError, match="signed by a different key") as e:
        signing.verify(model, keys["other_pub"])
    assert str(sig) in str(e.value) and str(keys["other_pub"]) in str(e.value)

    # Without the key hint (older signers) the signature check itself must catch it.
    bundle = json.loads(sig.read_text())
    del bundle["verificationMaterial"]["publicKey"]["hint"]
    sig.write_text(json.dumps(bundle))
    code, out = ms.verify(model, sig, keys["other_pub"])
    assert code != 0
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify(model, keys["other_pub"])
    assert signing.verify(model, keys["pub"]).root_digest  # still fine with the right key


def test_generate_keypair(tmp_path: Path) -> None:
    priv, pub = signing.generate_keypair(tmp_path / "k" / "ci")
    assert (priv.name, pub.name) == ("ci.pem", "ci.pub.pem")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(SignatureError, match="refusing to overwrite"):
        signing.generate_keypair(tmp_path / "k" / "ci")
    assert not list((tmp_path / "k").glob(".*partial"))

    enc_priv, enc_pub = signing.generate_keypair(tmp_path / "enc", password=b"s3cret")
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    signing.sign(f, enc_priv, password=b"s3cret")
    signing.verify(f, enc_pub)
    with pytest.raises(SignatureError, match="enc.pem: not a usable PEM private key"):
        signing.sign(f, enc_priv)


def test_ed25519_key_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = tmp_path / "ed.pem"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(SignatureError, match=r"ed\.pem: Ed25519 keys are not supported"):
        signing.KeySigner(key)


# --- refusals and malformed input -------------------------------------------------------------------


def test_symlink_refused(model: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    link = model / "tokenizer" / "vocab.json"
    link.symlink_to(model / "config.json")
    with pytest.raises(SignatureError, match=r"tokenizer/vocab\.json: is a symlink") as e:
        signing.sign(model, keys["priv"])
    assert "\n" not in str(e.value)
    assert not (model / "model.sig").exists()
    link.unlink()

    root_link = tmp_path / "link-to-model"
    root_link.symlink_to(model)
    with pytest.raises(SignatureError, match="link-to-model: is a symlink"):
        signing.sign(root_link, keys["priv"], tmp_path / "x.sig")

    # model_signing's verifier refuses a symlink even under an ignored path, so we refuse it at signing.
    (model / ".git" / "link").symlink_to(model / "config.json")
    with pytest.raises(SignatureError, match=r"\.git/link: is a symlink \(under an ignored path"):
        signing.sign(model, keys["priv"])


def test_malformed_bundles(model: Path, keys: dict[str, Path], ms: ModelSigningCLI) -> None:
    sig = signing.sign(model, keys["priv"])
    good = json.loads(sig.read_text())

    def check(bundle_text: str, pattern: str) -> None:
        sig.write_text(bundle_text)
        with pytest.raises(SignatureError, match=pattern) as e:
            signing.verify(model, keys["pub"])
        assert str(e.value).startswith(str(sig)) and "\n" not in str(e.value)
        assert ms.verify(model, sig, keys["pub"])[0] != 0

    check("{not json", "malformed signature bundle: not JSON")
    check(json.dumps({**good, "mediaType": "application/json"}), "malformed signature bundle: mediaType")
    no_env = {k: v for k, v in good.items() if k != "dsseEnvelope"}
    check(json.dumps(no_env), "malformed signature bundle: dsseEnvelope is missing")

    # A payload edited to match the tampered file, signature kept: bad signature.
    st = json.loads(base64.b64decode(good["dsseEnvelope"]["payload"]))
    st["predicate"]["resources"][0]["digest"] = "00" * 32
    forged = json.loads(json.dumps(good))
    forged["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    check(json.dumps(forged), "bad signature")

    sig.unlink()
    with pytest.raises(SignatureError, match="no such signature file"):
        signing.verify(model, keys["pub"])


def test_statement_checks() -> None:
    m = signing.Manifest("m", (signing.Resource("x", "ab" * 32),))
    assert signing.Manifest.from_payload(m.payload()) == m
    st = m.statement()
    st["subject"][0]["digest"]["sha256"] = "00" * 32
    with pytest.raises(SignatureError, match="subject digest .* does not match"):
        signing.Manifest.from_payload(json.dumps(st).encode(), "s.sig")
    st = m.statement()
    st["predicate"]["resources"][0]["name"] = "../etc/passwd"
    st["subject"][0]["digest"]["sha256"] = m.root_digest
    with pytest.raises(SignatureError, match="not a relative POSIX path"):
        signing.Manifest.from_payload(json.dumps(st).encode(), "s.sig")
    st = m.statement()
    st["predicate"]["serialization"]["method"] = "shards"
    with pytest.raises(SignatureError, match="unsupported serialization"):
        signing.Manifest.from_payload(json.dumps(st).encode(), "s.sig")


# --- ignore paths, default locations, streaming -----------------------------------------------------


def test_ignore_paths_recorded_and_honoured(model, keys, ms, tmp_path) -> None:
    (model / "notes").mkdir()
    (model / "notes" / "todo.md").write_text("draft")
    (model / "README.md").write_text("readme")
    sig = signing.sign(model, keys["priv"], tmp_path / "m.sig", ignore_paths=["notes", model / "README.md"])
    st = _statement(sig)
    names = {r["name"] for r in st["predicate"]["resources"]}
    assert "README.md" not in names and "notes/todo.md" not in names
    assert {"notes", "README.md"} <= set(st["predicate"]["serialization"]["ignore_paths"])
    (model / "notes" / "todo.md").write_text("changed")
    (model / "README.md").write_text("changed")
    # Neither verifier is told about the ignored paths: the signature carries them.
    assert ms.verify(model, sig, keys["pub"])[0] == 0
    signing.verify(model, keys["pub"], sig)
    # A caller may ignore more when verifying (here: a file added after signing).
    (model / "local.cfg").write_text("x")
    with pytest.raises(SignatureError, match="local.cfg: file added"):
        signing.verify(model, keys["pub"], sig)
    signing.verify(model, keys["pub"], sig, ignore_paths=["local.cfg"])


def test_git_paths_not_ignored_on_request(model, keys) -> None:
    m = signing.hash_artifact(model, ignore_git_paths=False)
    assert ".gitattributes" in m.digests and ".git/HEAD" in m.digests
    assert ".gitattributes" not in signing.hash_artifact(model).digests


def test_resign_in_place_ignores_old_signature(model, keys) -> None:
    first = signing.sign(model, keys["priv"])
    second = signing.sign(model, keys["priv"])
    assert first == second
    assert "model.sig" not in {r["name"] for r in _statement(second)["predicate"]["resources"]}
    assert not list(model.glob(".model.sig*"))


def test_streaming_hash_matches_hashlib(model: Path) -> None:
    expected = {
        p.relative_to(model).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in model.rglob("*")
        if p.is_file() and not p.relative_to(model).as_posix().startswith((".git/", ".gitattributes"))
    }
    seen: list[tuple[int, int]] = []
    small = signing.hash_artifact(model, buffer_size=256 << 10, max_workers=1, progress=lambda d, t: seen.append((d, t)))
    assert small.digests == expected
    assert small.total_size == sum((model / n).stat().st_size for n in expected)
    assert seen[-1] == (small.total_size, small.total_size)
    assert len(seen) >= BIG_SIZE // (256 << 10)  # one call per buffer, at least
    assert signing.hash_artifact(model, max_workers=4) == small
    assert {r.name: r.size for r in small.resources}[BIG] == BIG_SIZE


# --- deterministic signatures ----------------------------------------------------------------------


def test_key_signer_is_deterministic(model: Path, keys: dict[str, Path], ms: ModelSigningCLI, tmp_path: Path) -> None:
    """Signing the same files twice gives the same bytes (reproducible builds), and model_signing
    accepts them."""
    first = signing.sign(model, keys["priv"], tmp_path / "first.sig")
    second = signing.sign(model, signing.KeySigner(keys["priv"]), tmp_path / "second.sig")
    assert first.read_bytes() == second.read_bytes()
    assert ms.verify(model, first, keys["pub"]) == (0, "Verification succeeded\n")
    signer = signing.KeySigner(keys["priv"])
    assert signer.sign(b"{}") == signer.sign(b"{}") != signer.sign(b"{ }")


def test_deterministic_nonce_is_rfc6979() -> None:
    """RFC 6979 appendix A.2.5 (P-256, SHA-256, message "sample"): the signature KeySigner's ECDSA makes
    is the published one, so the nonce comes from the key and message as the RFC says, not from luck."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = ec.derive_private_key(0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721, ec.SECP256R1())
    r, s = decode_dss_signature(key.sign(b"sample", signing._ecdsa(key.public_key(), deterministic=True)))
    assert r == 0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716
    assert s == 0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8
