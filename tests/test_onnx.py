"""ONNX export, proved by the runtime: onnxruntime computes what transformers computes.

Tiny random models of every decoder family (tests/test_convert.py's builders, plus variants with a
sliding window short enough to slide over the prompts) → ``architectures.from_hf`` → ``onnx.write`` →
an onnxruntime CPU session: the prompt's logits (no past) and one more decoding step fed with
``present.*`` as ``past_key_values.*`` match transformers' logits for the same prompt and the same
step taken with transformers' own KV cache.
"""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from gguf import GGUFValueType
from slmpkg.formats import onnx as onnx_format
from slmpkg.formats import safetensors as st_format

from slmpkg import architectures
from slmpkg.checkpoint import Checkpoint, MetaValue
from slmpkg.errors import FormatError, UsageError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import test_convert  # noqa: E402
from test_convert import LONGROPE_ORIGINAL, PROMPTS, _hf_model, _ids  # noqa: E402

# a window shorter than every prompt (7-10 tokens), so it slides in the prompt and in the step
WINDOW = 4
# families test_convert.py does not build: (its family, config changes); same seed, so same weights
VARIANTS = {
    "mistral-window": ("mistral", {"sliding_window": WINDOW}),
    "phi3-window": ("phi3", {"sliding_window": WINDOW}),
}
FAMILIES = ["llama", "llama-tied", "llama3-rope", "mistral", "mistral-window", "qwen2", "qwen3", "phi3",
            "phi3-window", "phi3-longrope", "phi4-mini", "gemma", "gemma2", "gemma3", "gemma3-mm", "granite", "mixtral",
            "mixtral-fused"]
# families whose q/k rows are GGUF-permuted (llama.cpp's llama graph) → GQA rotary_interleaved=1
INTERLEAVED = {"llama", "llama-tied", "llama3-rope", "mistral", "mistral-window", "granite", "mixtral", "mixtral-fused"}
GENAI_TYPES = {"phi4-mini": "phi3", "mixtral": "decoder", "mixtral-fused": "decoder", "gemma3": "gemma3_text", "gemma3-mm": "gemma3_text"}
TOLERANCE = {"f32": 1e-4, "f16": 5e-3}  # × the reference logits' range (measured: ~1e-6 at f32, ~1e-3 at f16)


def _register_simplified_layer_norm() -> None:
    """onnx's checker rejects ops of the default domain it has no schema for; SimplifiedLayerNormalization
    is onnxruntime's (registered in the default domain, opset 1). Register its schema as onnxruntime
    declares it, so check_model validates the rest of the graph."""
    from onnx.defs import OpSchema, has

    if has("SimplifiedLayerNormalization"):
        return
    floats = ["tensor(float16)", "tensor(float)", "tensor(double)", "tensor(bfloat16)"]
    schema = OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "V")],
        outputs=[OpSchema.FormalParameter("Y", "V"),
                 OpSchema.FormalParameter("inv_std_var", "U", param_option=OpSchema.FormalParameterOption.Optional)],
        type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
        attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, "", required=False),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False),
                    OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "", required=False)],
    )
    onnx.defs.register_schema(schema)


def _model(path: Path, family: str) -> Path:
    """test_convert's tiny model of ``family``, or of a variant's base family with its config changes."""
    if family not in VARIANTS:
        return _hf_model(path, family)
    base, changes = VARIANTS[family]
    make_config = test_convert._config

    def config(name, vocab_size, tokenizer):
        cfg = make_config(name, vocab_size, tokenizer)
        for key, value in changes.items():
            setattr(cfg, key, value)
        return cfg

    with mock.patch.object(test_convert, "_config", config):
        return _hf_model(path, base)


def _canonical(src: Path, family: str) -> Checkpoint:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_hf warns that llama.cpp ignores Phi-3's short window
        ckpt = architectures.from_hf(st_format.read(src))
    if family == "mistral-window" and "llama.attention.sliding_window" not in ckpt.metadata:
        # from_hf does not record Mistral's window (llama.cpp's llama graph has none); add the key it
        # records for Phi-3 and Mixtral, which the ONNX writer reads
        ckpt.metadata["llama.attention.sliding_window"] = MetaValue(GGUFValueType.UINT32, WINDOW)
    return ckpt


class _Models:
    """Tiny HF models, their transformers instances and ONNX exports, built once per module."""

    def __init__(self, tmp_path_factory):
        self.tmp, self.src, self.hf, self.exports = tmp_path_factory, {}, {}, {}

    def source(self, family: str) -> Path:
        if family not in self.src:
            self.src[family] = _model(self.tmp.mktemp(family), family)
        return self.src[family]

    def reference(self, family: str):
        if family not in self.hf:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.hf[family] = transformers.AutoModelForCausalLM.from_pretrained(
                    self.source(family), dtype=torch.float32, attn_implementation="eager")
        return self.hf[family]

    def export(self, family: str, precision: str = "f32") -> list[Path]:
        key = (family, precision)
        if key not in self.exports:
            out = self.tmp.mktemp(f"{family}-{precision}") / "onnx"
            self.exports[key] = onnx_format.write(out, _canonical(self.source(family), family), precision=precision)
        return self.exports[key]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> _Models:
    return _Models(tmp_path_factory)


def _transformers_logits(model, ids: list[int], nxt: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompt's logits, and the next step's through transformers' KV cache (LongRoPE picks its
    factors per call, so a step past the original context differs from recomputing the whole sequence)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        step = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return out.logits[0].numpy(), step.logits[0, -1].numpy()


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(sess, ids: list[int], past: dict[str, np.ndarray], total: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, total), np.int64), **past}
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(names, feeds)))
    present = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
    return out["logits"][0], present


def _empty_past(sess) -> dict[str, np.ndarray]:
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = i.shape
            past[i.name] = np.zeros((1, kv_heads, 0, head_dim), dtype[i.type])
    return past


def _check(models: _Models, family: str, model_path: Path, precision: str, prompts: list[list[int]]) -> None:
    sess = _session(model_path)
    for ids in prompts:
        logits, present = _run(sess, ids, _empty_past(sess), len(ids))
        nxt = int(logits[-1].argmax())
        ref, ref_step = _transformers_logits(models.reference(family), ids, nxt)
        span = ref.max() - ref.min()
        assert np.abs(logits.astype(np.float32) - ref).max() <= TOLERANCE[precision] * span, (family, len(ids))

        step, present2 = _run(sess, [nxt], present, len(ids) + 1)
        assert step.shape == (1, ref.shape[1])
        assert np.abs(step[0].astype(np.float32) - ref_step).max() <= TOLERANCE[precision] * span, (family, len(ids))
        assert all(v.shape[2] == len(ids) + 1 for v in present2.values())


def _prompts(models: _Models, family: str) -> list[list[int]]:
    return [_ids(models.source(family), p) for p in PROMPTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_onnx_computes_what_transformers_computes(models, family):
    files = models.export(family)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data", "genai_config.json"]
    assert sorted(p.name for p in files[0].parent.iterdir()) == sorted(f.name for f in files)
    _check(models, family, files[0], "f32", _prompts(models, family))


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3-longrope", "gemma2", "mixtral"])
def test_f16_onnx_runs_and_stays_close(models, family):
    files = models.export(family, "f16")
    model = onnx.load(files[0], load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    _check(models, family, files[0], "f16", _prompts(models, family))


def test_sliding_windows_slide_over_the_prompts(models):
    """The window variants share their base family's weights; their transformers outputs differ, so
    the prompts are long enough for the window to matter (and the f32 test above proves the ONNX
    graphs follow it)."""
    for windowed, base in (("mistral-window", "mistral"), ("phi3-window", "phi3")):
        ids = _prompts(models, windowed)[0]
        assert len(ids) > WINDOW + 1
        a, _ = _transformers_logits(models.reference(windowed), ids, 0)
        b, _ = _transformers_logits(models.reference(base), ids, 0)
        assert np.abs(a[-1] - b[-1]).max() > 1e-2 * (b.max() - b.min()), windowed
        assert np.array_equal(a[:WINDOW], b[:WINDOW])  # before the window is full, nothing differs


def test_longrope_switches_factors_past_the_original_context(models):
    """Phi-3 LongRoPE: a prompt of exactly the original context (short factors) whose decoding step
    crosses it (long factors for the new token, cached keys as they were), and a longer prompt."""
    family = "phi3-longrope"
    vocab = transformers.AutoConfig.from_pretrained(models.source(family)).vocab_size
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (LONGROPE_ORIGINAL, LONGROPE_ORIGINAL + 40)]
    files = models.export(family)
    model = onnx.load(files[0], load_external_data=False)
    assert [n.op_type for n in model.graph.node].count("If") == 1
    _check(models, family, files[0], "f32", prompts)


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_external_data_and_checker(models, family):
    src = models.source(family)
    model_path, data_path, config_path = models.export(family)
    # the weights live in the data file, the graph stays small
    assert data_path.stat().st_size > 1_000_000
    assert model_path.stat().st_size < 64_000
    _register_simplified_layer_norm()
    onnx.checker.check_model(str(model_path))

    model = onnx.load(str(model_path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    ends = []
    for t in external:
        meta = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        assert meta["length"] == int(np.prod(t.dims)) * 4
        ends.append(meta["offset"] + meta["length"])
    assert max(ends) == data_path.stat().st_size
    # no tiny tensor is external (shape/axes values are Constant nodes)
    assert all(int(np.prod(t.dims)) * 4 >= onnx_format.INLINE_BYTES for t in external)

    ops = [(n.domain or "", n.op_type) for n in model.graph.node]
    cfg = json.loads((src / "config.json").read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}  # a multimodal wrapper's language model
    n_layer = cfg["num_hidden_layers"]
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == n_layer
    assert ops.count(("com.microsoft", "SkipSimplifiedLayerNormalization")) == 2 * n_layer
    assert ops.count(("com.microsoft", "MoE")) == (n_layer if family.startswith("mixtral") else 0)
    assert ("", "SimplifiedLayerNormalization") in ops
    gqas = [_attributes(n) for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(a["do_rotary"] == 1 and a["rotary_interleaved"] == (1 if family in INTERLEAVED else 0) for a in gqas)
    assert all(a["num_heads"] == cfg["num_attention_heads"] and a["kv_num_heads"] == cfg["num_key_value_heads"] for a in gqas)
    inputs = [i.name for i in model.graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"] and "past_key_values.1.value" in inputs
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]

    genai = json.loads(config_path.read_text())
    dec = genai["model"]["decoder"]
    expected_type = GENAI_TYPES.get(family, "llama" if family in INTERLEAVED and family != "granite" else family.split("-")[0])
    assert genai["model"]["type"] == expected_type
    assert dec["filename"] == "model.onnx" and dec["num_hidden_layers"] == n_layer
    assert dec["num_key_value_heads"] == cfg["num_key_value_heads"]
    assert dec["head_size"] == (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert genai["model"]["eos_token_id"] == cfg["eos_token_id"]
    assert genai["model"]["context_length"] == cfg["max_position_embeddings"]
    assert genai["search"]["max_length"] == cfg["max_position_embeddings"]


def test_family_settings_reach_the_attention(models):
    """What each family sets on GroupQueryAttention, read back from the graphs."""
    def gqas(family):
        model = onnx.load(str(models.export(family)[0]), load_external_data=False)
        return [(n.input, _attributes(n)) for n in model.graph.node if n.op_type == "GroupQueryAttention"]

    # Gemma 2: window on the sliding (even) layers, soft-capping, query_pre_attn_scalar; Gemma 3: its
    # layer_types, and sliding layers rotate with their own cache pair
    g2 = gqas("gemma2")
    assert [a.get("local_window_size", -1) for _, a in g2] == [WINDOW, -1]
    assert all(a["softcap"] == pytest.approx(5.0) and a["scale"] == pytest.approx(64 ** -0.5) for _, a in g2)
    g3 = gqas("gemma3")
    assert [a.get("local_window_size", -1) for _, a in g3] == [WINDOW, -1]
    assert [i[7] for i, _ in g3] == ["cos_cache_local", "cos_cache"] and all("softcap" not in a for _, a in g3)
    # Mistral/Phi-3 windows apply to every layer; Phi-3 feeds GQA packed q/k/v
    assert [a.get("local_window_size") for _, a in gqas("mistral-window")] == [WINDOW, WINDOW]
    phi = gqas("phi3-window")
    assert [a.get("local_window_size") for _, a in phi] == [WINDOW, WINDOW] and all(i[1] == i[2] == "" for i, _ in phi)
    # Granite: attention_multiplier replaces 1/sqrt(head size)
    assert all(a["scale"] == pytest.approx(0.0078125) for _, a in gqas("granite"))
    assert all("local_window_size" not in a for _, a in gqas("llama"))


def test_refuses_non_empty_target_and_leaves_nothing_on_error(tmp_path):
    src = _hf_model(tmp_path / "hf", "llama")
    ckpt = architectures.from_hf(st_format.read(src))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(UsageError):
        onnx_format.write(busy, ckpt)
    with pytest.raises(UsageError):
        onnx_format.write(tmp_path / "o", ckpt, precision="int4")
    broken = type(ckpt)(dict(ckpt.metadata), [t for t in ckpt.tensors if t.name != "blk.1.ffn_down.weight"])
    with pytest.raises(FormatError, match="blk.1.ffn_down.weight"):
        onnx_format.write(tmp_path / "o", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "hf"]


def test_refuses_unsupported_architecture_and_rope(tmp_path):
    meta = {"general.architecture": MetaValue(GGUFValueType.STRING, "falcon")}
    with pytest.raises(FormatError, match="falcon"):
        onnx_format.write(tmp_path / "o", Checkpoint(meta, []))
    src = _hf_model(tmp_path / "hf", "llama")
    ckpt = architectures.from_hf(st_format.read(src))
    ckpt.metadata["llama.rope.scaling.type"] = MetaValue(GGUFValueType.STRING, "yarn")
    with pytest.raises(FormatError, match="yarn"):
        onnx_format.write(tmp_path / "o", ckpt)
    del ckpt.metadata["llama.rope.scaling.type"]
    # onnxruntime's GQA rotates widths that are multiples of 16 (a 40-wide rotation fails at run time)
    ckpt.metadata["llama.rope.dimension_count"] = MetaValue(GGUFValueType.UINT32, 40)
    with pytest.raises(FormatError, match="rotary width 40"):
        onnx_format.write(tmp_path / "o", ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_refuses_half_a_longrope(models, tmp_path):
    ckpt = _canonical(models.source("phi3-longrope"), "phi3-longrope")
    half = Checkpoint(dict(ckpt.metadata), [t for t in ckpt.tensors if t.name != "rope_factors_long.weight"])
    with pytest.raises(FormatError, match="rope_factors_long"):
        onnx_format.write(tmp_path / "o", half)
    assert not (tmp_path / "o").exists()


def test_bert_is_written_by_the_encoder_module(tmp_path, monkeypatch):
    """onnx.write hands a BERT checkpoint to onnx_encoder.write_encoder with the same arguments."""
    calls = []
    fake = types.ModuleType("slmpkg.formats.onnx_encoder")
    fake.write_encoder = lambda directory, checkpoint, precision="f32", on_tensor=None: calls.append(
        (directory, checkpoint, precision, on_tensor)) or [Path(directory) / "model.onnx"]
    monkeypatch.setitem(sys.modules, "slmpkg.formats.onnx_encoder", fake)
    monkeypatch.setattr(sys.modules["slmpkg.formats"], "onnx_encoder", fake, raising=False)
    ckpt = Checkpoint({"general.architecture": MetaValue(GGUFValueType.STRING, "bert")}, [])
    progress = print
    assert onnx_format.write(tmp_path / "enc", ckpt, "f16", on_tensor=progress) == [tmp_path / "enc" / "model.onnx"]
    assert calls == [(tmp_path / "enc", ckpt, "f16", progress)]


def test_convert_cli_to_onnx_from_hf_and_from_gguf(tmp_path):
    """`slmpkg convert --to onnx` from a HF directory and from a GGUF: onnxruntime computes the same
    logits either way, and the tokenizer files onnxruntime-genai reads are beside the model."""
    from click.testing import CliRunner

    from slmpkg.cli import main

    src = _hf_model(tmp_path / "hf", "llama")
    gguf_path, from_hf, from_gguf = tmp_path / "m.gguf", tmp_path / "onnx-hf", tmp_path / "onnx-gguf"
    runner = CliRunner()
    assert runner.invoke(main, ["convert", str(src), "-o", str(gguf_path), "--quant", "F32", "-q"]).exit_code == 0
    for source, out in ((src, from_hf), (gguf_path, from_gguf)):
        result = runner.invoke(main, ["convert", str(source), "-o", str(out), "--to", "onnx", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["format"] == "onnx"
        assert (out / "tokenizer.json").exists() and (out / "genai_config.json").exists()
    ids = [1, 20, 30, 40]
    logits = []
    for out in (from_hf, from_gguf):
        sess = _session(out / "model.onnx")
        logits.append(_run(sess, ids, _empty_past(sess), len(ids))[0])
    assert np.array_equal(logits[0], logits[1])
    bad = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "x"), "--to", "onnx", "--quant", "Q4_K_M"])
    assert bad.exit_code == 1 and "Q4_K_M" in bad.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3-longrope", "granite", "mixtral"])
def test_from_gguf_computes_what_from_hf_computes(models, family, tmp_path):
    """The same model through an F32 GGUF (metadata as the GGUF reader returns it: the window pattern
    array, rope factor tensors, stacked experts) gives the same graph results, bit for bit."""
    from slmpkg.formats import gguf as gguf_format
    from slmpkg.pipeline import convert

    gguf_path = tmp_path / "model.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(models.source(family), gguf_path, quant="F32", progress=False)
    from_gguf = onnx_format.write(tmp_path / "onnx", gguf_format.read(gguf_path))[0]
    ids = _prompts(models, family)[0]
    logits = []
    for path in (from_gguf, models.export(family)[0]):
        sess = _session(path)
        logits.append(_run(sess, ids, _empty_past(sess), len(ids))[0])
    assert np.array_equal(logits[0], logits[1])
