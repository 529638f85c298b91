"""ONNX → safetensors / GGUF (``slmpkg convert model_dir --to safetensors|gguf``), proved by the peers.

Tiny random models (tests/test_convert.py's builders) are exported several ways: by slmpkg's own ONNX
writer (f32, f16, and int4 carrying a Q4_K_M GGUF's blocks), by onnxruntime-genai's model builder (the
real one, when installed: fused ``qkv_proj``, tied embeddings through ``Transpose``, int4 MatMulNBits),
and as optimum-style graphs built here (anonymous ``onnx::MatMul_N`` weights named only by their node's
scope, HF norm names, ``Add`` biases; also as a merged decoder inside ``If`` branches). Each import must
give back every source weight bit for bit (int4: the weights onnxruntime computes with, up to the fp16
rounding of scales); transformers loads the safetensors result and computes the source's logits;
llama.cpp runs the GGUF result; ONNX → GGUF → ONNX keeps every initializer. Every other family the
writer exports (Mistral, Mixtral, Phi-3 with and without LongRoPE, Phi-4-mini, Phi-2, StarCoder2, OpenELM,
Gemma 1/2/3, Granite) is imported from the graph alone (no config.json): the source's weights and GGUF
metadata, transformers' logits from the safetensors result (OpenELM: its weights and sizes, as transformers
has no class for it), llama.cpp's from the F32 GGUF against transformers (OpenELM: tests/test_openelm.py's
numpy reference); f16 and int4 graphs too. Bad input (external data
outside the directory, missing, short; a file that is not ONNX) fails with one line, exit 1 and nothing
at the output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slmpkg import architectures
from slmpkg.cli import main
from slmpkg.formats import gguf as gguf_format
from slmpkg.formats import onnx_import
from slmpkg.formats import safetensors as st_format
from slmpkg.pipeline import convert

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from test_convert import PROMPTS, _hf_model, _hf_outputs, _ids  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3"]  # what slmpkg's ONNX writer exports, checked every way below
IMPORTED = FAMILIES + ["gemma"]  # what the import reads (Gemma: the builder's and optimum's graphs)
# the other families slmpkg's writer exports, each with what makes it differ recovered from the graph:
# Mistral (llama in GGUF), Mixtral's MoE node, Phi-3's fused projections and LongRoPE's two cache pairs,
# Gemma 2/3's windows, soft-caps, post norms and local rope base, Granite's multipliers
MORE_FAMILIES = ["mistral", "mixtral", "phi3", "phi3-longrope", "phi4-mini", "phi2", "starcoder2", "openelm", "gemma",
                 "gemma2", "gemma3", "granite"]


def _source_model(path: Path, family: str) -> Path:
    """test_convert's tiny HF model of ``family``; test_openelm's for OpenELM."""
    if family == "openelm":
        import test_openelm

        path.mkdir(parents=True, exist_ok=True)
        return test_openelm._model(path)[0]
    return _hf_model(path, family)


def _source_logits(hf: Path, ids: list[int], family: str) -> np.ndarray:
    """transformers' logits; for OpenELM (no transformers class) test_openelm's numpy reference."""
    if family == "openelm":
        import test_openelm

        return test_openelm._reference_logits({t.name: t.float32() for t in st_format.read(hf).tensors}, ids)
    return _hf_outputs(hf, ids, family)


def run(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args])


def _graph_only(onnx_dir: Path) -> Path:
    """Remove the config.json slmpkg's writer embeds (a graph as other tools write it): the import then
    reads every setting from the graph and genai_config.json."""
    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != onnx_import.CONFIG_PROPERTY]
    assert len(kept) == len(model.metadata_props) - 1, "the writer embedded no config"
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save_model(model, str(path))
    return onnx_dir


@pytest.fixture(scope="module", params=FAMILIES)
def source(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, HF directory, slmpkg's ONNX export of it without the embedded config: the graph says all)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf = _hf_model(root / "hf", family)
    onnx_dir = root / "onnx"
    convert(hf, onnx_dir, to="onnx", progress=False)
    return family, hf, _graph_only(onnx_dir)


@pytest.fixture(scope="module", params=IMPORTED)
def hf_source(request, tmp_path_factory) -> tuple[str, Path]:
    """(family, HF directory) for the graphs other exporters write."""
    return request.param, _hf_model(tmp_path_factory.mktemp(request.param) / "hf", request.param)


def _canonical(hf: Path):
    return architectures.from_hf(st_format.read(hf), name=hf.name)


def _assert_same_weights(ckpt, reference) -> None:
    """The same tensors as the reference (a tied lm_head stays tied), each with the same type, shape and bytes.

    LongRoPE's factors are the one exception: the graph holds them only inside cos/sin caches, where a
    few float32 neighbours of a factor give bit-identical caches; those come back within one ulp."""
    ours = {t.name: t for t in ckpt.tensors}
    ref = {t.name: t for t in reference.tensors}
    assert set(ours) == set(ref), (set(ref) - set(ours), set(ours) - set(ref))
    for name, t in ref.items():
        assert ours[name].shape == t.shape and ours[name].qtype == t.qtype, name
        if name.startswith("rope_factors_"):
            np.testing.assert_array_max_ulp(ours[name].float32(), t.float32(), maxulp=1)
            continue
        assert np.array_equal(ours[name].float32(), t.float32()), name


def _assert_same_model_metadata(ckpt, reference, ignored: Sequence[str] = ()) -> None:
    """The keys llama.cpp reads for the model (not general.name) and the tokenizer equal the HF source's."""
    for key, item in reference.metadata.items():
        if key in ("general.name", "tokenizer.ggml.bos_token_id", *ignored):
            continue  # a name of our choosing; genai_config.json records a bos id even when the source has none
        assert key in ckpt.metadata, key
        ours = ckpt.metadata[key].value
        if isinstance(item.value, (list, np.ndarray)):
            assert np.array_equal(np.asarray(ours, dtype=object), np.asarray(item.value, dtype=object)), key
        elif item.type.name == "FLOAT32":  # a GGUF file holds float32; so does llama.cpp
            assert np.float32(ours) == np.float32(item.value), key
        else:
            assert ours == item.value, key


# ---- slmpkg's own graphs ---------------------------------------------------------------------------


def test_slmpkg_onnx_imports_to_the_source_weights_and_metadata(source):
    family, hf, onnx_dir = source
    ckpt = onnx_import.read(onnx_dir)
    reference = _canonical(hf)
    _assert_same_weights(ckpt, reference)
    _assert_same_model_metadata(ckpt, reference)
    # ranged reads (a few rows gathered from the stored [in, out] columns, or slabs) match the whole tensor
    q = next(t for t in ckpt.tensors if t.name == "blk.0.attn_q.weight")
    whole, row = q.raw(), q.nbytes // q.shape[0]
    for offset, nbytes in ((0, row), (3 * row + 8, 2 * row), (row, 100 * row), (q.nbytes - row - 4, row + 4)):
        assert np.array_equal(q.byte_range(offset, nbytes), whole[offset : offset + nbytes]), (offset, nbytes)
    # a .onnx file path reads the same as its directory
    again = onnx_import.read(onnx_dir / "model.onnx")
    assert [t.name for t in again.tensors] == [t.name for t in ckpt.tensors]


def test_onnx_to_safetensors_loads_in_transformers_with_every_source_weight(source, tmp_path):
    family, hf, onnx_dir = source
    out = tmp_path / "hf-again"
    result = run("convert", onnx_dir, "-o", out, "--to", "safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["format"] == "safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    assert set(ours) == set(theirs)
    tie = lambda d: json.loads((d / "config.json").read_text())["tie_word_embeddings"]  # noqa: E731
    assert tie(out) == tie(hf)  # a tied source comes back tied, though the graph holds lm_head too
    for name, value in theirs.items():
        assert ours[name].dtype == torch.float32, name  # f32 source → f32 output by default
        assert torch.equal(ours[name], value), name
    # the configuration (rope base, eps, heads) is right too: the same logits
    for prompt in PROMPTS:
        ids = _ids(hf, prompt)
        np.testing.assert_array_equal(_hf_outputs(out, ids, family), _hf_outputs(hf, ids, family))


def test_f16_onnx_gives_f16_weights_equal_to_the_source_rounded_once(source, tmp_path):
    family, hf, _ = source
    half = tmp_path / "onnx-f16"
    convert(hf, half, to="onnx", quant="f16", progress=False)
    out = tmp_path / "hf-f16"
    assert run("convert", half, "-o", out, "--to", "safetensors", "-q").exit_code == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"  # the source's float type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16).state_dict()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    for name, value in theirs.items():
        assert ours[name].dtype == torch.float16 and torch.equal(ours[name], value.half()), name
    gguf = tmp_path / "m.gguf"
    assert run("convert", half, "-o", gguf, "-q").exit_code == 0
    types = {t.name: t.qtype.name for t in gguf_format.read(gguf).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("precision", ["f32", "f16"])
@pytest.mark.parametrize("base", [500000.0, 1000000.0])
def test_rope_base_is_read_back_from_the_rotary_caches(source, tmp_path, base, precision):
    """Without config.json the base and a linear scaling come from cos_cache/sin_cache; per-frequency
    factors (Llama 3's rope_freqs), which the caches cannot tell from the base, are refused by name."""
    from gguf import GGUFValueType

    from slmpkg.checkpoint import LazyTensor, MetaValue
    from slmpkg.errors import FormatError
    from slmpkg.formats import onnx as onnx_format

    family, hf, _ = source
    canonical = _canonical(hf)
    arch = canonical.architecture
    canonical.metadata[f"{arch}.rope.freq_base"] = MetaValue(GGUFValueType.FLOAT32, base)
    plain = tmp_path / "plain"
    onnx_format.write(plain, canonical, precision)
    _graph_only(plain)
    assert onnx_import.read(plain).get(f"{arch}.rope.freq_base") == base
    canonical.metadata[f"{arch}.rope.scaling.type"] = MetaValue(GGUFValueType.STRING, "linear")
    canonical.metadata[f"{arch}.rope.scaling.factor"] = MetaValue(GGUFValueType.FLOAT32, 4.0)
    scaled = tmp_path / "scaled"
    onnx_format.write(scaled, canonical, precision)
    _graph_only(scaled)
    back = onnx_import.read(scaled)
    assert back.get(f"{arch}.rope.freq_base") == base
    assert back.get(f"{arch}.rope.scaling.type") == "linear" and back.get(f"{arch}.rope.scaling.factor") == 4.0
    del canonical.metadata[f"{arch}.rope.scaling.type"], canonical.metadata[f"{arch}.rope.scaling.factor"]
    head_dim = canonical.get(f"{arch}.embedding_length") // canonical.get(f"{arch}.attention.head_count")
    factors = architectures.llama3_rope_factors({"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": base}}, head_dim)
    canonical.tensors.append(LazyTensor.from_array("rope_freqs.weight", factors))
    per_frequency = tmp_path / "per-frequency"
    onnx_format.write(per_frequency, canonical, precision)
    _graph_only(per_frequency)
    if family != "llama":  # per-frequency factors only Llama 3 defines
        with pytest.raises(FormatError, match="cos_cache"):
            onnx_import.read(per_frequency)
        return
    back = onnx_import.read(per_frequency)  # Llama 3's parameters fitted to the caches
    assert back.get("llama.rope.freq_base") == base
    assert json.loads(back.get("slmpkg.rope_scaling")) == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}
    freqs = next(t for t in back.tensors if t.name == "rope_freqs.weight")
    assert np.array_equal(freqs.float32(), factors)


def test_onnx_gguf_onnx_keeps_every_initializer(source, tmp_path):
    family, hf, onnx_dir = source
    gguf = tmp_path / "m.gguf"
    assert run("convert", onnx_dir, "-o", gguf, "--quant", "F32", "-q").exit_code == 0
    assert gguf_format.read(gguf).architecture == architectures.family_for_hf(
        json.loads((hf / "config.json").read_text())).gguf_arch
    again = tmp_path / "onnx-again"
    result = run("convert", gguf, "-o", again, "--to", "onnx", "-q")
    assert result.exit_code == 0, result.output
    first = onnx.load(str(onnx_dir / "model.onnx"))
    second = onnx.load(str(again / "model.onnx"))
    a = {t.name: numpy_helper.to_array(t) for t in first.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in second.graph.initializer}
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_onnx_to_gguf_runs_in_llama_cpp_like_the_hf_source(source, tmp_path):
    pytest.importorskip("llama_cpp")
    from test_convert import _llama_logits

    family, hf, onnx_dir = source
    gguf = tmp_path / "q8.gguf"
    result = run("convert", onnx_dir, "-o", gguf, "--quant", "Q8_0", "-q")
    assert result.exit_code == 0, result.output
    direct = tmp_path / "direct-q8.gguf"
    convert(hf, direct, quant="Q8_0", progress=False)
    ids = _ids(hf, PROMPTS[0])
    # the same blocks as converting the HF source directly: llama.cpp computes the same logits
    np.testing.assert_array_equal(_llama_logits(gguf, ids), _llama_logits(direct, ids))
    ours = {t.name: t for t in gguf_format.read(gguf).tensors}
    for t in gguf_format.read(direct).tensors:
        assert t.qtype == ours[t.name].qtype and np.array_equal(t.raw(), ours[t.name].raw()), t.name


# ---- every family slmpkg's writer exports -----------------------------------------------------------


@pytest.fixture(scope="module", params=MORE_FAMILIES)
def family_source(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, HF directory, slmpkg's f32 ONNX export of it): the directory holds no config.json and the
    embedded one is removed, so every setting comes from the graph (and genai_config.json)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf = _source_model(root / "hf", family)
    onnx_dir = root / "onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Phi-3's window longer than the context
        convert(hf, onnx_dir, to="onnx", progress=False)
    assert not (onnx_dir / "config.json").exists()
    return family, hf, _graph_only(onnx_dir)


# the graph holds OpenELM's per-layer sizes, not the sizing rules its config.json derives them from: the
# import finds rules that give the same sizes (checked below), which need not be the source's
GRAPH_CANNOT_SAY = {"openelm": (architectures.HF_CONFIG_KEY,)}


def test_every_family_imports_to_the_source_weights_and_metadata(family_source):
    family, hf, onnx_dir = family_source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt, reference = onnx_import.read(onnx_dir), _canonical(hf)
    _assert_same_weights(ckpt, reference)
    _assert_same_model_metadata(ckpt, reference, GRAPH_CANNOT_SAY.get(family, ()))
    # nothing the source lacks, but the special ids genai_config.json always records (pad = eos)
    extra = set(ckpt.metadata) - set(reference.metadata)
    assert extra <= {"general.name", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"}, extra
    # what makes each family differ, named (the comparison above holds them, this says they are there)
    md = {k: v.value for k, v in ckpt.metadata.items()}
    if family == "mixtral":
        assert md["llama.expert_count"] == 4 and md["llama.expert_used_count"] == 2
    elif family == "phi3":
        assert md["phi3.rope.dimension_count"] == 48 and md["phi3.attention.sliding_window"] == 2047
    elif family == "phi3-longrope":
        assert md["phi3.rope.scaling.original_context_length"] == 256 and "phi3.rope.scaling.attn_factor" in md
    elif family == "gemma2":
        assert md["gemma2.attn_logit_softcapping"] == 5.0 and md["gemma2.final_logit_softcapping"] == 8.0
        assert list(md["gemma2.attention.sliding_window_pattern"]) == [True, False]
    elif family == "gemma3":
        assert md["gemma3.rope.freq_base_swa"] == 1e4 and md["gemma3.rope.scaling.factor"] == 8.0
    elif family == "granite":
        assert md["granite.residual_scale"] == 0.22 and md["granite.logit_scale"] == 8.0
    elif family == "phi2":  # LayerNorms with biases, partial rotary, lm_head's bias
        assert md["phi2.attention.layer_norm_epsilon"] == np.float32(1e-5) and md["phi2.rope.dimension_count"] == 32
        assert {"output.bias", "output_norm.bias", "blk.0.attn_norm.bias"} <= {t.name for t in ckpt.tensors}
    elif family == "starcoder2":
        assert md["starcoder2.rope.freq_base"] == 100000.0 and md["starcoder2.attention.head_count_kv"] == 2
    elif family == "openelm":
        import test_openelm

        config = test_openelm.CONFIG
        assert list(md["openelm.attention.head_count"]) == config["num_query_heads"]
        assert list(md["openelm.attention.head_count_kv"]) == config["num_kv_heads"]
        rules = json.loads(md[architectures.HF_CONFIG_KEY])
        shape = {k: config[k] for k in ("num_transformer_layers", "model_dim", "head_dim")}
        assert test_openelm._apple_sizes({**shape, **rules}) == (
            config["num_query_heads"], config["num_kv_heads"], list(md["openelm.feed_forward_length"]))


def test_every_family_onnx_to_safetensors_computes_the_source_logits(family_source, tmp_path):
    family, hf, onnx_dir = family_source
    out = tmp_path / "hf-again"
    result = run("convert", onnx_dir, "-o", out, "--to", "safetensors", "-q")
    assert result.exit_code == 0, result.output
    if family == "openelm":  # no transformers class: Apple's layout, every source tensor and size
        import test_openelm

        ours = {t.name: t for t in st_format.read(out).tensors}
        theirs = {t.name: t for t in st_format.read(hf).tensors}
        assert set(ours) == set(theirs)
        assert all(ours[n].qtype == t.qtype and np.array_equal(ours[n].raw(), t.raw()) for n, t in theirs.items())
        written, source = (json.loads((d / "config.json").read_text()) for d in (out, hf))
        assert test_openelm._apple_sizes(written) == test_openelm._apple_sizes(source)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], value), name
    ids = _ids(hf, PROMPTS[0])
    ref, got = _hf_outputs(hf, ids, family), _hf_outputs(out, ids, family)
    if family == "phi3-longrope":  # factors within an ulp (see _assert_same_weights): float32 noise at most
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * (ref.max() - ref.min()))
    else:
        np.testing.assert_array_equal(got, ref)


def test_every_family_onnx_to_f32_gguf_runs_in_llama_cpp_like_transformers(family_source, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")  # noqa: F841
    from test_convert import _llama_logits

    family, hf, onnx_dir = family_source
    gguf = tmp_path / "f32.gguf"
    result = run("convert", onnx_dir, "-o", gguf, "--quant", "F32", "-q")
    assert result.exit_code == 0, result.output
    written = gguf_format.read(gguf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _canonical(hf)  # an f32 source: F32 throughout, as the GGUF
    _assert_same_weights(written, reference)
    _assert_same_model_metadata(written, reference, GRAPH_CANNOT_SAY.get(family, ()))
    ids = _ids(hf, PROMPTS[0])
    ref, ours = _source_logits(hf, ids, family), _llama_logits(gguf, ids)
    assert np.abs(ours - ref).max() <= 1e-3 * (ref.max() - ref.min()), family


def test_every_family_f16_onnx_imports_to_the_source_rounded_once(family_source, tmp_path):
    """float16 graphs: the multipliers and caps (float16 constants), windows, rope bases and factors come
    back as the source says them; weights are the source's rounded to float16 once. LongRoPE factors
    are only as precise as float16 caches (about 3e-4)."""
    family, hf, _ = family_source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _canonical(hf)
        half = tmp_path / "onnx-f16"
        convert(hf, half, to="onnx", quant="f16", progress=False)
        ckpt = onnx_import.read(half)
    _assert_same_model_metadata(ckpt, reference)
    ours = {t.name: t for t in ckpt.tensors}
    assert set(ours) == {t.name for t in reference.tensors}
    for t in reference.tensors:
        expected = t.float32().astype(np.float16).astype(np.float32)
        if t.name.startswith("rope_factors_"):
            np.testing.assert_allclose(ours[t.name].float32(), t.float32(), rtol=5e-4)
        else:
            assert np.array_equal(ours[t.name].float32(), expected), t.name


def _ort_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """onnxruntime's logits for ``ids`` with an empty cache (f32 graph)."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    return session.run(["logits"], feed)[0][0]


def test_every_family_int4_onnx_runs_in_llama_cpp_like_onnxruntime(family_source, tmp_path):
    """MatMulNBits linears (Phi-3's fused ones too; Mixtral's router and experts stay float) come back as
    Q4_0 blocks of exactly the weights onnxruntime computes with: dequantized to F32 (so llama.cpp does
    not round activations to Q8_0), llama.cpp's logits are onnxruntime's on the int4 graph.

    Gemma 1/2 and OpenELM are the exception by design: llama.cpp's graph reads the embedding as the output
    matrix, so the float embedding is the head, not the graph's int4 copy of it (about 3% of the logit span
    apart)."""
    pytest.importorskip("llama_cpp")
    from test_convert import _llama_logits

    from slmpkg.checkpoint import Checkpoint
    from slmpkg.quant import QuantType

    family, hf, _ = family_source
    int4 = tmp_path / "onnx-int4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(hf, int4, to="onnx", quant="int4", progress=False)
        ckpt = onnx_import.read(int4)
    types = {t.name: t.qtype for t in ckpt.tensors}
    fused = "blk.0.attn_qkv.weight" if family.startswith(("phi3", "phi4", "openelm")) else "blk.0.attn_q.weight"
    assert types[fused] is QuantType.Q4_0 and types["blk.0.attn_norm.weight"] is QuantType.F32
    if family == "mixtral":
        assert types["blk.0.ffn_gate_exps.weight"] is QuantType.F32 and types["blk.0.ffn_gate_inp.weight"] is QuantType.F32
    if family in ("gemma", "gemma2", "openelm"):
        assert "output.weight" not in types and types["token_embd.weight"] is QuantType.F32
        return
    dequantized = Checkpoint(ckpt.metadata, [t if t.qtype is QuantType.F32 else t.converted(QuantType.F32)
                                             for t in ckpt.tensors], sidecar={})
    gguf = tmp_path / "from-int4-F32.gguf"
    gguf_format.write(gguf, dequantized)
    ids = _ids(hf, PROMPTS[0])
    ref, ours = _ort_logits(int4, ids), _llama_logits(gguf, ids)
    assert np.abs(ours - ref).max() <= 2e-3 * (ref.max() - ref.min()), family


def test_mistral_window_comes_back_from_the_attention_nodes(tmp_path):
    """slmpkg writes Mistral as llama; GroupQueryAttention's local_window_size carries the window back
    (llama.cpp's llama graph ignores it; runtimes that honour it find it in the GGUF)."""
    from gguf import GGUFValueType

    from slmpkg.checkpoint import MetaValue
    from slmpkg.formats import onnx as onnx_format

    canonical = _canonical(_hf_model(tmp_path / "hf", "mistral"))
    assert canonical.get("llama.attention.sliding_window") is None
    canonical.metadata["llama.attention.sliding_window"] = MetaValue(GGUFValueType.UINT32, 4)
    onnx_format.write(tmp_path / "onnx", canonical)
    _graph_only(tmp_path / "onnx")
    with pytest.warns(UserWarning, match="sliding_window=4"):  # from_hf's warning: llama.cpp attends to all
        ckpt = onnx_import.read(tmp_path / "onnx")
    assert ckpt.get("llama.attention.sliding_window") == 4


def test_longrope_base_and_exact_factors_from_the_config_the_writer_embeds(tmp_path):
    """LongRoPE's caches fix base^(-2j/d) / factor_j, not the base and factors apart: without help the
    import assumes Phi-3's base 10000 (wrong here) and gets factors within an ulp; the model's config.json,
    which the writer stores as a model property, gives both exactly."""
    from gguf import GGUFValueType

    from slmpkg.checkpoint import MetaValue
    from slmpkg.formats import onnx as onnx_format

    hf = _hf_model(tmp_path / "hf", "phi3-longrope")
    canonical = _canonical(hf)
    canonical.metadata["phi3.rope.freq_base"] = MetaValue(GGUFValueType.FLOAT32, 20000.0)
    onnx_dir = tmp_path / "onnx"
    onnx_format.write(onnx_dir, canonical)
    ckpt = onnx_import.read(onnx_dir)
    assert ckpt.get("phi3.rope.freq_base") == 20000.0
    ours, ref = ({t.name: t for t in c.tensors} for c in (ckpt, canonical))
    assert set(ours) == set(ref)
    for name in ref:
        assert np.array_equal(ours[name].float32(), ref[name].float32()), name
    for key, item in canonical.metadata.items():  # this directory has no tokenizer files: the model's keys
        if key.startswith("phi3.") or key == "slmpkg.rope_scaling":
            same = np.float32 if item.type.name == "FLOAT32" else (lambda v: v)
            assert same(ckpt.get(key)) == same(item.value), key
    guessed = onnx_import.read(_graph_only(onnx_dir))
    assert guessed.get("phi3.rope.freq_base") == 10000.0  # the graph alone cannot say 20000


@pytest.mark.parametrize("family", FAMILIES + ["llama3-rope"] + MORE_FAMILIES)
def test_every_family_imports_exactly_with_the_config_the_writer_embeds(family, tmp_path):
    """With the embedded config.json every weight and key comes back exactly (LongRoPE's factors, OpenELM's
    sizing rules too)."""
    hf = _source_model(tmp_path / "hf", family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Phi-3's window longer than the context
        convert(hf, tmp_path / "onnx", to="onnx", progress=False)
        ckpt, reference = onnx_import.read(tmp_path / "onnx"), _canonical(hf)
    ours = {t.name: t for t in ckpt.tensors}
    assert set(ours) == {t.name for t in reference.tensors}
    for t in reference.tensors:
        assert ours[t.name].qtype == t.qtype and np.array_equal(ours[t.name].float32(), t.float32()), t.name
    _assert_same_model_metadata(ckpt, reference)


# Llama 3.2's rope scaling (1B/3B): factor 32 past an original context of 8192
LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


@pytest.mark.parametrize("rope", ["llama3.1-shaped", "llama3.2"])
@pytest.mark.parametrize("precision", ["f32", "f16"])
@pytest.mark.parametrize("config", ["embedded", "graph only"])
def test_llama3_onnx_to_gguf_without_config_beside_it(tmp_path, rope, precision, config):
    """A Llama 3.x ONNX directory with no config.json beside it becomes the GGUF made from the HF source:
    the rope parameters from the config the writer embeds, or (a graph another tool wrote) fitted to the
    rotary caches, which hold every frequency divided by its Llama 3 factor."""
    hf = _hf_model(tmp_path / "hf", "llama3-rope")
    if rope == "llama3.2":
        cfg = json.loads((hf / "config.json").read_text())
        cfg["rope_parameters"] = LLAMA32_ROPE
        (hf / "config.json").write_text(json.dumps(cfg))
    onnx_dir = tmp_path / "onnx"
    convert(hf, onnx_dir, to="onnx", quant=precision, progress=False)
    if config == "graph only":
        _graph_only(onnx_dir)
    assert not (onnx_dir / "config.json").exists()
    gguf, direct = tmp_path / "m.gguf", tmp_path / "direct.gguf"
    result = run("convert", onnx_dir, "-o", gguf, "--quant", "F32", "-q")
    assert result.exit_code == 0, result.output
    convert(hf, direct, quant="F32", progress=False)
    ours, ref = gguf_format.read(gguf), gguf_format.read(direct)
    for key in ("slmpkg.rope_scaling", "llama.rope.freq_base", "llama.rope.dimension_count", "llama.context_length"):
        assert ours.get(key) == ref.get(key), key
    mine = {t.name: t for t in ours.tensors}
    for t in ref.tensors:
        expected = t.float32() if precision == "f32" or t.name == "rope_freqs.weight" else \
            t.float32().astype(np.float16).astype(np.float32)
        assert np.array_equal(mine[t.name].float32(), expected), t.name
    if precision == "f32":  # the same GGUF tensors: llama.cpp computes the same logits
        from test_convert import _llama_logits

        ids = _ids(hf, PROMPTS[0])
        np.testing.assert_array_equal(_llama_logits(gguf, ids), _llama_logits(direct, ids))


# ---- onnxruntime-genai's builder -------------------------------------------------------------------


def _genai_build(hf: Path, out: Path, precision: str = "fp32", extra: Sequence[str] = ()) -> Path:
    pytest.importorskip("onnxruntime_genai")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache"), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # the builder re-saves the tokenizer through transformers, which may add an unknown token past the
    # embedding (Qwen2Tokenizer adds <|endoftext|>, absent from this tiny vocabulary): keep the source's
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, out / name)
    return out


def test_genai_builder_graph_imports_to_the_source_weights(hf_source, tmp_path):
    family, hf = hf_source
    built = _genai_build(hf, tmp_path / "genai")
    graph = onnx.load(str(built / "model.onnx"), load_external_data=False)
    names = {t.name for t in graph.graph.initializer}
    assert "model.layers.0.attn.qkv_proj.MatMul.weight" in names  # the fused projection is exercised
    ckpt = onnx_import.read(built)
    reference = _canonical(hf)
    _assert_same_weights(ckpt, reference)  # tied sources stay tied (Transpose → Gather)
    _assert_same_model_metadata(ckpt, reference)
    out = tmp_path / "hf-again"
    assert run("convert", built, "-o", out, "--to", "safetensors", "-q").exit_code == 0
    ids = _ids(hf, PROMPTS[1])
    np.testing.assert_array_equal(_hf_outputs(out, ids, family), _hf_outputs(hf, ids, family))


@pytest.mark.parametrize("family", ["mistral", "phi3", "phi2", "gemma2", "granite"])
def test_genai_builder_graphs_of_more_families_import_to_the_source(family, tmp_path):
    """The builder's own layout of these families: Phi-3 with separate gate/up (fused back for llama.cpp),
    Phi-2's LayerNorms with biases, fused biased q/k/v and fc1/fc2, Gemma 2 with HF's sandwich-norm names,
    Granite's residual multiplier on the skip input and its logits multiplied by 1/scale. Phi-3's window is
    left out: the builder writes none for a window longer than the context (llama.cpp's phi3 ignores it
    anyway). Phi-2's epsilon is the graph's: the builder (0.18.0) reads ``rms_norm_eps``, which PhiConfig
    lacks, and writes its default 1e-6 where the model says ``layer_norm_eps`` = 1e-5."""
    hf = _hf_model(tmp_path / "hf", family)
    built = _genai_build(hf, tmp_path / "genai")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt, reference = onnx_import.read(built), _canonical(hf)
    _assert_same_weights(ckpt, reference)
    if family == "phi3":
        del reference.metadata["phi3.attention.sliding_window"]
    ignored = ()
    if family == "phi2":
        assert ckpt.get("phi2.attention.layer_norm_epsilon") == np.float32(1e-6)
        ignored = ("phi2.attention.layer_norm_epsilon",)
    _assert_same_model_metadata(ckpt, reference, ignored)


def _nbits_weight(graph, node) -> np.ndarray:
    """The float W [N, K] onnxruntime computes with for one MatMulNBits node: identity input, exact
    arithmetic (accuracy_level 0), the node's own initializers."""
    ort = pytest.importorskip("onnxruntime")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n = attrs["K"], attrs["N"]
    inits = [t for t in graph.initializer if t.name in node.input[1:]]
    single = helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", *node.input[1:]], ["y"], domain="com.microsoft",
                          **{**attrs, "accuracy_level": 0})],
        "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])], inits)
    model = helper.make_model(single, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)})[0].T


INT4 = {
    # the builder's default: symmetric, block 32 → Q4_0, each weight level × fp16(scale)
    "sym-bs32": ([], 32, "Q4_0"),
    # asymmetric (uint8 zero points), block 64 → Q4_1 (m = -zp × scale), each scale repeated per 32
    "asym-bs64": (["--extra_options", "block_size=64", "is_symmetric=false"], 64, "Q4_1"),
}


@pytest.mark.parametrize("variant", sorted(INT4))
def test_genai_int4_graph_imports_as_ggml_blocks_of_the_weights_onnxruntime_computes(hf_source, tmp_path, variant):
    """The builder's int4 MatMulNBits → Q4_0 / Q4_1 blocks, exact up to the fp16 rounding of the scales
    (and of the minimums), checked against the weights onnxruntime itself computes with."""
    family, hf = hf_source
    extra, block, qtype = INT4[variant]
    tied = json.loads((hf / "config.json").read_text()).get("tie_word_embeddings", family == "gemma")
    if variant.startswith("asym") and tied:
        # measured with onnxruntime-genai 0.18.0: its asymmetric tied embedding gathers from lm_head's float
        # weight reshaped as uint8, without scales, and onnxruntime refuses to load the graph
        pytest.skip("onnxruntime-genai writes an invalid graph for asymmetric int4 with tied embeddings")
    built = _genai_build(hf, tmp_path / "genai-int4", "int4", extra)
    graph = onnx.load(str(built / "model.onnx")).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all(helper.get_attribute_value(a) == block for n in nodes for a in n.attribute if a.name == "block_size")
    out = tmp_path / "hf-again"
    assert run("convert", built, "-o", out, "--to", "safetensors", "-q").exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    config = json.loads((hf / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    for node in nodes:
        w = _nbits_weight(graph, node)
        scales = next(numpy_helper.to_array(t) for t in graph.initializer if t.name == node.input[2])
        scales = np.repeat(scales.reshape(w.shape[0], -1), block, axis=1)[:, : w.shape[1]]
        levels = np.rint(w / scales)  # level - zero point: onnxruntime computes float(B - zp) × scale
        assert np.array_equal(levels * scales, w) and np.abs(levels).max() <= 15
        if qtype == "Q4_0":
            expected = levels.astype(np.float32) * scales.astype(np.float16).astype(np.float32)
            same = lambda ours, ref: np.array_equal(ours, ref)  # noqa: E731
        else:
            # Q4_1 holds d = fp16(scale) and m = fp16(-zp × scale): each within half an fp16 ulp
            expected = w
            bound = 32 * np.abs(scales) * 2.0**-11
            same = lambda ours, ref, bound=bound: bool((np.abs(ours - ref) <= bound[: len(ref)]).all())  # noqa: E731
        parts = node.name.split("/")
        if parts[1] == "lm_head":
            pieces = {"lm_head.weight": expected}
        else:
            layer, proj = int(parts[2].split(".")[1]), parts[4]
            prefix = f"model.layers.{layer}." + ("self_attn." if parts[3] == "attn" else "mlp.")
            if proj == "qkv_proj":
                pieces = {prefix + "q_proj.weight": expected[:q], prefix + "k_proj.weight": expected[q : q + kv],
                          prefix + "v_proj.weight": expected[q + kv :]}
            else:
                pieces = {prefix + f"{proj}.weight": expected}
        for name, value in pieces.items():
            assert same(state[name].numpy(), value), name
    # GGUF output keeps the blocks (no second rounding), and llama.cpp runs it
    gguf = tmp_path / "int4.gguf"
    assert run("convert", built, "-o", gguf, "-q").exit_code == 0
    types = {t.name: t.qtype.name for t in gguf_format.read(gguf).tensors}
    assert {v for k, v in types.items() if k.endswith(("attn_q.weight", "ffn_down.weight"))} == {qtype}
    # ... and back to ONNX (blocks carried into MatMulNBits): onnxruntime computes with the same weights
    again = tmp_path / "onnx-again"
    result = run("convert", gguf, "-o", again, "--to", "onnx", "-q")
    assert result.exit_code == 0, result.output
    graph_again = onnx.load(str(again / "model.onnx")).graph
    carried = [n for n in graph_again.node if n.op_type == "MatMulNBits"]
    assert len(carried) >= len(nodes)
    for node in carried:
        w = _nbits_weight(graph_again, node)
        parts = node.name.split("/")  # /model/layers.0/attn/q_proj/MatMulNBits, /lm_head/MatMulNBits
        if parts[1] == "lm_head":
            name = "lm_head.weight"
        else:
            layer, proj = int(parts[2].split(".")[1]), parts[4]
            name = f"model.layers.{layer}." + ("self_attn." if parts[3] == "attn" else "mlp.") + f"{proj}.weight"
            if proj in ("q_proj", "k_proj") and config["model_type"] == "llama":  # slmpkg keeps llama.cpp's row order
                w = architectures.unpermute_qk(w, config["num_attention_heads" if proj == "q_proj" else "num_key_value_heads"])
        ref_w = state[name].numpy()
        if qtype == "Q4_0":  # Q4_0 maps onto MatMulNBits exactly
            assert np.array_equal(w, ref_w), name
        else:  # Q4_1's minimum becomes a float zero point: float32 rounding of the block's terms
            assert np.abs(w - ref_w).max() <= 2 * np.spacing(np.abs(ref_w).max()), name
    pytest.importorskip("llama_cpp")
    from test_convert import _llama_logits

    ids = _ids(hf, PROMPTS[0])
    ref = _hf_outputs(out, ids, family)  # transformers on the same (dequantized) weights
    ours = _llama_logits(gguf, ids)
    assert np.abs(ours - ref).max() <= 0.02 * (ref.max() - ref.min())


@pytest.mark.parametrize("mins", ["float-zero-points", "exact-mins"])
def test_blocks_slmpkg_carried_from_q4_k_m_come_back_with_the_gguf_values(source, tmp_path, mins):
    """Q4_K_M GGUF → ONNX (blocks carried into MatMulNBits) → GGUF: what ggml's 32-value blocks can hold
    comes back as Q4_1 (within the fp16 rounding of scale and minimum); 16-value blocks (Q6_K) and
    exact min terms come back as F32 equal to the source GGUF's dequantized values bit for bit."""
    family, hf, _ = source
    km = tmp_path / "km.gguf"
    convert(hf, km, quant="Q4_K_M", progress=False)
    carried = tmp_path / "carried"
    assert run("convert", km, "-o", carried, "--to", "onnx", "-q",
               *(["--exact-mins"] if mins == "exact-mins" else [])).exit_code == 0
    back = tmp_path / "back.gguf"
    result = run("convert", carried, "-o", back, "-q")
    assert result.exit_code == 0, result.output
    ours = {t.name: t for t in gguf_format.read(back).tensors}
    kinds = set()
    for t in gguf_format.read(km).tensors:
        a, b = t.float32(), ours[t.name].float32()
        kinds.add((t.qtype.name, ours[t.name].qtype.name))
        if ours[t.name].qtype.name == "F32":
            assert np.array_equal(a, b), t.name
        else:
            assert ours[t.name].qtype.name == "Q4_1" and mins == "float-zero-points", t.name
            assert np.abs(a - b).max() <= 2**-9 * np.abs(a).max(), t.name
    assert ("Q6_K", "F32") in kinds and (("Q4_K", "Q4_1") in kinds) == (mins == "float-zero-points")


# ---- optimum-style graphs --------------------------------------------------------------------------


def _optimum_style(hf: Path, out: Path, merged: bool = False) -> Path:
    """A graph laid out as optimum's torch export names things: linear weights are anonymous
    ``onnx::MatMul_N`` initializers holding W transposed, found only through their node's scope;
    norms are ``Mul`` by HF-named weights after a decomposed RMS norm; biases are ``Add`` of HF-named
    tensors; rotary is plain math (HF's half-split layout). config.json and the tokenizer sit beside.
    ``merged``: optimum's merged decoder in the Hugging Face layout, ``onnx/decoder_model_merged.onnx``
    running the model in both branches of an ``If`` that read the main graph's initializers."""
    out.mkdir()
    sd = {k: v.float().numpy() for k, v in transformers.AutoModelForCausalLM.from_pretrained(hf).state_dict().items()}
    config = json.loads((hf / "config.json").read_text())
    inits: list = []
    nodes: list = []
    counter = iter(range(100, 10**6))

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def rms(x: str, weight: str, scope: str) -> str:
        eps = init(f"onnx::Add_{next(counter)}", np.array(config["rms_norm_eps"], np.float32))
        two = init(f"onnx::Pow_{next(counter)}", np.array(2.0, np.float32))
        nodes.append(helper.make_node("Pow", [x, two], [f"{scope}/Pow_output_0"], name=f"{scope}/Pow"))
        nodes.append(helper.make_node("ReduceMean", [f"{scope}/Pow_output_0"], [f"{scope}/ReduceMean_output_0"],
                                      name=f"{scope}/ReduceMean", axes=[-1], keepdims=1))
        nodes.append(helper.make_node("Add", [f"{scope}/ReduceMean_output_0", eps], [f"{scope}/Add_output_0"], name=f"{scope}/Add"))
        nodes.append(helper.make_node("Sqrt", [f"{scope}/Add_output_0"], [f"{scope}/Sqrt_output_0"], name=f"{scope}/Sqrt"))
        nodes.append(helper.make_node("Div", [x, f"{scope}/Sqrt_output_0"], [f"{scope}/Div_output_0"], name=f"{scope}/Div"))
        if config["model_type"] == "gemma":  # Gemma's RMSNorm scales by (1 + weight)
            one = init(f"onnx::Add_{next(counter)}", np.array(1.0, np.float32))
            nodes.append(helper.make_node("Add", [weight, one], [f"{scope}/Add_1_output_0"], name=f"{scope}/Add_1"))
            weight = f"{scope}/Add_1_output_0"
        nodes.append(helper.make_node("Mul", [weight, f"{scope}/Div_output_0"], [f"{scope}/Mul_output_0"], name=f"{scope}/Mul"))
        return f"{scope}/Mul_output_0"

    def linear(x: str, hf_name: str, scope: str) -> str:
        w = init(f"onnx::MatMul_{next(counter)}", sd[f"{hf_name}.weight"].T)
        y = f"{scope}/MatMul_output_0"
        nodes.append(helper.make_node("MatMul", [x, w], [y], name=f"{scope}/MatMul"))
        if f"{hf_name}.bias" in sd:
            b = init(f"{hf_name}.bias", sd[f"{hf_name}.bias"])
            nodes.append(helper.make_node("Add", [b, y], [f"{scope}/Add_output_0"], name=f"{scope}/Add"))
            y = f"{scope}/Add_output_0"
        return y

    embed = init("model.embed_tokens.weight", sd["model.embed_tokens.weight"])
    nodes.append(helper.make_node("Gather", [embed, "input_ids"], ["/model/embed_tokens/Gather_output_0"],
                                  name="/model/embed_tokens/Gather"))
    hidden = "/model/embed_tokens/Gather_output_0"
    outputs = []
    for i in range(config["num_hidden_layers"]):
        p, s = f"model.layers.{i}", f"/model/layers.{i}"
        x = rms(hidden, init(f"{p}.input_layernorm.weight", sd[f"{p}.input_layernorm.weight"]), f"{s}/input_layernorm")
        heads = []
        for proj in ("q_proj", "k_proj", "v_proj"):
            y = linear(x, f"{p}.self_attn.{proj}", f"{s}/self_attn/{proj}")
            if proj in ("q_proj", "k_proj") and f"{p}.self_attn.q_norm.weight" in sd:
                norm = proj[0] + "_norm"
                y = rms(y, init(f"{p}.self_attn.{norm}.weight", sd[f"{p}.self_attn.{norm}.weight"]), f"{s}/self_attn/{norm}")
            heads.append(y)
        outputs += heads[1:]
        # attention itself is not what the import reads; q stands in for its output
        attn = linear(heads[0], f"{p}.self_attn.o_proj", f"{s}/self_attn/o_proj")
        nodes.append(helper.make_node("Add", [hidden, attn], [f"{s}/Add_output_0"], name=f"{s}/Add"))
        hidden = f"{s}/Add_output_0"
        x = rms(hidden, init(f"{p}.post_attention_layernorm.weight", sd[f"{p}.post_attention_layernorm.weight"]),
                f"{s}/post_attention_layernorm")
        gate = linear(x, f"{p}.mlp.gate_proj", f"{s}/mlp/gate_proj")
        up = linear(x, f"{p}.mlp.up_proj", f"{s}/mlp/up_proj")
        nodes.append(helper.make_node("Mul", [gate, up], [f"{s}/mlp/Mul_output_0"], name=f"{s}/mlp/Mul"))
        down = linear(f"{s}/mlp/Mul_output_0", f"{p}.mlp.down_proj", f"{s}/mlp/down_proj")
        nodes.append(helper.make_node("Add", [hidden, down], [f"{s}/Add_1_output_0"], name=f"{s}/Add_1"))
        hidden = f"{s}/Add_1_output_0"
    x = rms(hidden, init("model.norm.weight", sd["model.norm.weight"]), "/model/norm")
    w = init(f"onnx::MatMul_{next(counter)}", sd["lm_head.weight"].T)
    nodes.append(helper.make_node("MatMul", [x, w], ["logits"], name="/lm_head/MatMul"))
    value = lambda o, tag="": helper.make_tensor_value_info(  # noqa: E731
        o + tag, TensorProto.FLOAT, ["batch_size", "sequence_length", f"{o}_width"])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    model_file = out / "model.onnx"
    if merged:
        produced = {o for n in nodes for o in n.output}

        def branch(tag: str):
            copies = []
            for n in nodes:
                c = onnx.NodeProto()
                c.CopyFrom(n)
                c.input[:] = [i + tag if i in produced else i for i in n.input]
                c.output[:] = [o + tag for o in n.output]
                copies.append(c)
            return helper.make_graph(copies, f"branch{tag}", [], [value(o, tag) for o in ["logits"] + outputs])

        nodes = [helper.make_node("If", ["use_cache_branch"], ["logits"] + outputs, name="optimum::if",
                                  then_branch=branch("_with_past"), else_branch=branch("_without_past"))]
        inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
        (out / "onnx").mkdir()
        model_file = out / "onnx" / "decoder_model_merged.onnx"
    graph = helper.make_graph(nodes, "main_graph", inputs, [value(o) for o in ["logits"] + outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch")
    onnx.checker.check_model(model)
    onnx.save_model(model, str(model_file), save_as_external_data=True, location=model_file.name + "_data",
                    size_threshold=1024)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (hf / name).exists():
            shutil.copy(hf / name, out / name)
    return out


@pytest.mark.parametrize("merged", [False, True], ids=["model", "merged-decoder"])
def test_optimum_style_graph_imports_to_the_source_weights(hf_source, tmp_path, merged):
    family, hf = hf_source
    exported = _optimum_style(hf, tmp_path / "optimum", merged)
    model_file = exported / ("onnx/decoder_model_merged.onnx" if merged else "model.onnx")
    graph = onnx.load(str(model_file), load_external_data=False)
    assert any(t.name.startswith("onnx::MatMul_") for t in graph.graph.initializer)
    if merged:
        assert [n.op_type for n in graph.graph.node] == ["If"]  # every weight is read inside the branches
        assert [t.name for t in onnx_import.read(model_file).tensors] == [t.name for t in onnx_import.read(exported).tensors]
    ckpt = onnx_import.read(exported)
    reference = _canonical(hf)
    _assert_same_weights(ckpt, reference)
    _assert_same_model_metadata(ckpt, reference)
    out = tmp_path / "m.gguf"
    assert run("convert", exported, "-o", out, "-q").exit_code == 0  # *.gguf output: GGUF by default
    assert {t.name for t in gguf_format.read(out).tensors} >= {t.name for t in reference.tensors}


def test_a_weight_whose_scope_names_no_projection_is_refused(source, tmp_path):
    family, hf, _ = source
    exported = _optimum_style(hf, tmp_path / "optimum")
    model = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.name == "/model/layers.1/mlp/up_proj/MatMul")
    node.name = "/model/layers.1/mlp/MatMul_7"
    weight = node.input[1]
    (exported / "model.onnx").write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    result = run("convert", exported, "-o", out, "--to", "safetensors")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "MatMul_7" in lines[0] and weight in lines[0], result.output
    assert not out.exists()


# ---- bad input -------------------------------------------------------------------------------------


def _rewrite_location(model_dir: Path, location: str) -> str:
    """Point the largest external initializer at ``location``; returns its name."""
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    tensor = max(external, key=lambda t: int(np.prod(t.dims)))
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    (model_dir / "model.onnx").write_bytes(model.SerializeToString())
    return tensor.name


def _bad(tmp_path: Path, onnx_dir: Path, damage) -> tuple[Path, str]:
    bad = tmp_path / "outer" / "bad-model"
    shutil.copytree(onnx_dir, bad)
    return bad, damage(bad)


def _outside_copy(bad: Path) -> str:
    shutil.copy(bad / "model.onnx.data", bad.parent / "model.onnx.data")  # present, but outside
    return _rewrite_location(bad, "../model.onnx.data")


def _absolute(bad: Path) -> str:
    return _rewrite_location(bad, str((bad / "model.onnx.data").resolve()))


def _symlink_out(bad: Path) -> str:
    shutil.copy(bad / "model.onnx.data", bad.parent / "elsewhere.data")
    (bad / "inside.data").symlink_to(bad.parent / "elsewhere.data")
    return _rewrite_location(bad, "inside.data")


def _missing(bad: Path) -> str:
    return _rewrite_location(bad, "nowhere.data")


def _short(bad: Path) -> str:
    data = bad / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    return "model.onnx.data"


def _not_protobuf(bad: Path) -> str:
    (bad / "model.onnx").write_bytes(b"\xff\xff\xff\xff this is not a protobuf message \x00\x01")
    return "not an ONNX model"


def _empty_model(bad: Path) -> str:
    (bad / "model.onnx").write_bytes(b"")
    return "not an ONNX model"


BAD = {
    "dotdot": (_outside_copy, "leaves the model directory"),
    "absolute": (_absolute, "is an absolute path"),
    "symlink-out": (_symlink_out, "leaves the model directory"),
    "missing-file": (_missing, "is missing"),
    "short-data": (_short, "shorter than"),
    "not-protobuf": (_not_protobuf, "protobuf does not parse"),
    "empty-file": (_empty_model, "no graph nodes"),
}


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory) -> Path:
    """One family is enough for the input checks."""
    root = tmp_path_factory.mktemp("bad")
    onnx_dir = root / "onnx"
    convert(_hf_model(root / "hf", "llama"), onnx_dir, to="onnx", progress=False)
    return onnx_dir


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("to", ["safetensors", "gguf"])
def test_bad_onnx_input_is_one_line_and_leaves_nothing(llama_onnx, tmp_path, case, to):
    onnx_dir = llama_onnx
    damage, problem = BAD[case]
    bad, detail = _bad(tmp_path, onnx_dir, damage)
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    result = run("convert", bad, "-o", out, "--to", to)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slmpkg: error: "), result.output
    assert str(bad / "model.onnx") in lines[0] and problem in lines[0] and detail in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial sibling either


def test_onnx_to_onnx_is_a_usage_error(llama_onnx, tmp_path):
    onnx_dir = llama_onnx
    result = run("convert", onnx_dir, "-o", tmp_path / "again", "--to", "onnx")
    assert result.exit_code != 0 and "already ONNX" in result.output
    assert not (tmp_path / "again").exists()
