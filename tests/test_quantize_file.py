"""`slmpkg quantize` against llama.cpp's own quantizer: the same bytes for every preset and option."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as V

from slmpkg.checkpoint import Checkpoint, LazyTensor, MetaValue
from slmpkg.formats import gguf as gguf_format
from slmpkg.imatrix import ImportanceMatrix
from slmpkg.pipeline import quantize_file
from slmpkg.presets import PRESETS, QuantOptions
from slmpkg.quant import QuantType as T

REPO = Path(__file__).resolve().parents[1]

llama_cpp = pytest.importorskip("llama_cpp")
from llama_ref import llama_quantize  # noqa: E402


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_f16(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-f16.gguf"
    gguf_format.write(path, _example("make_tiny_llama").tiny_llama(dtype="f16"))
    return path


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-f32.gguf"
    gguf_format.write(path, _example("make_tiny_llama").tiny_llama(dtype="f32", seed=1, tied_embeddings=True))
    return path


def _assert_same_file(ours: Path, ref: Path) -> None:
    a, b = ours.read_bytes(), ref.read_bytes()
    if a == b:
        return
    ca, cb = gguf_format.read(ours), gguf_format.read(ref)
    assert list(ca.metadata) == list(cb.metadata), "metadata keys differ"
    for k in ca.metadata:
        assert ca.metadata[k].type == cb.metadata[k].type, k
    assert [t.name for t in ca.tensors] == [t.name for t in cb.tensors], "tensor order differs"
    for ta, tb in zip(ca.tensors, cb.tensors):
        assert ta.qtype == tb.qtype, f"{ta.name}: {ta.qtype.name} vs llama.cpp {tb.qtype.name}"
        assert np.array_equal(ta.raw(), tb.raw()), f"{ta.name} ({ta.qtype.name}) bytes differ"
    raise AssertionError(f"files differ (sizes {len(a)} vs {len(b)}) though every tensor matches")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_matches_llama_cpp(tmp_path, tiny_f16, preset):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    options = QuantOptions(preset)
    quantize_file(tiny_f16, ours, options, progress=False)
    assert llama_quantize(tiny_f16, ref, options.preset.ftype) == 0
    _assert_same_file(ours, ref)


@pytest.mark.parametrize(
    "kwargs, ref_kwargs",
    [
        ({"pure": True}, {"pure": True}),
        ({"leave_output_tensor": True}, {"leave_output_tensor": True}),
        ({"output_tensor_type": "f16", "token_embedding_type": "q8_0"},
         {"output_tensor_type": int(T.F16), "token_embedding_type": int(T.Q8_0)}),
        ({"tensor_type_overrides": ["attn_q=q8_0", r"blk\.[0-3]\.ffn_up=q5_1"]},
         {"tensor_types": [("attn_q", int(T.Q8_0)), (r"blk\.[0-3]\.ffn_up", int(T.Q5_1))]}),
    ],
    ids=["pure", "leave-output", "output-and-embedding-types", "tensor-type-regex"],
)
def test_options_match_llama_cpp(tmp_path, tiny_f16, kwargs, ref_kwargs):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    options = QuantOptions("Q4_K_M", **kwargs)
    quantize_file(tiny_f16, ours, options, progress=False)
    assert llama_quantize(tiny_f16, ref, options.preset.ftype, **ref_kwargs) == 0
    _assert_same_file(ours, ref)


def test_f32_source_with_tied_embeddings(tmp_path, tiny_f32):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_file(tiny_f32, ours, QuantOptions("Q5_K_M"), progress=False)
    assert llama_quantize(tiny_f32, ref, PRESETS["Q5_K_M"].ftype) == 0
    _assert_same_file(ours, ref)


# ---- importance matrices ------------------------------------------------------------------------


def _imatrix_sums(model: Path, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        t.name: (rng.gamma(1.0, 1.0, t.shape[-1]) * 40).astype(np.float32)
        for t in gguf_format.read(model).tensors
        if len(t.shape) == 2 and t.name != "token_embd.weight"
    }


def _write_gguf_imatrix(path: Path, sums: dict[str, np.ndarray], count: float) -> None:
    md = {
        "general.type": MetaValue(V.STRING, "imatrix"),
        "imatrix.datasets": MetaValue(V.ARRAY, ["calibration.txt"], V.STRING),
        "imatrix.chunk_count": MetaValue(V.UINT32, 7),
        "imatrix.chunk_size": MetaValue(V.UINT32, 512),
    }
    tensors = []
    for name, s in sums.items():
        tensors.append(LazyTensor.from_array(f"{name}.in_sum2", s.reshape(1, -1)))
        tensors.append(LazyTensor.from_array(f"{name}.counts", np.array([[count]], np.float32)))
    gguf_format.write(path, Checkpoint(md, tensors))


def _write_legacy_imatrix(path: Path, sums: dict[str, np.ndarray], ncall: int) -> None:
    out = [struct.pack("<i", len(sums))]
    for name, s in sums.items():
        out += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, s.size), s.tobytes()]
    out += [struct.pack("<ii", 9, len("calibration.txt")), b"calibration.txt"]
    path.write_bytes(b"".join(out))


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_imatrix_loads_as_llama_cpp_normalizes_it(tmp_path, tiny_f16, fmt):
    sums = _imatrix_sums(tiny_f16)
    path = tmp_path / f"imatrix.{fmt}"
    if fmt == "gguf":
        _write_gguf_imatrix(path, sums, count=4.0)
    else:
        _write_legacy_imatrix(path, sums, ncall=4)
    loaded = ImportanceMatrix.load(path)
    assert loaded.datasets == ["calibration.txt"]
    assert loaded.chunk_count == (7 if fmt == "gguf" else 9)
    assert set(loaded.values) == set(sums)
    for name, s in sums.items():
        assert np.array_equal(loaded.values[name], s / np.float32(4))


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_S", "Q4_0", "IQ4_XS", "Q2_K"])
def test_imatrix_presets_match_llama_cpp(tmp_path, tiny_f16, preset):
    sums = _imatrix_sums(tiny_f16)
    path = tmp_path / "imatrix.gguf"
    _write_gguf_imatrix(path, sums, count=4.0)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_file(tiny_f16, ours, QuantOptions(preset), imatrix=path, progress=False)
    values = {k: v / np.float32(4) for k, v in sums.items()}
    kv = [("quantize.imatrix.file", str(path)), ("quantize.imatrix.dataset", "calibration.txt"),
          ("quantize.imatrix.entries_count", len(values)), ("quantize.imatrix.chunks_count", 7)]
    assert llama_quantize(tiny_f16, ref, PRESETS[preset].ftype, imatrix=values, kv_overrides=kv) == 0
    _assert_same_file(ours, ref)


# ---- re-quantization and the result in llama.cpp ------------------------------------------------


def test_requantize_needs_the_flag_and_then_matches(tmp_path, tiny_f16):
    q8, ours, ref = tmp_path / "q8.gguf", tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_file(tiny_f16, q8, QuantOptions("Q8_0"), progress=False)
    from slmpkg.errors import UsageError

    with pytest.raises(UsageError, match="output.weight is already Q8_0.*--allow-requantize"):
        quantize_file(q8, ours, QuantOptions("Q4_K_M"), progress=False)
    assert not ours.exists()
    quantize_file(q8, ours, QuantOptions("Q4_K_M", allow_requantize=True), progress=False)
    assert llama_quantize(q8, ref, PRESETS["Q4_K_M"].ftype, allow_requantize=True) == 0
    _assert_same_file(ours, ref)


@pytest.mark.parametrize("preset", ["Q4_K_M", "IQ4_NL"])
def test_llama_cpp_runs_the_output(tmp_path, tiny_f16, preset):
    out = tmp_path / "out.gguf"
    quantize_file(tiny_f16, out, QuantOptions(preset), progress=False)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    tokens = llm.tokenize(b"the cat sat on the mat")
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)])
    assert logits.shape == (len(tokens), llm.n_vocab())
    assert np.isfinite(logits).all() and logits.std() > 0


# ---- worker processes ---------------------------------------------------------------------------


@pytest.fixture
def every_tensor_in_workers(monkeypatch):
    """Cut every tensor the worker processes convert into jobs of a few rows."""
    from slmpkg import parallel

    monkeypatch.setattr(parallel, "JOB_ELEMENTS", 3000)


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q8_0", "IQ4_XS"])
def test_worker_processes_write_llama_cpp_bytes(tmp_path, tiny_f16, every_tensor_in_workers, preset):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    result = quantize_file(tiny_f16, ours, QuantOptions(preset), threads=2, progress=False)
    assert llama_quantize(tiny_f16, ref, PRESETS[preset].ftype) == 0
    _assert_same_file(ours, ref)
    assert any(c.requantized for c in result.tensors)


def test_worker_processes_with_imatrix_and_requantize(tmp_path, tiny_f16, every_tensor_in_workers):
    q8, ours, ref = tmp_path / "q8.gguf", tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_file(tiny_f16, q8, QuantOptions("Q8_0"), threads=2, progress=False)
    sums = _imatrix_sums(tiny_f16)
    path = tmp_path / "imatrix.gguf"
    _write_gguf_imatrix(path, sums, count=4.0)
    quantize_file(q8, ours, QuantOptions("Q4_K_M", allow_requantize=True), imatrix=path, threads=2, progress=False)
    values = {k: v / np.float32(4) for k, v in sums.items()}
    kv = [("quantize.imatrix.file", str(path)), ("quantize.imatrix.dataset", "calibration.txt"),
          ("quantize.imatrix.entries_count", len(values)), ("quantize.imatrix.chunks_count", 7)]
    assert llama_quantize(q8, ref, PRESETS["Q4_K_M"].ftype, allow_requantize=True, imatrix=values, kv_overrides=kv) == 0
    _assert_same_file(ours, ref)


def test_worker_processes_split_output(tmp_path, tiny_f16, every_tensor_in_workers):
    """Shards laid out by the writer, filled by the workers: the same tensors as one file."""
    from slmpkg.transforms import quantize_checkpoint

    whole = tmp_path / "whole.gguf"
    quantize_file(tiny_f16, whole, QuantOptions("Q5_K_M"), threads=1, progress=False)
    out, _ = quantize_checkpoint(gguf_format.read(tiny_f16), QuantOptions("Q5_K_M"), threads=2)
    assert all(t.placer is not None for t in out.tensors if t.qtype.name != "F32")
    files = gguf_format.write(tmp_path / "split.gguf", out, split_max_size=200_000)
    assert len(files) > 2
    merged, single = gguf_format.read(files[0]), gguf_format.read(whole)
    assert [t.name for t in merged.tensors] == [t.name for t in single.tensors]
    for a, b in zip(merged.tensors, single.tensors):
        assert np.array_equal(a.raw(), b.raw()), a.name


def test_a_failing_worker_leaves_no_output(tmp_path, tiny_f16, every_tensor_in_workers):
    """The source shrinks after its header was read: a worker's read fails, the error reaches the
    caller naming the file, and nothing is left behind."""
    from slmpkg.errors import FormatError
    from slmpkg.transforms import quantize_checkpoint

    src = tmp_path / "src.gguf"
    src.write_bytes(tiny_f16.read_bytes())
    out, _ = quantize_checkpoint(gguf_format.read(src), QuantOptions("Q4_0"), threads=2)
    with open(src, "r+b") as f:
        f.truncate(src.stat().st_size // 3)
    dst = tmp_path / "out.gguf"
    with pytest.raises(FormatError, match=f"{src}: truncated"):
        gguf_format.write(dst, out)
    assert not dst.exists() and not list(tmp_path.glob(".out.gguf*"))
