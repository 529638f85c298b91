"""slmpkg.formats.safetensors against the real peers: the official ``safetensors`` library reads what we
write and we read what it writes, byte for byte; ``transformers`` loads our sharded directories and gives
the same logits; damaged input fails with one line naming the file; a failed write leaves nothing."""

from __future__ import annotations

import importlib
import json
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from slmpkg.checkpoint import Checkpoint, LazyTensor
from slmpkg.errors import FormatError, UsageError
from slmpkg.formats import safetensors as st
from slmpkg.quant import QuantType


def _need(module: str):
    """The peer library; CI must have it (a dev dependency), elsewhere its tests are skipped."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is missing; pip install it (torch pinned: torch==2.13.0)")
        pytest.skip(f"{module} is not installed")


def _bytes(t: LazyTensor) -> bytes:
    return np.asarray(t.raw()).tobytes()


def _bf16(name: str, bits: np.ndarray) -> LazyTensor:
    data = np.ascontiguousarray(bits, np.uint16)
    return LazyTensor(name, tuple(data.shape), QuantType.BF16, lambda: data.reshape(-1).view(np.uint8))


def _raw_file(path: Path, header: object, data: bytes = b"", header_text: bytes | None = None) -> Path:
    """A safetensors file written by hand, so damaged headers can be made on purpose."""
    text = header_text if header_text is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".partial"))


# ---- official library interop -------------------------------------------------------------------


def test_ours_read_by_official_numpy(tmp_path: Path) -> None:
    st_np = _need("safetensors.numpy")
    rng = np.random.default_rng(0)
    arrays = {
        "z.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "a.half": rng.standard_normal((3,)).astype(np.float16),  # 6 bytes: the next tensor is unaligned
        "m.weight": rng.standard_normal((4, 2, 3)).astype(np.float32),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float16),
    }
    tensors = [LazyTensor.from_array(k, v) for k, v in arrays.items()]
    # from_array makes 0-d arrays 1-d (np.ascontiguousarray does), so the scalar is built by hand
    tensors[3] = LazyTensor("scalar", (), QuantType.F32, lambda: arrays["scalar"].reshape(-1).view(np.uint8))
    files = st.write(tmp_path / "out", Checkpoint({}, tensors))
    assert files == [tmp_path / "out" / "model.safetensors"]
    loaded = st_np.load_file(files[0])
    assert set(loaded) == set(arrays)
    for k, v in arrays.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        np.testing.assert_array_equal(loaded[k], v)
    # and back through our reader, in the order we wrote (checkpoint order)
    again = st.read(tmp_path / "out")
    assert [t.name for t in again.tensors] == list(arrays)
    for t, v in zip(again.tensors, arrays.values()):
        assert _bytes(t) == v.tobytes() and t.shape == v.shape


def test_ours_bf16_read_by_official_torch(tmp_path: Path) -> None:
    torch = _need("torch")
    st_torch = _need("safetensors.torch")
    from slmpkg.quant.floats import to_bf16_bits

    rng = np.random.default_rng(1)
    values = {f"layer.{i}.weight": rng.standard_normal((8, 16)).astype(np.float32) for i in range(3)}
    ckpt = Checkpoint({}, [_bf16(k, to_bf16_bits(v)) for k, v in values.items()])
    st.write(tmp_path / "out", ckpt)
    loaded = st_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert list(sorted(loaded)) == sorted(values)
    for k, v in values.items():
        assert loaded[k].dtype == torch.bfloat16
        expected = torch.from_numpy(v).to(torch.bfloat16)  # torch rounds to nearest even, as ggml does
        assert torch.equal(loaded[k], expected)


def test_official_numpy_file_read_by_ours(tmp_path: Path) -> None:
    st_np = _need("safetensors.numpy")
    rng = np.random.default_rng(2)
    arrays = {
        "b": rng.standard_normal((6, 5)).astype(np.float16),
        "a": rng.standard_normal((4, 8)).astype(np.float32),
        "c": rng.standard_normal((9,)).astype(np.float32),
    }
    path = tmp_path / "x.safetensors"
    st_np.save_file(arrays, path, metadata={"format": "np"})
    ckpt = st.read(path)
    assert sorted(t.name for t in ckpt.tensors) == sorted(arrays)
    assert ckpt.sidecar == {} and ckpt.metadata == {}
    for t in ckpt.tensors:
        assert t.shape == arrays[t.name].shape
        assert t.qtype is (QuantType.F32 if arrays[t.name].dtype == np.float32 else QuantType.F16)
        assert _bytes(t) == arrays[t.name].tobytes()
        np.testing.assert_array_equal(t.float32(), arrays[t.name].astype(np.float32))


def test_official_torch_bf16_file_read_by_ours(tmp_path: Path) -> None:
    torch = _need("torch")
    st_torch = _need("safetensors.torch")
    torch.manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(16, 8).to(torch.bfloat16),
        "n.f32": torch.randn(8),
        "h.f16": torch.randn(2, 3).half(),
    }
    path = tmp_path / "t.safetensors"
    st_torch.save_file(tensors, path, metadata={"format": "pt"})
    ckpt = st.read(path)
    by_name = {t.name: t for t in ckpt.tensors}
    assert set(by_name) == set(tensors)
    assert by_name["w.bf16"].qtype is QuantType.BF16
    for name, x in tensors.items():
        t = by_name[name]
        assert t.shape == tuple(x.shape)
        assert _bytes(t) == x.contiguous().view(torch.uint8).numpy().tobytes()
        np.testing.assert_array_equal(t.float32(), x.float().numpy())


def test_header_layout_matches_the_library(tmp_path: Path) -> None:
    odd = LazyTensor.from_array("odd", np.ones(3, np.float16))
    ckpt = Checkpoint({}, [odd, LazyTensor.from_array("w", np.ones((2, 2), np.float32))])
    st.write(tmp_path / "out", ckpt)
    blob = (tmp_path / "out" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0  # padded with spaces, as the library does, so the data starts 8-byte aligned
    assert blob[8 : 8 + n].rstrip(b" ").endswith(b"}")
    header = json.loads(blob[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["odd"] == {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}
    assert header["w"] == {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}
    assert len(blob) == 8 + n + 22


# ---- sharding and transformers ------------------------------------------------------------------


def _plain_checkpoint(sizes: list[int]) -> Checkpoint:
    return Checkpoint({}, [LazyTensor.from_array(f"t{i}", np.full(n, i, np.float32)) for i, n in enumerate(sizes)])


def test_greedy_sharding_and_index(tmp_path: Path) -> None:
    # 1000-element tensors are 4000 bytes; a 9000-byte limit fits two per shard (headers are small),
    # and the 5000-element tensor (20000 bytes) exceeds it alone, so it gets a shard of its own.
    ckpt = _plain_checkpoint([1000, 1000, 1000, 5000, 1000, 10])
    files = st.write(tmp_path / "out", ckpt, max_shard_size=9000)
    names = [f.name for f in files]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
    for f in files[:-1]:
        if f.name != "model-00003-of-00004.safetensors":
            assert f.stat().st_size <= 9000
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * (1000 * 4 + 5000 + 10)
    assert index["weight_map"] == {
        "t0": names[0], "t1": names[0], "t2": names[1], "t3": names[2], "t4": names[3], "t5": names[3],
    }
    again = st.read(tmp_path / "out")
    assert [t.name for t in again.tensors] == [t.name for t in ckpt.tensors]
    for a, b in zip(again.tensors, ckpt.tensors):
        assert _bytes(a) == _bytes(b)


def test_sharded_output_read_by_official_library(tmp_path: Path) -> None:
    st_np = _need("safetensors.numpy")
    ckpt = _plain_checkpoint([300, 200, 100, 50])
    files = st.write(tmp_path / "out", ckpt, max_shard_size="1.5KB")
    loaded: dict[str, np.ndarray] = {}
    for f in files:
        if f.suffix == ".safetensors":
            loaded.update(st_np.load_file(f))
    assert sorted(loaded) == ["t0", "t1", "t2", "t3"]
    for t in ckpt.tensors:
        np.testing.assert_array_equal(loaded[t.name], t.float32())


def test_read_order_is_shard_name_then_data_offset(tmp_path: Path) -> None:
    st_np = _need("safetensors.numpy")
    d = tmp_path / "m"
    d.mkdir()
    # the library lays data out by name; the index lists names in another order on purpose
    st_np.save_file({"b": np.ones(2, np.float32), "a": np.ones(3, np.float32)}, d / "model-00002-of-00002.safetensors")
    st_np.save_file({"y": np.ones(1, np.float32), "x": np.ones(4, np.float32), "extra": np.ones(1, np.float32)},
                    d / "model-00001-of-00002.safetensors")
    weight_map = {"b": "model-00002-of-00002.safetensors", "a": "model-00002-of-00002.safetensors",
                  "y": "model-00001-of-00002.safetensors", "x": "model-00001-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = st.read(d)
    # "extra" sits in a shard but the index does not place it there: ignored, as transformers does
    assert [t.name for t in ckpt.tensors] == ["x", "y", "a", "b"]
    assert ckpt.sidecar == {}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    torch = _need("torch")
    transformers = _need("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama") / "A"
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _logits(model, torch) -> "object":
    ids = torch.tensor([[1, 5, 17, 42, 99, 127, 3]])
    with torch.no_grad():
        return model(ids).logits


def test_transformers_loads_our_shards(tiny_llama, tmp_path: Path) -> None:
    torch = _need("torch")
    transformers = _need("transformers")
    model, src = tiny_llama
    ckpt = st.read(src)
    assert {"config.json", "generation_config.json"} <= set(ckpt.sidecar)
    files = st.write(tmp_path / "B", ckpt, max_shard_size=100_000)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) >= 3 and all(f.stat().st_size <= 100_000 for f in shards)
    assert (tmp_path / "B" / "config.json").read_bytes() == (src / "config.json").read_bytes()

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "B").eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert torch.equal(_logits(model, torch), _logits(loaded, torch))


def test_transformers_bf16_round_trip_is_byte_identical(tiny_llama, tmp_path: Path) -> None:
    torch = _need("torch")
    transformers = _need("transformers")
    _model, src = tiny_llama
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "A16", safe_serialization=True)
    ckpt = st.read(tmp_path / "A16")
    assert {t.qtype for t in ckpt.tensors} == {QuantType.BF16}

    # one shard: the very same file transformers wrote (same order, header and padding)
    st.write(tmp_path / "B1", ckpt)
    assert (tmp_path / "B1" / "model.safetensors").read_bytes() == (tmp_path / "A16" / "model.safetensors").read_bytes()

    # several shards: every tensor byte-identical, and transformers loads it
    st.write(tmp_path / "B", ckpt, max_shard_size=50_000)
    again = st.read(tmp_path / "B")
    assert [t.name for t in again.tensors] == [t.name for t in ckpt.tensors]
    for a, b in zip(again.tensors, ckpt.tensors):
        assert a.qtype is QuantType.BF16 and _bytes(a) == _bytes(b)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "B", dtype=torch.bfloat16).eval()
    for k, v in model.state_dict().items():
        assert loaded.state_dict()[k].dtype == torch.bfloat16 and torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(_logits(model, torch), _logits(loaded, torch))


# ---- sidecar files ------------------------------------------------------------------------------


def test_sidecar_selection_and_copy(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    st.write(d / "w", _plain_checkpoint([4]))
    (d / "w" / "model.safetensors").rename(d / "model.safetensors")
    (d / "w").rmdir()
    files = {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "tokenizer.model": bytes(range(256)),
        "chat_template.jinja": b"{{ messages }}",
        "README.md": b"# card",
        "merges.txt": b"a b\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    for skipped in ("pytorch_model.bin", "pytorch_model.bin.index.json", ".gitattributes", "model.gguf"):
        (d / skipped).write_bytes(b"not a sidecar")
    (d / "onnx").mkdir()
    (d / "onnx" / "model.onnx").write_bytes(b"x")

    ckpt = st.read(d)
    assert ckpt.sidecar == files
    out = st.write(tmp_path / "copy", ckpt)
    assert [p.name for p in out] == ["model.safetensors"] + sorted(files)
    for name, data in files.items():
        assert (tmp_path / "copy" / name).read_bytes() == data


@pytest.mark.parametrize(
    "bad", ["/etc/passwd", "../escape.json", "model.safetensors", "model-00001-of-00002.safetensors", "X.BIN"]
)
def test_sidecar_names_that_would_escape_or_collide_are_refused(tmp_path: Path, bad: str) -> None:
    ckpt = Checkpoint({}, _plain_checkpoint([4]).tensors, {bad: b"x"})
    with pytest.raises(FormatError, match="sidecar"):
        st.write(tmp_path / "out", ckpt)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ---- bad input ----------------------------------------------------------------------------------


def _one_f32(tmp_path: Path, **entry: object) -> Path:
    info = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **entry}
    return _raw_file(tmp_path / "bad.safetensors", {"w": info}, bytes(8))


def _index_dir(tmp_path: Path, weight_map: dict[str, str]) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    _raw_file(d / "model-00001-of-00002.safetensors", {"a": entry}, bytes(4))
    index = {"metadata": {"total_size": 4}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d / "model.safetensors.index.json"


def _header_too_long(p: Path) -> Path:
    path = p / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    return path


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    # case: (make it, returning the path to read; words the message must contain)
    "missing": (lambda p: p / "nope", "no such file"),
    "empty dir": (lambda p: (p / "empty").mkdir() or p / "empty", "no .safetensors"),
    "short file": (lambda p: _write(p / "s.safetensors", b"\x01\x02"), "shorter than"),
    "header too long": (_header_too_long, "header length 1000000000 is larger than the file"),
    "not json": (lambda p: _raw_file(p / "j.safetensors", None, header_text=b"{not json"), "not JSON"),
    "json not object": (lambda p: _raw_file(p / "o.safetensors", [1, 2]), "not an object"),
    "offsets outside": (lambda p: _one_f32(p, shape=[4], data_offsets=[0, 16]), "outside the file"),
    "offsets vs shape": (lambda p: _one_f32(p, shape=[3]), "needs 12"),
    "bad offsets": (lambda p: _one_f32(p, data_offsets=[8, 0]), "data_offsets"),
    "bad shape": (lambda p: _one_f32(p, shape=[-1]), "shape"),
    "F8_E4M3": (lambda p: _one_f32(p, dtype="F8_E4M3", shape=[8]), "tensor 'w' has dtype F8_E4M3"),
    "U16": (lambda p: _one_f32(p, dtype="U16", shape=[4]), "tensor 'w' has dtype U16"),
    "unknown dtype": (lambda p: _one_f32(p, dtype="F3"), "unknown dtype 'F3'"),
    "index names missing shard": (lambda p: _index_dir(p, {"a": "model-00001-of-00002.safetensors",
                                                           "b": "model-00002-of-00002.safetensors"}).parent,
                                  "names shard model-00002-of-00002.safetensors, which does not exist"),
    "index names missing tensor": (lambda p: _index_dir(p, {"a": "model-00001-of-00002.safetensors",
                                                            "zz": "model-00001-of-00002.safetensors"}).parent,
                                   "lacks tensor 'zz'"),
    "index escapes": (lambda p: _index_dir(p, {"a": "../model-00001-of-00002.safetensors"}).parent, "not a file in"),
    "index not json": (lambda p: _write(p / "d" / "model.safetensors.index.json", b"{").parent, "not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    make, words = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(FormatError) as info:
        st.read(path)
    message = str(info.value)
    assert "\n" not in message
    assert words in message
    # the file named is the one at fault: the path itself, or a file inside the directory
    assert str(tmp_path) in message and message.startswith(str(tmp_path)), message


def test_ambiguous_directory_is_refused(tmp_path: Path) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        _raw_file(tmp_path / name, {})
    with pytest.raises(FormatError, match="cannot tell which weights"):
        st.read(tmp_path)


# ---- failed writes leave nothing ----------------------------------------------------------------


def _boom() -> np.ndarray:
    raise OSError("disk on fire")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    good = LazyTensor.from_array("good", np.ones(64, np.float32))
    bad = LazyTensor("bad", (4,), QuantType.F32, _boom)
    ckpt = Checkpoint({}, [good, bad], {"config.json": b"{}"})
    with pytest.raises(OSError, match="disk on fire"):
        st.write(tmp_path / "out", ckpt, max_shard_size=100)  # the first shard completes before the failure
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_quantized_tensor_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    q4 = LazyTensor("blk.0.ffn_down.weight", (1, 256), QuantType.Q4_K, lambda: np.zeros(144, np.uint8))
    ckpt = Checkpoint({}, [LazyTensor.from_array("ok", np.ones(4, np.float32)), q4])
    with pytest.raises(FormatError, match=r"tensor blk\.0\.ffn_down\.weight: type Q4_K"):
        st.write(tmp_path / "out", ckpt)
    assert list(tmp_path.iterdir()) == []


def test_wrong_byte_count_from_raw_is_caught(tmp_path: Path) -> None:
    liar = LazyTensor("liar", (4,), QuantType.F32, lambda: np.zeros(8, np.uint8))
    with pytest.raises(FormatError, match="liar: produced 8 bytes, expected 16"):
        st.write(tmp_path / "out", Checkpoint({}, [liar]))
    assert list(tmp_path.iterdir()) == []


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    t = LazyTensor.from_array("w", np.ones(4, np.float32))
    with pytest.raises(FormatError, match="w: name is duplicated"):
        st.write(tmp_path / "out", Checkpoint({}, [t, t]))
    assert list(tmp_path.iterdir()) == []


def test_target_rules(tmp_path: Path) -> None:
    ckpt = _plain_checkpoint([4])
    # an existing empty directory is replaced by the result
    (tmp_path / "empty").mkdir()
    st.write(tmp_path / "empty", ckpt)
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    # a non-empty directory is never overwritten
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        st.write(tmp_path / "full", ckpt)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    # nor is a file
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        st.write(tmp_path / "file", ckpt)
    # nor a symbolic link (renaming onto it would replace the link)
    (tmp_path / "link").symlink_to(tmp_path / "empty2", target_is_directory=True)
    (tmp_path / "empty2").mkdir()
    with pytest.raises(UsageError, match="symbolic link"):
        st.write(tmp_path / "link", ckpt)
    # missing parents are created
    st.write(tmp_path / "a" / "b" / "c", ckpt)
    assert (tmp_path / "a" / "b" / "c" / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


# ---- laziness and streaming ---------------------------------------------------------------------


def test_read_touches_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 256 MiB tensor in a sparse file: read() must not read it; raw() reads exactly its bytes, each call.
    path = tmp_path / "big.safetensors"
    n = 64 * 2**20
    entry = {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}
    _raw_file(path, {"__metadata__": {"format": "pt"}, "big": entry})
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 4 * n)
    reads: list[tuple[int, int]] = []
    real = st.read_range

    def counting(p, offset, nbytes):
        reads.append((offset, nbytes))
        return real(p, offset, nbytes)

    monkeypatch.setattr(st, "read_range", counting)
    ckpt = st.read(path)
    assert reads == []
    (t,) = ckpt.tensors
    raw = t.raw()
    assert len(reads) == 1 and reads[0][1] == 4 * n
    assert raw.dtype == np.uint8 and raw.nbytes == t.nbytes == 4 * n and not raw.any()


def test_writer_pulls_one_tensor_at_a_time(tmp_path: Path) -> None:
    events: list[str] = []

    def lazy(name: str, n: int) -> LazyTensor:
        data = np.arange(n, dtype=np.float32)

        def load() -> np.ndarray:
            events.append(f"raw {name}")
            return data.view(np.uint8)

        return LazyTensor(name, (n,), QuantType.F32, load)

    ckpt = Checkpoint({}, [lazy("a", 10), lazy("b", 20), lazy("c", 30)])
    st.write(tmp_path / "out", ckpt, max_shard_size=150, on_tensor=lambda t: events.append(f"done {t.name}"))
    assert events == ["raw a", "done a", "raw b", "done b", "raw c", "done c"]


# ---- --max-shard-size ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("10kb", 10_000),
     ("4096", 4096), (" 3 MiB ", 3 * 2**20), (123, 123)],
)
def test_parse_size(text: object, expected: int) -> None:
    assert st.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", 0, "1e9", True])
def test_parse_size_refuses(text: object) -> None:
    with pytest.raises(UsageError):
        st.parse_size(text)


def test_integer_buffers_are_read_as_ggml_integer_types(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"ids": np.arange(6, dtype=np.int64).reshape(1, 6), "w": np.ones(4, np.float32)}, tmp_path / "model.safetensors")
    tensors = {t.name: t for t in st.read(tmp_path).tensors}
    assert tensors["ids"].qtype is QuantType.I64 and tensors["ids"].shape == (1, 6)
    assert np.array_equal(tensors["ids"].raw().view(np.int64), np.arange(6))


def test_sidecar_reads_one_level_of_subfolders(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.ones(4, np.float32)}, tmp_path / "model.safetensors")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (tmp_path / "1_Pooling" / "deeper").mkdir()
    (tmp_path / "1_Pooling" / "deeper" / "x.json").write_text("{}")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    sidecar = st.read(tmp_path).sidecar
    assert sidecar == {"1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}
    out = tmp_path.parent / "copy"
    st.write(out, Checkpoint({}, st.read(tmp_path).tensors, sidecar))
    assert (out / "1_Pooling" / "config.json").read_bytes() == sidecar["1_Pooling/config.json"]


def test_conversion_streams_in_slabs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cast of a file-backed tensor reads and writes it in row slabs, never the whole tensor at once."""
    import slmpkg.checkpoint as checkpoint
    from safetensors.numpy import save_file

    data = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    save_file({"w": data}, tmp_path / "model.safetensors")
    monkeypatch.setattr(checkpoint, "SLAB_BYTES", 16 * 256 * 4)  # 16 rows a slab
    reads: list[int] = []
    real = st.read_range
    monkeypatch.setattr(st, "read_range", lambda p, o, n: reads.append(n) or real(p, o, n))
    (t,) = st.read(tmp_path).tensors
    half = t.converted(QuantType.F16)
    pieces = list(half.iter_bytes())
    assert [p.size for p in pieces] == [16 * 256 * 2] * 4
    assert reads == [16 * 256 * 4] * 4  # four ranged reads of one slab each, no whole-tensor read
    assert np.array_equal(np.concatenate(pieces).view(np.float16).reshape(64, 256), data.astype(np.float16))
    out = tmp_path / "out"
    st.write(out, Checkpoint({}, [half]))
    assert np.array_equal(st.read(out).tensors[0].raw().view(np.float16).reshape(64, 256), data.astype(np.float16))
