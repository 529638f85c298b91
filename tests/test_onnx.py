"""ONNX export, proved by the runtime: onnxruntime computes what transformers computes.

Tiny random models (tests/test_convert.py's builders) → ``architectures.from_hf`` → ``onnx.write`` →
an onnxruntime CPU session: the prompt's logits (no past) and one more decoding step fed with
``present.*`` as ``past_key_values.*`` match transformers' logits.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from slmpkg.formats import onnx as onnx_format
from slmpkg.formats import safetensors as st_format

from slmpkg import architectures
from slmpkg.errors import FormatError, UsageError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import PROMPTS, _hf_model, _ids

FAMILIES = ["llama", "llama-tied", "llama3-rope", "qwen2", "qwen3"]
TOLERANCE = {"f32": 1e-4, "f16": 5e-3}  # × the reference logits' range (measured: ~7e-7 at f32, ~1e-3 at f16)


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


@pytest.fixture(scope="module", params=FAMILIES)
def hf_dir(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _hf_model(tmp_path_factory.mktemp(request.param), request.param)


def _export(src: Path, out: Path, precision: str = "f32") -> list[Path]:
    return onnx_format.write(out, architectures.from_hf(st_format.read(src)), precision=precision)


def _reference(src: Path, ids: list[int]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


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


def _check_prompt_and_step(src: Path, model: Path, precision: str) -> None:
    sess = _session(model)
    for prompt in PROMPTS:
        ids = _ids(src, prompt)
        ref = _reference(src, ids)
        logits, present = _run(sess, ids, _empty_past(sess), len(ids))
        span = ref.max() - ref.min()
        assert np.abs(logits.astype(np.float32) - ref).max() <= TOLERANCE[precision] * span, prompt

        nxt = int(ref[-1].argmax())
        ref_step = _reference(src, ids + [nxt])[-1]
        step, present2 = _run(sess, [nxt], present, len(ids) + 1)
        assert step.shape == (1, ref.shape[1])
        assert np.abs(step[0].astype(np.float32) - ref_step).max() <= TOLERANCE[precision] * span, prompt
        assert all(v.shape[2] == len(ids) + 1 for v in present2.values())


def test_f32_onnx_computes_what_transformers_computes(hf_dir, tmp_path):
    _, src = hf_dir
    files = _export(src, tmp_path / "onnx")
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data", "genai_config.json"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(f.name for f in files)
    _check_prompt_and_step(src, files[0], "f32")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_f16_onnx_runs_and_stays_close(family, tmp_path):
    src = _hf_model(tmp_path / "hf", family)
    files = _export(src, tmp_path / "onnx16", precision="f16")
    model = onnx.load(files[0], load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    _check_prompt_and_step(src, files[0], "f16")


def test_layout_external_data_and_checker(hf_dir, tmp_path):
    family, src = hf_dir
    model_path, data_path, config_path = _export(src, tmp_path / "onnx")
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
    n_layer = cfg["num_hidden_layers"]
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == n_layer
    assert ops.count(("com.microsoft", "SkipSimplifiedLayerNormalization")) == 2 * n_layer
    assert ("", "SimplifiedLayerNormalization") in ops
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == (1 if family.startswith("llama") else 0)
    assert attrs["num_heads"] == cfg["num_attention_heads"] and attrs["kv_num_heads"] == cfg["num_key_value_heads"]
    inputs = [i.name for i in model.graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"] and "past_key_values.1.value" in inputs
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]

    genai = json.loads(config_path.read_text())
    dec = genai["model"]["decoder"]
    assert genai["model"]["type"] == ("llama" if family.startswith("llama") else family)
    assert dec["filename"] == "model.onnx" and dec["num_hidden_layers"] == n_layer
    assert dec["num_key_value_heads"] == cfg["num_key_value_heads"]
    assert dec["head_size"] == (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert genai["model"]["eos_token_id"] == cfg["eos_token_id"]
    assert genai["model"]["context_length"] == cfg["max_position_embeddings"]
    assert genai["search"]["max_length"] == cfg["max_position_embeddings"]


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


def test_refuses_unsupported_architecture(tmp_path):
    src = _hf_model(tmp_path / "hf", "gemma")
    with pytest.raises(FormatError, match="gemma"):
        onnx_format.write(tmp_path / "o", architectures.from_hf(st_format.read(src)))


def test_convert_cli_to_onnx_from_hf_and_from_gguf(tmp_path):
    """`slmpkg convert --to onnx` from a HF directory and from a GGUF: onnxruntime computes the same
    logits either way, and the tokenizer files onnxruntime-genai reads are beside the model."""
    import json as _json

    from click.testing import CliRunner

    from slmpkg.cli import main

    src = _hf_model(tmp_path / "hf", "llama")
    gguf_path, from_hf, from_gguf = tmp_path / "m.gguf", tmp_path / "onnx-hf", tmp_path / "onnx-gguf"
    runner = CliRunner()
    assert runner.invoke(main, ["convert", str(src), "-o", str(gguf_path), "--quant", "F32", "-q"]).exit_code == 0
    for source, out in ((src, from_hf), (gguf_path, from_gguf)):
        result = runner.invoke(main, ["convert", str(source), "-o", str(out), "--to", "onnx", "--json"])
        assert result.exit_code == 0, result.output
        assert _json.loads(result.output)["format"] == "onnx"
        assert (out / "tokenizer.json").exists() and (out / "genai_config.json").exists()
    ids = [1, 20, 30, 40]
    logits = []
    for out in (from_hf, from_gguf):
        sess = _session(out / "model.onnx")
        logits.append(_run(sess, ids, _empty_past(sess), len(ids))[0])
    assert np.array_equal(logits[0], logits[1])
    bad = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "x"), "--to", "onnx", "--quant", "int4"])
    assert bad.exit_code == 1 and "int4" in bad.output and not (tmp_path / "x").exists()
