"""`slmpkg convert` end to end from the command line: split GGUF output, naming, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slmpkg.cli import main
from slmpkg.formats import gguf as gguf_format

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

from test_convert import _hf_model, _llama_logits  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _hf_model(tmp_path_factory.mktemp("tiny") / "Tiny-Llama", "llama", dtype=torch.bfloat16)


def run(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args])


def test_split_output_loads_in_llama_cpp_like_the_single_file(hf_dir, tmp_path):
    single, split = tmp_path / "one.gguf", tmp_path / "many.gguf"
    assert run("convert", hf_dir, "-o", single, "--quant", "Q8_0", "-q").exit_code == 0
    result = run("convert", hf_dir, "-o", split, "--quant", "Q8_0", "--split-max-size", "300K", "--json")
    assert result.exit_code == 0, result.output
    files = [Path(f) for f in json.loads(result.output)["files"]]
    assert len(files) > 2 and files[0].name == f"many-00001-of-{len(files):05d}.gguf"
    assert not split.exists()
    whole, parts = gguf_format.read(single), gguf_format.read(files[0])
    assert list(parts.metadata) == list(whole.metadata)
    assert [t.name for t in parts.tensors] == [t.name for t in whole.tensors]
    assert all(np.array_equal(a.raw(), b.raw()) for a, b in zip(parts.tensors, whole.tensors))
    ids = [1, 5, 9, 42, 7]
    assert np.array_equal(_llama_logits(files[0], ids), _llama_logits(single, ids))


def test_output_directory_gets_llama_cpp_style_name(hf_dir, tmp_path):
    result = run("convert", hf_dir, "-o", tmp_path, "--quant", "Q4_K_M", "--json")
    assert result.exit_code == 0, result.output
    out = Path(json.loads(result.output)["output"])
    assert out.parent == tmp_path
    assert out.name.startswith("Tiny-Llama-") and out.name.endswith("-Q4_K_M.gguf")
    assert out.name.split("-")[-2].endswith("M")  # a size label such as 1.2M


def test_default_keeps_the_source_float_type(hf_dir, tmp_path):
    out = tmp_path / "m.gguf"
    assert run("convert", hf_dir, "-o", out, "-q").exit_code == 0
    types = {t.name: t.qtype.name for t in gguf_format.read(out).tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _assert_clean_failure(result, out: Path, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slmpkg: error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_missing_config(hf_dir, tmp_path):
    broken = _copy(hf_dir, tmp_path / "broken")
    (broken / "config.json").unlink()
    out = tmp_path / "out.gguf"
    _assert_clean_failure(run("convert", broken, "-o", out), out, str(broken), "config.json")


def test_unknown_architecture(hf_dir, tmp_path):
    broken = _copy(hf_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    _assert_clean_failure(run("convert", broken, "-o", out), out, "FancyNewForCausalLM", "LlamaForCausalLM")


def test_shapes_that_contradict_config(hf_dir, tmp_path):
    broken = _copy(hf_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 1024
    (broken / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    _assert_clean_failure(run("convert", broken, "-o", out), out, str(broken), "mlp.down_proj", "config.json")


def test_header_longer_than_the_file(hf_dir, tmp_path):
    broken = _copy(hf_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    out = tmp_path / "out.gguf"
    _assert_clean_failure(run("convert", broken, "-o", out), out, "model.safetensors")


def test_gguf_missing_required_keys(hf_dir, tmp_path):
    good, bad, out = tmp_path / "good.gguf", tmp_path / "bad.gguf", tmp_path / "hf-out"
    assert run("convert", hf_dir, "-o", good, "-q").exit_code == 0
    ckpt = gguf_format.read(good)
    del ckpt.metadata["llama.block_count"]
    gguf_format.write(bad, ckpt)
    _assert_clean_failure(run("convert", bad, "-o", out), out, str(bad), "llama.block_count")


def test_hf_directory_recast_to_another_dtype_loads_in_transformers(hf_dir, tmp_path):
    """HF → HF: `--dtype f16` casts every float tensor (as `model.to(torch.float16)` does) and config.json's
    dtype follows; without --dtype the weights are copied as stored, byte for byte."""
    same, half = tmp_path / "same", tmp_path / "half"
    assert run("convert", hf_dir, "-o", same, "--to", "safetensors", "-q").exit_code == 0
    assert (same / "model.safetensors").read_bytes() == (hf_dir / "model.safetensors").read_bytes()
    assert run("convert", hf_dir, "-o", half, "--to", "safetensors", "--dtype", "f16", "-q").exit_code == 0
    assert json.loads((half / "config.json").read_text())["dtype"] == "float16"
    source = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(half)
    assert model.dtype == torch.float16
    want = {k: v.to(torch.float16) for k, v in source.state_dict().items()}
    got = model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (half / name).read_bytes() == (hf_dir / name).read_bytes()
    refused = run("convert", hf_dir, "-o", tmp_path / "x", "--to", "safetensors", "--quant", "Q4_0")
    assert refused.exit_code == 1 and "--quant and --imatrix apply to GGUF output" in refused.output
