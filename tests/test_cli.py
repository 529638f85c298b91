"""The command line: help and version, inspect, and bad input (one clear line, exit ≠ 0, no output left)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from slmpkg import __version__
from slmpkg.cli import main
from slmpkg.formats import gguf as gguf_format

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_llama", REPO / "examples" / "make_tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("cli") / "tiny-f16.gguf"
    gguf_format.write(path, module.tiny_llama(n_layer=2))
    return path


def run(*args: str) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version_and_help():
    assert run("--version").output.strip().endswith(__version__)
    for command in ([], ["quantize"], ["inspect"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_quantize_then_inspect_json(model, tmp_path):
    out = tmp_path / "q.gguf"
    result = run("quantize", model, "-o", out, "--quant", "q4_k_m", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["preset"] == "Q4_K_M" and Path(report["output"]) == out
    by_name = {t["name"]: t for t in report["tensors"]}
    assert by_name["output.weight"]["to"] == "Q6_K"
    assert by_name["blk.0.attn_q.weight"]["to"] == "Q4_K"

    info = json.loads(run("inspect", out, "--json").output)
    assert info["architecture"] == "llama"
    assert info["metadata"]["general.file_type"] == 15
    assert info["metadata"]["tokenizer.ggml.tokens"]["item_type"] == "STRING"
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert types["output_norm.weight"] == "F32" and types["output.weight"] == "Q6_K"
    assert 4.5 < info["bits_per_weight"] < 7.0
    assert info["file_size"] == out.stat().st_size


def _assert_clean_failure(result, out: Path, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slmpkg: error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary file left either


def test_not_a_gguf(tmp_path):
    src, out = tmp_path / "model.gguf", tmp_path / "out.gguf"
    src.write_text("this is not a model")
    _assert_clean_failure(run("quantize", src, "-o", out, "--quant", "Q4_0"), out, str(src), "not a GGUF")


def test_truncated_gguf(model, tmp_path):
    src, out = tmp_path / "cut.gguf", tmp_path / "out.gguf"
    src.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    _assert_clean_failure(run("quantize", src, "-o", out, "--quant", "Q4_0"), out, str(src), "truncated")


def test_missing_input(tmp_path):
    out = tmp_path / "out.gguf"
    _assert_clean_failure(run("quantize", tmp_path / "nope.gguf", "-o", out, "--quant", "Q4_0"), out, "nope.gguf")


def test_unknown_preset(model, tmp_path):
    out = tmp_path / "out.gguf"
    _assert_clean_failure(run("quantize", model, "-o", out, "--quant", "Q9_K"), out, "Q9_K", "Q4_K_M")


def test_unknown_tensor_type(model, tmp_path):
    out = tmp_path / "out.gguf"
    _assert_clean_failure(run("quantize", model, "-o", out, "--quant", "Q4_0", "--tensor-type", "attn_q=q7_7"), out, "q7_7")


def test_imatrix_that_does_not_fit(model, tmp_path):
    import struct

    import numpy as np

    imatrix, out = tmp_path / "bad.dat", tmp_path / "out.gguf"
    name = b"blk.0.attn_q.weight"
    imatrix.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 1, 10) + np.ones(10, np.float32).tobytes())
    result = run("quantize", model, "-o", out, "--quant", "Q4_K_M", "--imatrix", imatrix)
    _assert_clean_failure(result, out, str(imatrix), "blk.0.attn_q.weight", "10 values")


def test_imatrix_that_is_not_one(model, tmp_path):
    imatrix, out = tmp_path / "junk.dat", tmp_path / "out.gguf"
    imatrix.write_bytes(b"\xff\xff\xff\xffgarbage")
    _assert_clean_failure(run("quantize", model, "-o", out, "--quant", "Q4_K_M", "--imatrix", imatrix), out, str(imatrix))


def test_failure_keeps_an_existing_output(model, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous result")
    result = run("quantize", tmp_path / "nope.gguf", "-o", out, "--quant", "Q4_0")
    assert result.exit_code == 1
    assert out.read_bytes() == b"previous result"


def test_keygen_sign_verify_and_tamper(model, tmp_path):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.gguf").write_bytes(model.read_bytes())
    (artifact / "README.md").write_text("tiny model")
    key = tmp_path / "keys" / "release"
    assert run("keygen", "-o", key).exit_code == 0
    signed = run("sign", artifact, "--key", f"{key}.pem", "--json")
    assert signed.exit_code == 0, signed.output
    assert Path(json.loads(signed.output)["signature"]) == artifact / "model.sig"
    verified = run("verify", artifact, "--pub", f"{key}.pub.pem", "--json")
    assert verified.exit_code == 0 and sorted(json.loads(verified.output)["files"]) == ["README.md", "model.gguf"]
    (artifact / "extra.txt").write_text("smuggled")
    result = run("verify", artifact, "--pub", f"{key}.pub.pem")
    assert result.exit_code == 1
    assert result.output.startswith("slmpkg: error: ") and "extra.txt: file added" in result.output


def test_targets_lists_the_catalog_and_ranks_this_host():
    listed = json.loads(run("targets", "--json").output)
    names = [t["name"] for t in listed["targets"]]
    assert {"cpu-x86_64-avx2", "cuda-sm80", "jetson-orin", "apple-metal"} <= set(names)
    detected = json.loads(run("targets", "--detect", "--json").output)
    assert detected["compatible"], "every host runs at least one CPU target"
    assert detected["compatible"][-1] in ("cpu-x86_64", "cpu-arm64")  # the baseline is the last resort


def test_quickstart_runs_end_to_end(tmp_path):
    """The README's main job: a HF checkpoint → `slmpkg build` (five targets, measured, signed, published)
    → a second build that does nothing → pull --target auto of the artifact made for this host, verified."""
    import os
    import subprocess

    pytest.importorskip("transformers")
    done = subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh"), str(tmp_path / "qs")],
                          capture_output=True, text=True, env={**os.environ, "SLMPKG_REGISTRY": ""}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    qs = tmp_path / "qs"
    builds = [line for line in done.stdout.splitlines() if line.startswith("tiny-llama:1.0: ")]
    assert len(builds) == 2 and "0 step(s) run" in builds[1], builds  # the second build did nothing
    pulled = qs / "pulled"
    # this host runs an x86-64 or arm64 CPU target: the artifact pulled is the one built for its best one
    runs = json.loads(run("targets", "--detect", "--json").output)["compatible"]
    artifact = "gguf-Q4_K_M" if {"cpu-x86_64-avx2", "cpu-x86_64-avx512"} & set(runs) else "gguf-Q4_0"
    built = qs / "slmpkg-build" / "artifacts" / artifact
    assert sorted(p.name for p in pulled.iterdir()) == sorted(p.name for p in built.iterdir())
    assert all((pulled / p.name).read_bytes() == p.read_bytes() for p in built.iterdir())
    assert "verified" in done.stdout and f"provenance: {artifact}" in done.stdout
    assert (qs / "slmpkg-build" / "reports" / "quality.html").exists()


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86-64 target ladder")
def test_pull_auto_picks_the_best_target_that_fits_the_memory_budget(tmp_path, monkeypatch):
    from slmpkg.targets import detect_host

    if "cpu-x86_64-avx2" not in json.loads(run("targets", "--detect", "--json").output)["compatible"]:
        pytest.skip("this x86-64 host has no AVX2")
    assert detect_host().arch == "x86_64"
    monkeypatch.setenv("SLMPKG_HOME", str(tmp_path / "home"))
    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir(), small.mkdir()
    (big / "model.bin").write_bytes(b"\1" * 3_000_000)
    (small / "model.bin").write_bytes(b"\2" * 1_000_000)
    key = tmp_path / "k"
    assert run("keygen", "-o", key).exit_code == 0
    for target, artifact in (("cpu-x86_64-avx2", big), ("cpu-x86_64", small)):
        assert run("push", "m:1", artifact, "--target", target, "--key", f"{key}.pem").exit_code == 0
    roomy = run("pull", "m:1", "-o", tmp_path / "a", "--pub", f"{key}.pub.pem", "--json")
    assert json.loads(roomy.output)["target"] == "cpu-x86_64-avx2"
    tight = run("pull", "m:1", "-o", tmp_path / "b", "--pub", f"{key}.pub.pem", "--max-memory", "2M", "--json")
    assert json.loads(tight.output)["target"] == "cpu-x86_64"
    assert (tmp_path / "b" / "model.bin").read_bytes() == (small / "model.bin").read_bytes()
    none = run("pull", "m:1", "-o", tmp_path / "c", "--pub", f"{key}.pub.pem", "--max-memory", "100")
    assert none.exit_code == 1 and none.output.startswith("slmpkg: error: ") and "cpu-x86_64" in none.output
    assert not (tmp_path / "c").exists()


def test_progress_bar_counts_bytes_from_worker_threads():
    """Pulls and pushes advance one bar from several download threads; a pull's total is unknown."""
    import io
    import threading

    from slmpkg._progress import ProgressBar

    stream = io.StringIO()
    with ProgressBar(None, "pull", enabled=True, stream=stream) as bar:
        workers = [threading.Thread(target=lambda: [bar.advance(1000) for _ in range(1000)]) for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert bar.done == 8_000_000
    assert "pull: 8.00MB" in stream.getvalue().split("\r")[-1]  # the last redraw (tqdm's) shows every byte
