"""The GGUF header reader against gguf-py's own ``GGUFReader`` (the independent peer), and its refusals:
every truncation and a fuzz of damaged headers give one ``FormatError`` naming the file, nothing else."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter

from slmpkg import quant
from slmpkg.checkpoint import Checkpoint, LazyTensor, MetaValue
from slmpkg.errors import FormatError
from slmpkg.formats import gguf as gguf_format

SCALARS = [
    ("u8", V.UINT8, 200), ("i8", V.INT8, -100), ("u16", V.UINT16, 60000), ("i16", V.INT16, -30000),
    ("u32", V.UINT32, 4_000_000_000), ("i32", V.INT32, -2_000_000_000), ("u64", V.UINT64, 2**63 + 5),
    ("i64", V.INT64, -(2**62)), ("f32", V.FLOAT32, 0.1), ("f64", V.FLOAT64, 1e-300), ("bool", V.BOOL, True),
]


def _gguf_py_file(path: Path, alignment: int = 32) -> Path:
    """A file written by gguf-py's writer (not ours), with every value type and a few tensor types."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    if alignment != 32:
        w.add_custom_alignment(alignment)
    for key, vtype, value in SCALARS:
        w.add_key_value(f"test.{key}", value, vtype)
    w.add_string("test.string", "héllo ☃")
    w.add_key_value("test.bad_utf8", b"ok\xff\xfe", V.STRING)
    w.add_array("test.strings", ["a", "", "Ġthe", "☃☃", b"\xe4\xb8", "<0x0A>"])
    for name, vtype in (("i32", V.INT32), ("f32", V.FLOAT32), ("u8", V.UINT8), ("i64", V.INT64), ("f64", V.FLOAT64)):
        w.add_key_value(f"test.array_{name}", rng.integers(0, 100, 7).tolist(), V.ARRAY, sub_type=vtype)
    w.add_array("test.bools", [True, False, True])
    x = rng.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("a.f32", x)
    w.add_tensor("b.f16", x.astype(np.float16))
    w.add_tensor("c.q4_0", quant.quantize(x, T.Q4_0), raw_dtype=T.Q4_0)
    w.add_tensor("d.vec", x[0].copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path: Path) -> tuple[dict[str, MetaValue], list[tuple[str, tuple[int, ...], T, bytes]]]:
    """What gguf-py's reader finds, in our terms."""
    r = GGUFReader(path)
    metadata = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        kind = V(field.types[0])
        if kind is V.ARRAY:
            item = V(field.types[-1])
            if item is V.STRING:
                value = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
            else:
                value = np.concatenate([field.parts[i] for i in field.data])
            metadata[name] = MetaValue(kind, value, item)
        elif kind is V.STRING:
            metadata[name] = MetaValue(kind, bytes(field.parts[-1]).decode("utf-8", errors="surrogateescape"))
        else:
            metadata[name] = MetaValue(kind, field.parts[-1].tolist()[0])
    tensors = [(t.name, tuple(reversed(t.shape.tolist())), T(int(t.tensor_type)), bytes(t.data.view(np.uint8)))
               for t in r.tensors]
    return metadata, tensors


def _assert_same_metadata(ours: dict[str, MetaValue], ref: dict[str, MetaValue]) -> None:
    assert list(ours) == list(ref)
    for key, item in ref.items():
        mine = ours[key]
        assert (mine.type, mine.item_type) == (item.type, item.item_type), key
        if isinstance(item.value, np.ndarray):
            assert mine.value.dtype == item.value.dtype and np.array_equal(mine.value, item.value), key
        elif item.item_type is V.STRING:
            assert list(mine.value) == item.value and mine.value == item.value, key
        else:
            assert type(mine.value) is type(item.value) and mine.value == item.value, key


@pytest.mark.parametrize("alignment", [32, 64])
def test_reads_what_gguf_py_reads(tmp_path, alignment):
    path = _gguf_py_file(tmp_path / "m.gguf", alignment)
    ckpt = gguf_format.read(path)
    ref_meta, ref_tensors = _reference(path)
    _assert_same_metadata(ckpt.metadata, ref_meta)
    assert ckpt.get("test.bad_utf8") == "ok\udcff\udcfe"
    assert ckpt.get("test.strings")[4] == "\udce4\udcb8"
    assert [(t.name, t.shape, t.qtype) for t in ckpt.tensors] == [(n, s, q) for n, s, q, _ in ref_tensors]
    for t, (_, _, _, data) in zip(ckpt.tensors, ref_tensors):
        assert t.raw().tobytes() == data, t.name


def test_string_arrays_are_carried_as_read(tmp_path):
    """A vocabulary read and written again is the same bytes, decoded or not; a changed one is re-encoded."""
    path = _gguf_py_file(tmp_path / "m.gguf")
    ckpt = gguf_format.read(path)
    strings = ckpt.metadata["test.strings"].value
    assert isinstance(strings, gguf_format.StringArray) and len(strings) == 6
    copy = tmp_path / "copy.gguf"
    gguf_format.write(copy, ckpt)
    assert copy.read_bytes() == path.read_bytes()
    assert strings[2] == "Ġthe" and strings[-2:] == ["\udce4\udcb8", "<0x0A>"]  # now decoded: still the same bytes
    gguf_format.write(copy, ckpt)
    assert copy.read_bytes() == path.read_bytes()
    ckpt.metadata["test.strings"] = MetaValue(V.ARRAY, list(strings) + ["new"], V.STRING)
    gguf_format.write(copy, ckpt)
    assert list(gguf_format.read(copy).get("test.strings")) == list(strings) + ["new"]
    assert strings != list(strings)[:-1] and strings == tuple(strings)


def test_round_trip_of_our_writer_including_empty_arrays(tmp_path):
    metadata = {
        "general.architecture": MetaValue(V.STRING, "llama"),
        "empty.strings": MetaValue(V.ARRAY, [], V.STRING),
        "empty.ints": MetaValue(V.ARRAY, np.empty(0, np.int32), V.INT32),
        "vocab": MetaValue(V.ARRAY, [f"tok{i}" * (i % 5) for i in range(5000)], V.STRING),
    }
    x = np.arange(256, dtype=np.float32).reshape(4, 64)
    path = tmp_path / "m.gguf"
    gguf_format.write(path, Checkpoint(metadata, [LazyTensor.from_array("w", x)]))
    back = gguf_format.read(path)
    assert back.get("vocab") == metadata["vocab"].value
    assert back.get("empty.strings") == [] and back.get("empty.ints").dtype == np.int32
    assert back.get("empty.ints").size == 0
    assert np.array_equal(back.tensors[0].float32(), x)


def _only_format_errors(path: Path) -> str:
    """Read ``path``; it must either parse (returns "") or fail with a FormatError naming it."""
    try:
        ckpt = gguf_format.read(path)
        for t in ckpt.tensors:
            assert t.raw().size == t.nbytes
    except FormatError as e:
        message = str(e)
        assert message.startswith(str(path)) and "\n" not in message
        return message
    return ""


def test_every_truncation_is_a_format_error(tmp_path):
    src = _gguf_py_file(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    messages = set()
    for n in range(4, len(src)):
        cut.write_bytes(src[:n])
        message = _only_format_errors(cut)
        assert "truncated" in message, (n, message)
        messages.add(message[len(str(cut)):])
    assert len(messages) > 5  # the messages say where the file ended, not one catch-all


def test_damaged_headers_are_format_errors(tmp_path):
    src = bytearray(_gguf_py_file(tmp_path / "m.gguf").read_bytes())
    header_end = len(src) - sum(t.nbytes for t in gguf_format.read(tmp_path / "m.gguf").tensors)
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad.gguf"
    refused = 0
    for _ in range(1500):
        data = bytearray(src)
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(4, header_end))
            data[at] = int(rng.integers(0, 256)) if rng.random() < 0.7 else 0xFF
        bad.write_bytes(bytes(data))
        refused += bool(_only_format_errors(bad))
    assert refused > 300


def _header(*parts: bytes, version: int = 3, n_tensors: int = 0, n_kv: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(parts)


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.mark.parametrize("data, fragment", [
    (_header(version=1), "version 1 is not supported"),
    (_header(version=3 << 24), "big-endian"),
    (_header(_s("k"), struct.pack("<I", 99)), "unknown value type 99"),
    (_header(_s("k"), struct.pack("<IIQ", 9, 9, 1)), "nested arrays are not supported (key k)"),
    (_header(_s("k"), struct.pack("<IIQ", 9, 5, 2**61)), "truncated: array k"),
    (_header(_s("k"), struct.pack("<IIQ", 9, 8, 2**60)), "truncated: array k"),
    (_header(_s("k"), struct.pack("<IQ", 8, 2**63)), "truncated: value of k"),
    (_header(_s("k"), struct.pack("<IB", 0, 1), _s("k"), struct.pack("<IB", 0, 2), n_kv=2), "duplicate key k"),
    (_header(_s("general.alignment"), struct.pack("<IQ", 10, 64)), "general.alignment must be UINT32"),
    (_header(_s("general.alignment"), struct.pack("<II", 4, 48)), "48 is not a power of two"),
    (_header(n_kv=2**40), "damaged header"),
    (_header(b"\xff" * 8 + b"x" * 4, n_kv=1), "truncated: key"),
    (_header(struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1)), "key at byte 24 is not UTF-8"),
    (_header(_s("t"), struct.pack("<I2QIQ", 2, 64, 1, 99, 0), n_tensors=1, n_kv=0), "unknown type id 99"),
    (_header(_s("t"), struct.pack("<I5Q", 5, 1, 1, 1, 1, 1), b"\0" * 12, n_tensors=1, n_kv=0), "5 dimensions"),
    (_header(_s("t"), struct.pack("<I2QIQ", 2, 48, 1, 2, 0), n_tensors=1, n_kv=0), "rows of 48"),
    (_header(_s("t"), struct.pack("<I1QIQ", 1, 8, 0, 0), _s("t"), struct.pack("<I1QIQ", 1, 8, 0, 32),
             n_tensors=2, n_kv=0), "duplicate tensor t"),
    (_header(_s("t"), struct.pack("<I1QIQ", 1, 2**40, 0, 0), n_tensors=1, n_kv=0), "truncated: tensor t ends"),
])
def test_refusals_name_the_file_and_the_problem(tmp_path, data, fragment):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data + bytes(64))
    message = _only_format_errors(path)
    assert fragment in message, message


def test_gguf_py_refuses_what_we_call_damaged(tmp_path):
    """Cross-check a refusal with the peer: gguf-py fails on the duplicate key too."""
    path = tmp_path / "dup.gguf"
    path.write_bytes(_header(_s("k"), struct.pack("<IB", 0, 1), _s("k"), struct.pack("<IB", 0, 2), n_kv=2) + bytes(32))
    with pytest.raises(KeyError):
        GGUFReader(path)
    with pytest.raises(FormatError, match="duplicate key"):
        gguf_format.read(path)


@pytest.mark.parametrize("kernel_copy", ["unsupported", "absent"])
def test_copy_without_copy_file_range(tmp_path, monkeypatch, kernel_copy):
    """Unchanged tensors are copied file to file in the kernel where it can; elsewhere through memory,
    to the same bytes."""
    import errno
    import os

    path = _gguf_py_file(tmp_path / "m.gguf")
    expected = tmp_path / "expected.gguf"
    gguf_format.write(expected, gguf_format.read(path))
    assert expected.read_bytes() == path.read_bytes()
    if kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    copy = tmp_path / "copy.gguf"
    gguf_format.write(copy, gguf_format.read(path))
    assert copy.read_bytes() == path.read_bytes()
