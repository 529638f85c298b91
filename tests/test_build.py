"""`slmpkg build`, `slmpkg eval` and provenance, end to end on tiny random models of two families (Llama and
Qwen2, transformers classes with random weights, byte-level BPE tokenizers trained offline), proved by the
programs users run: the single `slmpkg` commands (byte-identical artifacts), llama.cpp / onnxruntime /
transformers (the quality figures), `model_signing verify key` (signatures), a real SeaweedFS (parallel
matrix jobs) and huggingface_hub against tests/hub_server.py (Hub sources).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slmpkg import provenance, signing
from slmpkg.build import Builder
from slmpkg.cli import main
from slmpkg.recipe import RecipeError, load_recipe, parse_recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["cpu-x86_64-avx2", "cpu-x86_64-avx512", "cpu-arm64", "cuda-sm75", "cuda-sm80"]
ARTIFACTS = {"gguf-Q4_K_M": ["cpu-x86_64-avx2", "cpu-x86_64-avx512"], "gguf-Q4_0": ["cpu-arm64"],
             "onnx-Q4_0": ["cuda-sm75"], "safetensors-BF16": ["cuda-sm80"]}
SIGNATURES = ("model.sig", provenance.PROVENANCE_FILE)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    make = _example("make_tiny_hf").make_tiny_hf
    root = tmp_path_factory.mktemp("models")
    return {family: make(root / f"tiny-{family}", family, layers=2) for family in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path_factory.mktemp("keys") / "release")


def write_recipe(folder: Path, source: Path | str, *, targets=TARGETS, key: Path | None = None,
                 registry: str | None = None, extra: str = "", quality: str = "context = 64\nchunks = 2\n",
                 tags=("latest",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['name = "tiny"', 'version = "1.0"', f'source = "{source}"', f"targets = {json.dumps(list(targets))}",
             extra, "[quality]", quality]
    if registry is not None:
        lines += ["[publish]", f'registry = "{registry}"', f'key = "{key}"', f"tags = {json.dumps(list(tags))}"]
    path = folder / "slmpkg.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def model_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in SIGNATURES}


def run_cli(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("slmpkg")
    assert exe, "the slmpkg console script is installed with the package"
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def built(request, models, keys, tmp_path_factory):
    """A full build (5 targets, 4 artifacts) published to a local registry, run through the CLI."""
    family = request.param
    work = tmp_path_factory.mktemp(f"build-{family}")
    priv, _ = keys
    recipe = write_recipe(work, models[family], key=priv, registry=str(work / "registry"))
    env = {**os.environ, "SLMPKG_HOME": str(work / "home")}
    done = run_cli("build", recipe, "--json", cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return family, work, recipe, json.loads(done.stdout), env


# ---- recipes ------------------------------------------------------------------------------------


def test_recipe_groups_targets_into_distinct_artifacts():
    every = parse_recipe({"name": "m", "version": "1", "source": "hf://org/m"})
    ids = {a.id: a.targets for a in every.artifacts()}
    assert set(ids) == {"gguf-Q4_K_M", "gguf-Q4_0", "onnx-Q4_0", "safetensors-BF16", "safetensors-F16"}
    assert ids["gguf-Q4_K_M"] == ("apple-metal", "jetson-orin", "cpu-x86_64-avx512", "cpu-x86_64-avx2")
    # a default quantization applies where it fits the target's format; options make their own artifact
    r = parse_recipe({"name": "m", "version": "1", "source": "hf://org/m",
                      "targets": ["cpu-x86_64", "cpu-arm64", "cuda-sm80", "cuda-sm75"],
                      "defaults": {"quant": "Q5_K_M"}, "target": {"cpu-arm64": {"pure": True}}})
    by_id = {a.id: a for a in r.artifacts()}
    ids = list(by_id)
    assert ids[0] == "gguf-Q5_K_M" and by_id["gguf-Q5_K_M"].targets == ("cpu-x86_64",)
    pure = by_id[ids[1]]  # pure: options that change the bytes make an artifact of their own
    assert ids[1].startswith("gguf-Q5_K_M-") and pure.targets == ("cpu-arm64",) and pure.option("pure") is True
    assert by_id["safetensors-BF16"].targets == ("cuda-sm80",)  # Q5_K_M is no safetensors dtype: left alone
    assert by_id["onnx-Q5_K_M"].carries_gguf  # the ONNX target carries the Q5_K_M blocks


@pytest.mark.parametrize("document, key, problem", [
    ({"version": "1", "source": "x"}, "name", "missing"),
    ({"name": "m", "version": "1", "source": "x", "colour": 1}, "colour", "unknown key"),
    ({"name": "m", "version": "1", "source": "x", "targets": ["cpu-z80"]}, "targets", "unknown target 'cpu-z80'"),
    ({"name": "m", "version": "1", "source": "x", "targets": ["cpu-arm64"], "target": {"cpu-arm64": {"quant": "Q9"}}},
     "target.cpu-arm64.quant", "not a gguf quantization"),
    ({"name": "m", "version": "1", "source": "x", "targets": ["cuda-sm80"], "target": {"cuda-sm80": {"imatrix": "i.dat"}}},
     "target.cuda-sm80.imatrix", "does not apply to safetensors"),
    ({"name": "m", "version": "1", "source": "x", "targets": ["cpu-arm64"], "target": {"cuda-sm80": {}}},
     "target.cuda-sm80", "does not build"),
    ({"name": "m", "version": "1", "source": "x", "quality": {"min_top1": 90}}, "quality.min_top1", "fraction"),
    ({"name": "m", "version": "1", "source": "x", "publish": {"tags": ["1"]}}, "publish.tags", "the version itself"),
    ({"name": "Bad Name", "version": "1", "source": "x"}, "name/version", "invalid name"),
    ({"name": "m", "version": "1", "source": "s3://b/m"}, "source", "hf://org/repo"),
    ({"name": "m", "version": "1", "source": "x", "targets": ["cuda-sm75"],
      "target": {"cuda-sm75": {"block_size": 48}}}, "target.cuda-sm75.block_size", "does not apply"),
    ({"name": "m", "version": "1", "source": "x", "targets": ["cuda-sm75"],
      "target": {"cuda-sm75": {"quant": "int4", "block_size": 48}}}, "target.cuda-sm75.block_size", "power of two"),
])
def test_bad_recipes_are_named_in_one_line(tmp_path, document, key, problem):
    with pytest.raises(RecipeError) as e:
        parse_recipe(document, tmp_path / "slmpkg.toml")
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'slmpkg.toml'}: {key}: ") and problem in message, message
    assert "\n" not in message


def test_bad_recipe_file_fails_in_one_line_and_builds_nothing(tmp_path):
    recipe = tmp_path / "slmpkg.toml"
    recipe.write_text('name = "m"\nversion = "1"\nsource = "x"\ntargets = ["cpu-arm64"\n')
    result = CliRunner().invoke(main, ["build", str(recipe)])
    assert result.exit_code == 1
    assert result.output.startswith(f"slmpkg: error: {recipe}: not valid TOML") and result.output.count("\n") == 1
    assert not (tmp_path / "slmpkg-build").exists()
    missing = CliRunner().invoke(main, ["build", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "no such recipe file" in missing.output


# ---- a build, against the single commands ----------------------------------------------------


def test_build_makes_each_artifact_once_for_its_targets(built):
    family, work, recipe, result, env = built
    assert {k: Path(v).name for k, v in result["artifacts"].items()} == {k: k for k in ARTIFACTS}
    built_steps = [s["id"] for s in result["steps"] if s["status"] == "built"]
    # one float GGUF feeds both presets; each artifact is made once though five targets want four
    assert built_steps[:5] == ["float", "gguf-Q4_K_M", "gguf-Q4_0", "onnx-Q4_0", "safetensors-BF16"]
    assert sorted(p["target"] for p in result["published"]) == sorted(TARGETS)
    assert {p["artifact"] for p in result["published"] if p["target"] in ARTIFACTS["gguf-Q4_K_M"]} == {"gguf-Q4_K_M"}
    assert result["tags"] == ["latest"] and result["gate"]["passed"]


def test_every_artifact_equals_what_the_single_commands_make(built, tmp_path):
    """Each job's commands (from `--plan --json`), run by hand in a fresh folder, give the same bytes; run
    alone, a GGUF job converts in one pass where the build quantized the float GGUF: same bytes too."""
    family, work, recipe, result, env = built
    plan = json.loads(run_cli("build", recipe, "--plan", "--json", cwd=work, env=env).stdout)
    assert plan["matrix"] == {"include": [{"job": j} for j in ARTIFACTS]}
    assert any("slmpkg quantize slmpkg-build/work/float.gguf" in c for c in plan["commands"])
    for job in plan["jobs"]:
        assert job["targets"] == ARTIFACTS[job["id"]]
        fresh = tmp_path / job["id"]
        fresh.mkdir()
        for command in job["commands"]:
            argv = command.split()
            assert argv[0] == "slmpkg"
            done = run_cli(*argv[1:], cwd=fresh, env=env)
            assert done.returncode == 0, (command, done.stderr[-2000:])
        ours = model_files(work / "slmpkg-build" / "artifacts" / job["id"])
        theirs = model_files(fresh / "slmpkg-build" / "artifacts" / job["id"])
        assert ours and ours.keys() == theirs.keys()
        assert all(ours[k] == theirs[k] for k in ours), job["id"]


def test_second_build_does_nothing(built):
    family, work, recipe, result, env = built
    store = work / "registry"
    before = {p: p.stat().st_mtime_ns for p in (work / "slmpkg-build").rglob("*") if p.is_file()}
    index_before = {p: p.read_bytes() for p in store.rglob("*.json")}
    again = Builder(load_recipe(recipe), work / "slmpkg-build").run()
    assert not again.changed
    assert {s.status for s in again.steps} == {"up to date"}
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert {p: p.read_bytes() for p in store.rglob("*.json")} == index_before  # no new index version


def test_a_changed_option_rebuilds_only_what_it_touches(built, tmp_path):
    family, work, recipe, result, env = built
    copy = tmp_path / "b"
    shutil.copytree(work / "slmpkg-build", copy)
    text = recipe.read_text().replace("[quality]", '[target.cpu-arm64]\nquant = "Q5_0"\n\n[quality]')
    changed = tmp_path / "slmpkg.toml"
    changed.write_text(text)
    again = Builder(load_recipe(changed), copy).run(publish=False)
    status = {s.id: s.status for s in again.steps}
    # Q4_0 is no longer published, but the ONNX artifact still carries its blocks: an intermediate now,
    # made again (in work/); the ONNX artifact itself did not change
    assert status["gguf-Q5_0"] == "built" and status["gguf-Q4_0"] == "built"
    assert status["gguf-Q4_K_M"] == status["onnx-Q4_0"] == status["safetensors-BF16"] == "up to date"
    assert status["eval gguf-Q4_K_M"] == "up to date" and status["eval gguf-Q5_0"] == "built"
    assert (copy / "work" / "gguf-Q4_0").is_dir()


def test_republishing_other_bytes_under_the_same_version_is_refused(built, tmp_path):
    family, work, recipe, result, env = built
    copy = tmp_path / "b"
    shutil.copytree(work / "slmpkg-build", copy)
    changed = tmp_path / "slmpkg.toml"
    changed.write_text(recipe.read_text().replace("[quality]", '[target.cpu-arm64]\nquant = "Q5_0"\n\n[quality]'))
    done = run_cli("build", changed, "-o", copy, "-q", cwd=work, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("slmpkg: error: tiny:1.0 is already published for cpu-arm64 with other model files")
    assert "raise the version" in done.stderr
    assert done.stderr.count("\n") == 1


def test_a_build_from_scratch_of_a_published_version_publishes_nothing_new(built, tmp_path):
    """A rerun CI job (a fresh machine) makes the same model files with a new provenance: the version
    already holds them, so nothing is pushed and nothing fails."""
    family, work, recipe, result, env = built
    index = sorted((work / "registry").rglob("indexes/**/*.json"))
    before = [p.read_bytes() for p in index]
    again = Builder(load_recipe(recipe), tmp_path / "fresh").run(evaluate=False)
    pushes = {s.id: (s.status, s.detail) for s in again.steps if s.id.startswith("push ")}
    assert set(pushes) == {f"push {t}" for t in TARGETS}
    assert all(status == "up to date" and "same model files" in detail for status, detail in pushes.values())
    assert [p.read_bytes() for p in index] == before


# ---- signatures and provenance ------------------------------------------------------------------


def test_artifacts_verify_with_model_signing(built, keys):
    family, work, recipe, result, env = built
    _, pub = keys
    cli = shutil.which("model_signing")
    assert cli, "model-signing is a dev dependency"
    for artifact in ARTIFACTS:
        directory = work / "slmpkg-build" / "artifacts" / artifact
        done = subprocess.run([cli, "verify", "key", str(directory), "--signature", str(directory / "model.sig"),
                               "--public_key", str(pub)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (artifact, done.stdout[-500:], done.stderr[-1500:])


def test_provenance_names_the_source_recipe_and_files(built, keys, models):
    family, work, recipe, result, env = built
    _, pub = keys
    source = models[family]
    source_digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.iterdir() if p.is_file()}
    for artifact, targets in ARTIFACTS.items():
        directory = work / "slmpkg-build" / "artifacts" / artifact
        verified = provenance.verify_provenance(directory, signing.KeyVerifier(pub))
        st = verified.statement
        assert st["predicateType"] == "https://slsa.dev/provenance/v1"
        assert verified.subjects == {name: hashlib.sha256(data).hexdigest()
                                     for name, data in model_files(directory).items()}
        deps = {d["name"]: d["digest"]["sha256"] for d in verified.dependencies}
        assert deps == source_digests
        ext = verified.external_parameters
        assert ext["recipe"] == "slmpkg.toml" and ext["targets"] == targets and ext["version"] == "1.0"
        assert ext["artifact"]["id"] == artifact and ext["source"] == str(source)
        assert ext["commands"] and all(c.startswith("slmpkg ") for c in ext["commands"])
        quality = st["predicate"]["runDetails"]["byproducts"][0]
        assert quality["name"] == "quality.json" and "mean_kld" in quality["annotations"]


def test_provenance_refuses_a_changed_byte_another_key_and_an_added_file(built, keys, tmp_path):
    family, work, recipe, result, env = built
    _, pub = keys
    directory = tmp_path / "a"
    shutil.copytree(work / "slmpkg-build" / "artifacts" / "gguf-Q4_0", directory)
    ok = run_cli("verify", directory, "--pub", pub, "--provenance", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["provenance"]["artifact"]["id"] == "gguf-Q4_0"

    gguf = next(directory.glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 1
    gguf.write_bytes(bytes(data))
    with pytest.raises(provenance.ProvenanceError, match=f"{gguf.name}: digest mismatch"):
        provenance.verify_provenance(directory, signing.KeyVerifier(pub))
    bad = run_cli("verify", directory, "--pub", pub, "--provenance")
    assert bad.returncode == 1 and bad.stderr.startswith("slmpkg: error: ") and bad.stderr.count("\n") == 1

    other, other_pub = signing.generate_keypair(tmp_path / "other")
    shutil.copytree(work / "slmpkg-build" / "artifacts" / "gguf-Q4_0", tmp_path / "b")
    with pytest.raises(provenance.ProvenanceError):
        provenance.verify_provenance(tmp_path / "b", signing.KeyVerifier(other_pub))
    (tmp_path / "b" / "extra.bin").write_bytes(b"x")
    with pytest.raises(provenance.ProvenanceError, match="extra.bin: not in the provenance"):
        provenance.verify_provenance(tmp_path / "b", signing.KeyVerifier(pub))


def _legacy_imatrix(path: Path, gguf: Path) -> Path:
    """llama-imatrix's .dat format, random positive importances for every 2-D weight of ``gguf``."""
    import struct

    from slmpkg.formats import gguf as gguf_format

    rng = np.random.default_rng(5)
    weights = [t for t in gguf_format.read(gguf).tensors if len(t.shape) == 2]
    out = struct.pack("<i", len(weights))
    for t in weights:
        name = t.name.encode()
        out += struct.pack("<i", len(name)) + name + struct.pack("<ii", 1, t.shape[-1])
        out += (rng.random(t.shape[-1], np.float32) + 0.1).tobytes()
    path.write_bytes(out)
    return path


def test_options_make_their_own_artifacts_and_the_imatrix_is_named_in_the_provenance(models, keys, tmp_path):
    priv, pub = keys
    plain = write_recipe(tmp_path / "a", models["llama"], targets=["cpu-arm64"])
    Builder(load_recipe(plain), tmp_path / "a" / "out").run(evaluate=False)
    imatrix = _legacy_imatrix(tmp_path / "imatrix.dat", tmp_path / "a" / "out" / "artifacts" / "gguf-Q4_0" / "tiny-Q4_0.gguf")
    recipe = write_recipe(tmp_path / "b", models["llama"], targets=["cpu-arm64", "cpu-x86_64", "cpu-x86_64-avx2"],
                          key=priv, registry=str(tmp_path / "registry"),
                          extra=f'[target.cpu-arm64]\nimatrix = "{imatrix}"\n'
                                '[target.cpu-x86_64-avx2]\npure = true\ntensor_types = ["attn_v=q8_0"]\n')
    result = Builder(load_recipe(recipe), tmp_path / "b" / "out").run(evaluate=False)
    with_im = next(a for a in result.artifacts if a.startswith("gguf-Q4_0-"))
    pure = next(a for a in result.artifacts if a.startswith("gguf-Q4_K_M-"))
    assert set(result.artifacts) == {"gguf-Q4_0", with_im, pure}
    a = model_files(result.artifacts["gguf-Q4_0"])
    b = model_files(result.artifacts[with_im])
    assert a == model_files(tmp_path / "a" / "out" / "artifacts" / "gguf-Q4_0")  # the same without one
    assert a["tiny-Q4_0.gguf"] != b["tiny-Q4_0.gguf"] and b"quantize.imatrix.file" in b["tiny-Q4_0.gguf"]
    verified = provenance.verify_provenance(result.artifacts[with_im], signing.KeyVerifier(pub))
    deps = {d["name"]: d["digest"]["sha256"] for d in verified.dependencies}
    assert deps["imatrix.dat"] == hashlib.sha256(imatrix.read_bytes()).hexdigest()
    # each job's single command (a one-pass convert when run alone) makes the same file as the build
    # (which quantized the float GGUF)
    for artifact, option in ((with_im, "--imatrix"), (pure, "--tensor-type")):
        plan = json.loads(CliRunner().invoke(main, ["build", str(recipe), "--plan", "--json", "--only", artifact]).output)
        (command,) = plan["jobs"][0]["commands"]
        assert command.startswith("slmpkg convert ") and option in command
        argv = command.split()
        argv[argv.index("-o") + 1] = str(tmp_path / f"{artifact}.gguf")
        done = run_cli(*argv[1:], cwd=tmp_path / "b")
        assert done.returncode == 0, done.stderr
        (name,) = model_files(result.artifacts[artifact])
        assert (tmp_path / f"{artifact}.gguf").read_bytes() == model_files(result.artifacts[artifact])[name]


def test_a_gguf_source_builds_and_measures_with_llama_cpp(built, tmp_path):
    """A float GGUF as the source: presets are quantized from it directly, the bf16 directory is converted
    back from it, and the reference logits come from llama.cpp (tokens from its own vocabulary)."""
    family, work, recipe, result, env = built
    source = tmp_path / "tiny-f32.gguf"
    shutil.copy(work / "slmpkg-build" / "work" / "float.gguf", source)
    r = write_recipe(tmp_path, source, targets=["cpu-arm64", "cuda-sm80"], quality="context = 64\nchunks = 1\n")
    out = Builder(load_recipe(r), tmp_path / "out").run(publish=False)
    assert [s.id for s in out.steps if s.status == "built"][:2] == ["gguf-Q4_0", "safetensors-BF16"]
    # quantized from the float GGUF: the same file as the HF build, which quantized the same float GGUF
    assert model_files(out.artifacts["gguf-Q4_0"]) == model_files(work / "slmpkg-build" / "artifacts" / "gguf-Q4_0")
    q = out.reports["gguf-Q4_0"]
    assert q["mean_kld"] > 0 and out.reports["safetensors-BF16"]["max_tensor_relative_error"] == 0
    report = json.loads((tmp_path / "out" / "reports" / "quality.json").read_text())["reports"][0]["runtime"]
    assert report["reference_runtime"] == "llama.cpp" and report["positions"] == 31


def test_check_finds_the_build_reproducible(built, keys):
    family, work, recipe, result, env = built
    done = run_cli("build", recipe, "--check", "--json", cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["reproducible"] and set(report["targets"]) == set(TARGETS)
    assert all(row["match"] and row["published"] for row in report["targets"].values())


def test_check_names_what_differs(models, tmp_path):
    recipe = write_recipe(tmp_path, models["llama"], targets=["cpu-arm64"])
    out = tmp_path / "slmpkg-build"
    Builder(load_recipe(recipe), out).run(evaluate=False)
    gguf = out / "artifacts" / "gguf-Q4_0" / "tiny-Q4_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    done = CliRunner().invoke(main, ["build", str(recipe), "--check", "-q"])
    assert done.exit_code == 1 and "DIFFERS: tiny-Q4_0.gguf" in done.output


# ---- quality ------------------------------------------------------------------------------------


def _reference_figures(artifact: Path, source: Path, context: int, max_chunks: int) -> dict[str, float]:
    """The statistics computed here from the runtimes' own logits: transformers on the source, llama.cpp
    on the GGUF, torch's KL divergence, chunks cut as llama-perplexity cuts them."""
    tok = transformers.AutoTokenizer.from_pretrained(source)
    from slmpkg.evaluation import builtin_text

    ids = tok(builtin_text(), add_special_tokens=False)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    llm = llama_cpp.Llama(model_path=str(artifact), n_ctx=context, n_batch=context, logits_all=True, verbose=False)
    kld, same, nll_q, nll_b = [], [], [], []
    for i in range(min(max_chunks, len(ids) // context)):
        chunk = ids[i * context:(i + 1) * context]
        if tok.bos_token_id is not None:
            chunk[0] = tok.bos_token_id
        with torch.no_grad():
            base = model(torch.tensor([chunk])).logits[0].double()
        llm.reset()
        llm.eval(chunk)
        q = torch.tensor(np.array(llm.scores[:context]), dtype=torch.float64)
        first = context // 2
        lb = torch.log_softmax(base[first:-1], -1)
        lq = torch.log_softmax(q[first:-1], -1)
        kld.append(torch.nn.functional.kl_div(lq, lb, log_target=True, reduction="none").sum(-1))
        same.append(lq.argmax(-1) == lb.argmax(-1))
        nxt = torch.tensor(chunk[first + 1:])
        nll_q.append(-lq.gather(1, nxt[:, None])[:, 0])
        nll_b.append(-lb.gather(1, nxt[:, None])[:, 0])
    llm.close()
    k = torch.cat(kld)
    return {"mean_kld": k.mean().item(), "median_kld": k.median().item() if len(k) % 2 else torch.quantile(k, 0.5).item(),
            "max_kld": k.max().item(), "same_top1": torch.cat(same).double().mean().item(),
            "perplexity": torch.exp(torch.cat(nll_q).mean()).item(),
            "reference_perplexity": torch.exp(torch.cat(nll_b).mean()).item(), "positions": len(k)}


def test_kld_figures_equal_an_independent_computation(built, models):
    family, work, recipe, result, env = built
    artifact = work / "slmpkg-build" / "artifacts" / "gguf-Q4_K_M" / "tiny-Q4_K_M.gguf"
    report = json.loads((work / "slmpkg-build" / "reports" / "quality.json").read_text())
    ours = next(r for r in report["reports"] if r["label"] == "gguf-Q4_K_M")["runtime"]
    theirs = _reference_figures(artifact, models[family], context=64, max_chunks=2)
    assert ours["positions"] == theirs["positions"] > 0
    for key in ("mean_kld", "median_kld", "max_kld", "same_top1", "perplexity", "reference_perplexity"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    assert ours["mean_kld"] > 0 and 0 <= ours["same_top1"] <= 1
    # the bf16 safetensors artifact is the source itself: no divergence at all
    st = next(r for r in report["reports"] if r["label"] == "safetensors-BF16")
    assert st["runtime"]["mean_kld"] == 0 and st["runtime"]["same_top1"] == 1
    assert max(t["relative_error"] for t in st["tensors"]) == 0


def test_quality_report_pages_and_plots(built):
    family, work, recipe, result, env = built
    reports = work / "slmpkg-build" / "reports"
    html = (reports / "quality.html").read_text()
    for artifact in ARTIFACTS:
        assert artifact in html and artifact in (reports / "quality.md").read_text()
    for png in ("bpw_vs_kld.png", "layer_error.png"):
        assert (reports / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'src="{png}"' in html
    data = json.loads((reports / "quality.json").read_text())
    by = {r["label"]: r for r in data["reports"]}
    # fewer bits, more error: Q4_0 (4.5 bpw) errs more than Q4_K_M (~4.9) on the same tensors
    q40 = {t["name"]: t["relative_error"] for t in by["gguf-Q4_0"]["tensors"]}
    q4k = {t["name"]: t["relative_error"] for t in by["gguf-Q4_K_M"]["tensors"]}
    assert sum(q40.values()) > sum(q4k.values())
    assert by["gguf-Q4_0"]["bits_per_weight"] < by["gguf-Q4_K_M"]["bits_per_weight"]
    assert set(by["gguf-Q4_K_M"]["layers"]) == {"0", "1"}


def test_eval_command_reports_tensor_error_and_runtime_statistics(built, models, tmp_path):
    family, work, recipe, result, env = built
    artifact = work / "slmpkg-build" / "artifacts" / "onnx-Q4_0"
    done = CliRunner().invoke(main, ["eval", str(artifact), "--reference", str(models[family]), "--json",
                                     "--context", "64", "--chunks", "1", "--report", str(tmp_path / "r")])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["runtime"]["runtime"] == "onnxruntime" and report["runtime"]["reference_runtime"] == "transformers"
    assert report["runtime"]["positions"] == 31 and report["runtime"]["mean_kld"] > 0
    assert {t["type"] for t in report["tensors"]} >= {"Q4_0"} and (tmp_path / "r" / "quality.html").exists()
    text = CliRunner().invoke(main, ["eval", str(artifact), "--reference", str(models[family]), "--no-runtime"])
    assert text.exit_code == 0 and "runtime statistics: none (not asked for)" in text.output
    missing = CliRunner().invoke(main, ["eval", str(tmp_path / "nope"), "--reference", str(models[family])])
    assert missing.exit_code == 1 and missing.output == f"slmpkg: error: {tmp_path / 'nope'}: no such file or directory\n"


def test_a_missed_gate_publishes_nothing(models, keys, tmp_path):
    priv, pub = keys
    registry = tmp_path / "registry"
    recipe = write_recipe(tmp_path, models["llama"], targets=["cpu-arm64", "cuda-sm80"], key=priv,
                          registry=str(registry), quality="context = 64\nchunks = 1\nmax_kld = 1e-9\n")
    done = run_cli("build", recipe, "-q", cwd=tmp_path, env={**os.environ, "SLMPKG_HOME": str(tmp_path / "h")})
    assert done.returncode == 1
    assert done.stderr.startswith("slmpkg: error: ") and "quality gate failed" in done.stderr
    assert "cpu-arm64 (gguf-Q4_0): mean KLD" in done.stderr and "cuda-sm80" not in done.stderr  # bf16 passes
    assert done.stderr.count("\n") == 1
    assert not list(registry.rglob("*.json")) and not list(registry.rglob("blobs/*/*"))
    out = tmp_path / "slmpkg-build"
    assert not list(out.rglob("model.sig"))  # nothing signed either
    gate = json.loads((out / "reports" / "quality.json").read_text())["gate"]
    assert [r["passed"] for r in gate["results"]] == [False, True]


# ---- CI matrix jobs against one S3 registry -----------------------------------------------------


def test_matrix_jobs_in_parallel_processes_publish_one_index(sw, models, keys, tmp_path):
    """One process per job of `--plan --json`'s matrix, all at once, each with its own build folder (a CI
    machine each), pushing to one SeaweedFS bucket: the version ends with every target, the tag once."""
    import seaweed

    server = sw
    priv, pub = keys
    registry = f"s3://models/m-{uuid.uuid4().hex[:8]}"
    recipe = write_recipe(tmp_path, models["qwen2"], key=priv, registry=registry)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=seaweed.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=seaweed.SECRET_KEY,
               AWS_REGION="us-east-1", AWS_ENDPOINT_URL=server.endpoint, AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), SLMPKG_HOME=str(tmp_path / "home"))
    matrix = json.loads(run_cli("build", recipe, "--plan", "--json", env=env).stdout)["matrix"]["include"]
    exe = shutil.which("slmpkg")
    procs = [subprocess.Popen([exe, "build", str(recipe), "--only", m["job"], "--no-eval", "-q",
                               "-o", str(tmp_path / f"machine-{m['job']}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in matrix]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [o[1][-1500:] for o in outs]

    from slmpkg.registry import ls, open_store, pull

    store = open_store(registry, endpoint_url=server.endpoint, aws_access_key_id=seaweed.ACCESS_KEY,
                       aws_secret_access_key=seaweed.SECRET_KEY, region_name="us-east-1")
    verifier = signing.KeyVerifier(pub)
    index = ls(store, "tiny:1.0", verifier=verifier)
    assert set(index["targets"]) == set(TARGETS)
    assert ls(store, "tiny", verifier=verifier)["tags"] == {"latest": "1.0"}
    for target in TARGETS:
        artifact = next(a for a, ts in ARTIFACTS.items() if target in ts)
        got = pull(store, "tiny:latest", target, tmp_path / "pulled" / target, verifier,
                   cache_dir=tmp_path / "cache", state=tmp_path / "trust.json")
        assert model_files(got.out_dir) == model_files(tmp_path / f"machine-{artifact}" / "artifacts" / artifact)
        provenance.verify_provenance(got.out_dir, verifier)
        signing.verify(got.out_dir, verifier)


# ---- a Hub source ----------------------------------------------------------------------------------


@pytest.fixture(params=["lfs", "xet"])
def hub(request, tmp_path, monkeypatch):
    os.environ.pop("HF_HUB_OFFLINE", None)
    hub_server = pytest.importorskip("hub_server")
    import huggingface_hub.constants as c

    if request.param == "xet":
        monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet-cache"))
        pytest.importorskip("hf_xet")
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", request.param == "lfs")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    token = "hf_build_" + uuid.uuid4().hex
    with hub_server.HubServer(token=token, xet_dir=tmp_path / "cas") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        server.mode = request.param
        yield server


def _upload(hub, folder: Path, repo: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    return hub.head(repo)


def test_hub_source_is_fetched_at_a_commit_and_named_in_the_provenance(hub, models, keys, tmp_path):
    priv, pub = keys
    commit = _upload(hub, models["llama"], "org/tiny-llama")
    recipe = write_recipe(tmp_path, "hf://org/tiny-llama@main", targets=["cpu-arm64"], key=priv,
                          registry=str(tmp_path / "registry"))
    result = Builder(load_recipe(recipe), tmp_path / "out").run(evaluate=False)
    assert [s.status for s in result.steps if s.id == "gguf-Q4_0"] == ["built"]
    verified = provenance.verify_provenance(tmp_path / "out" / "artifacts" / "gguf-Q4_0", signing.KeyVerifier(pub))
    assert verified.source_uri == f"hf://org/tiny-llama@{commit}"
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in models["llama"].iterdir() if p.is_file()}
    assert {d["name"]: d["digest"]["sha256"] for d in verified.dependencies} == want
    assert {d["uri"] for d in verified.dependencies} == {f"hf://org/tiny-llama@{commit}/{n}" for n in want}
    # the same bytes as a build from a local copy of the repo
    local = Builder(load_recipe(write_recipe(tmp_path / "l", models["llama"], targets=["cpu-arm64"])), tmp_path / "l" / "o")
    local.run(evaluate=False, publish=False)
    assert model_files(tmp_path / "l" / "o" / "artifacts" / "gguf-Q4_0") == model_files(
        tmp_path / "out" / "artifacts" / "gguf-Q4_0")


@pytest.mark.parametrize("hub", ["lfs"], indirect=True)  # the test server cuts LFS downloads
def test_an_interrupted_hub_download_resumes(hub, models, tmp_path):
    _upload(hub, models["qwen2"], "org/cut")
    weights = models["qwen2"] / "model.safetensors"
    oid = hashlib.sha256(weights.read_bytes()).hexdigest()
    cut = weights.stat().st_size // 2
    hub.cut_at[oid] = [cut, 1]
    recipe = write_recipe(tmp_path, "hf://org/cut", targets=["cpu-arm64"])
    env = {**os.environ}
    first = run_cli("build", recipe, "--no-eval", "-q", env=env)
    assert first.returncode == 1
    assert first.stderr.startswith("slmpkg: error: hf://org/cut/model.safetensors: download failed")
    assert "MB kept, rerun to resume" in first.stderr and first.stderr.count("\n") == 1
    assert not (tmp_path / "slmpkg-build" / "artifacts").exists()
    second = run_cli("build", recipe, "--no-eval", "-q", env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = [int(r.split("=")[1].split("-")[0]) for p, r in hub.ranges if p == f"/lfs/{oid}"]
    assert resumed and 0 < resumed[-1] <= cut  # continued where the first run stopped, not from 0
    fetched = tmp_path / "slmpkg-build" / "source" / "cut" / "model.safetensors"
    assert fetched.read_bytes() == weights.read_bytes()
