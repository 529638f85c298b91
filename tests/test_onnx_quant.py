"""Quantized ONNX graphs (MatMulNBits), proved by onnxruntime, transformers and llama.cpp.

* int4/int8 from float weights: onnxruntime's logits equal transformers' with every linear weight
  replaced by the dequantized MatMulNBits weight (numpy dequantize, then the reference matmuls).
* quantized GGUFs made by slmpkg (Q4_0, Q8_0, Q4_K_M, Q5_K_M): every MatMulNBits node, run alone by
  onnxruntime on an identity input, yields the GGUF's dequantized weights: bit for bit where the
  report says ``exact``, within one float32 ulp where it says ``within 1 ulp``; and the graph's
  logits match llama.cpp's on the same GGUF more closely than the float model's do.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner
from test_convert import _hf_model, _ids, _llama_logits

from slmpkg.cli import main
from slmpkg.formats import gguf as gguf_format
from slmpkg.formats import onnx_nbits
from slmpkg.pipeline import convert

PROMPT = "Hello world, the quick brown fox"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _hf_model(tmp_path_factory.mktemp("llama"), "llama")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prompt_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    sess = _session(model_dir / "model.onnx")
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], feeds)[0][0]


def _dequantized_reference(src: Path, ids: list[int], bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """transformers' logits with each linear weight (lm_head included) replaced by its MatMulNBits form."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        head = model.get_output_embeddings()
        if head.weight is model.get_input_embeddings().weight:  # tied: the graph's embedding Gather stays float
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.numpy()
                q = onnx_nbits.from_float(w, bits, block_size, symmetric)
                module.weight.copy_(torch.from_numpy(q.dequantize()))
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("quant,block_size,asymmetric", [("int4", 32, False), ("int4", 128, True), ("int8", 64, False)])
def test_int_graphs_compute_with_the_dequantized_weights(llama_dir, tmp_path, quant, block_size, asymmetric):
    out = tmp_path / "onnx"
    args = ["convert", str(llama_dir), "-o", str(out), "--to", "onnx", "--quant", quant,
            "--block-size", str(block_size), "--json"] + (["--asymmetric"] if asymmetric else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["weights"]
    n_layer = json.loads((llama_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(report) == 7 * n_layer + 1 and all(w["carried"] == "requantized" for w in report)

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(report)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["bits"] == int(quant[3:]) and attrs["block_size"] == block_size
    assert (len(nbits[0].input) == 4) == asymmetric  # zero points only when asked for

    ids = _ids(llama_dir, PROMPT)
    ref = _dequantized_reference(llama_dir, ids, int(quant[3:]), block_size, not asymmetric)
    ours = _prompt_logits(out, ids)
    span = ref.max() - ref.min()
    assert np.abs(ours - ref).max() <= 1e-4 * span


# families whose every transformers Linear is one ONNX MatMulNBits (Mixtral's experts are not Linears and its
# router stays float in the graph: it is covered by the f32 tests)
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "phi2", "starcoder2", "gemma2", "gemma3", "granite"])
def test_int4_of_other_families_computes_with_the_dequantized_weights(family, tmp_path):
    src = _hf_model(tmp_path / "hf", family)
    out = tmp_path / "onnx"
    convert(src, out, to="onnx", quant="int4", progress=False)
    ids = _ids(src, PROMPT)
    ref = _dequantized_reference(src, ids, 4, 32, True)
    assert np.abs(_prompt_logits(out, ids) - ref).max() <= 1e-4 * (ref.max() - ref.min())


def test_int4_of_openelm_computes_with_the_dequantized_weights(tmp_path):
    """OpenELM (no transformers class): tests/test_openelm.py's numpy reference with every linear weight
    replaced by its MatMulNBits form, the head too (the embedding Gather stays float)."""
    import test_openelm

    src, weights = test_openelm._model(tmp_path)
    out = tmp_path / "onnx"
    convert(src, out, to="onnx", quant="int4", progress=False)
    linear = (".qkv_proj.weight", ".out_proj.weight", ".proj_1.weight", ".proj_2.weight")
    dequantized = {name: onnx_nbits.from_float(w, 4, 32, True).dequantize() if name.endswith(linear) else w
                   for name, w in weights.items()}
    head = onnx_nbits.from_float(weights["transformer.token_embeddings.weight"], 4, 32, True).dequantize()
    ids = _ids(src, PROMPT)
    ref = test_openelm._reference_logits(dequantized, ids, head=head)
    assert np.abs(_prompt_logits(out, ids) - ref).max() <= 1e-4 * (ref.max() - ref.min())


def _nbits_alone(model_path: Path, node: onnx.NodeProto) -> tuple[np.ndarray, str]:
    """onnxruntime's weights for one MatMulNBits linear (with its min-term nodes): its output for X = eye(K)."""
    model = onnx.load(str(model_path))  # with external data: the initializers this node reads
    scope = node.name.rsplit("/MatMulNBits", 1)[0]
    nodes = [n for n in model.graph.node if n.name == node.name or n.name.startswith(f"{scope}/min_term/")]
    produced = {o for n in nodes for o in n.output}
    needed = {i for n in nodes for i in n.input} - produced
    inits = [t for t in model.graph.initializer if t.name in needed]
    x = node.input[0]
    k = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "K")
    final = nodes[-1].output[0]
    graph = onnx.helper.make_graph(
        nodes, "one_linear", [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, k, k])],
        [onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None)], inits)
    one = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sess = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {x: np.eye(k, dtype=np.float32)[None]})[0][0]
    return y.T, scope  # row n of W is column n of eye(K) @ W.T


@pytest.fixture(scope="module")
def quantized_ggufs(llama_dir, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ggufs")
    out = {}
    for preset in ("Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M"):
        out[preset] = base / f"{preset}.gguf"
        convert(llama_dir, out[preset], quant=preset, progress=False)
    return out


@pytest.mark.parametrize("preset", ["Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M"])
@pytest.mark.parametrize("exact_mins", [False, True])
def test_gguf_blocks_carried_over_exactly(quantized_ggufs, tmp_path, preset, exact_mins):
    src = quantized_ggufs[preset]
    out = tmp_path / "onnx"
    args = ["convert", str(src), "-o", str(out), "--to", "onnx", "--json"] + (["--exact-mins"] if exact_mins else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = {w["name"]: w for w in json.loads(result.output)["weights"]}
    ckpt = gguf_format.read(src)
    stored = {t.name: t for t in ckpt.tensors}
    kinds = {w["carried"] for w in report.values()}
    assert "requantized" not in kinds
    if exact_mins or preset in ("Q4_0", "Q8_0", "Q5_K_M"):
        assert kinds == {"exact"}
    else:
        assert "within 1 ulp" in kinds

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(report)
    checked = 0
    for node in nodes:
        got, scope = _nbits_alone(out / "model.onnx", node)
        name = next(n for n, w in report.items() if scope.endswith(_onnx_scope(n)))
        want = stored[name].float32()
        assert got.shape == want.shape
        if report[name]["carried"] == "exact":
            assert np.array_equal(got, want), name
        else:
            # one float32 ulp of the block's magnitude (the zero point's product may round once)
            blocks = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=-1, keepdims=True)
            ulp = np.spacing(2 * blocks).repeat(32, axis=-1).reshape(want.shape)
            assert (np.abs(got - want) <= ulp).all(), name
        checked += 1
    assert checked == len(report)


def _onnx_scope(gguf_name: str) -> str:
    """The node scope the ONNX writer gives a GGUF weight (``blk.0.attn_q.weight`` → ``layers.0/attn/q_proj``)."""
    if gguf_name == "output.weight" or gguf_name == "token_embd.weight":
        return "/lm_head"
    _, i, kind, _ = gguf_name.split(".")
    part = {"attn_q": "attn/q_proj", "attn_k": "attn/k_proj", "attn_v": "attn/v_proj", "attn_output": "attn/o_proj",
            "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj", "ffn_down": "mlp/down_proj"}[kind]
    return f"/model/layers.{i}/{part}"


@pytest.mark.parametrize("preset", ["Q4_0", "Q4_K_M"])
def test_gguf_to_onnx_logits_match_llama_cpp(llama_dir, quantized_ggufs, tmp_path, preset):
    src = quantized_ggufs[preset]
    out = tmp_path / "onnx"
    convert(src, out, to="onnx", progress=False)
    ids = _ids(llama_dir, PROMPT)
    llama = _llama_logits(src, ids)
    ours = _prompt_logits(out, ids)
    float_model = _prompt_logits(_float_onnx(llama_dir, tmp_path), ids)
    span = llama.max() - llama.min()
    # llama.cpp multiplies quantized weights by 8-bit-quantized activations: close, not equal
    assert np.abs(ours - llama).max() <= 3e-2 * span
    # and it is the quantized weights that make them close: the float model is further off
    assert np.abs(ours - llama).max() < 0.5 * np.abs(float_model - llama).max()


def _float_onnx(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "float-onnx"
    convert(src, out, to="onnx", quant="f32", progress=False)
    return out


def test_iq_types_are_requantized_with_a_warning(llama_dir, tmp_path):
    src = tmp_path / "iq.gguf"
    convert(llama_dir, src, quant="IQ4_NL", progress=False)
    out = tmp_path / "onnx"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--to", "onnx", "--json"])
    assert result.exit_code == 0, result.output
    assert "have no MatMulNBits form and were re-quantized" in result.stderr
    weights = json.loads(result.stdout)["weights"]
    requantized = [w for w in weights if w["source_type"] == "IQ4_NL"]
    assert requantized and all(w["carried"] == "requantized" and w["max_abs_error"] > 0 for w in requantized)
    assert _session(out / "model.onnx") is not None


def test_bad_block_options_are_refused(llama_dir, tmp_path):
    runner = CliRunner()
    for args, message in ((["--block-size", "48"], "power of two"), (["--block-size", "512"], "power of two"),
                          (["--quant", "int3"], "int4 or int8")):
        result = runner.invoke(main, ["convert", str(llama_dir), "-o", str(tmp_path / "x"), "--to", "onnx",
                                      "--quant", "int4", *args])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "x").exists()
    result = runner.invoke(main, ["convert", str(llama_dir), "-o", str(tmp_path / "x.gguf"), "--block-size", "64"])
    assert result.exit_code == 1 and "apply to --to onnx" in result.output


def test_int4_onnx_to_another_gguf_preset_needs_allow_requantize(llama_dir, tmp_path):
    runner = CliRunner()
    onnx_dir = tmp_path / "onnx"
    assert runner.invoke(main, ["convert", str(llama_dir), "-o", str(onnx_dir), "--to", "onnx", "--quant", "int4"]).exit_code == 0
    refused = runner.invoke(main, ["convert", str(onnx_dir), "-o", str(tmp_path / "q.gguf"), "--quant", "Q4_K_M"])
    assert refused.exit_code == 1 and "requantize" in refused.output and not (tmp_path / "q.gguf").exists()
    done = runner.invoke(main, ["convert", str(onnx_dir), "-o", str(tmp_path / "q.gguf"), "--quant", "Q4_K_M",
                                "--allow-requantize", "-q"])
    assert done.exit_code == 0, done.output
    kept = tmp_path / "kept.gguf"  # no preset: the int4 blocks come back as Q4_0, unrounded
    assert runner.invoke(main, ["convert", str(onnx_dir), "-o", str(kept), "-q"]).exit_code == 0
    before = {t.name: t for t in gguf_format.read(kept).tensors}
    after = {t.name: t for t in gguf_format.read(tmp_path / "q.gguf").tensors}
    # the linears come back as Q4_0; the embedding was never quantized (a float Gather in the graph)
    assert {t.qtype.name for n, t in before.items() if len(t.shape) == 2 and n != "token_embd.weight"} == {"Q4_0"}
    assert "Q4_K" in {t.qtype.name for t in after.values()}
    for name, t in after.items():
        if len(t.shape) == 2:  # rounded again: close to the int4 weights, not equal
            a, b = t.float32(), before[name].float32()
            assert np.abs(a - b).max() <= 0.1 * np.abs(b).max(), name
    assert np.isfinite(_llama_logits(tmp_path / "q.gguf", _ids(llama_dir, PROMPT))).all()
