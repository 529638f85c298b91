"""safetensors: Hugging Face model directories, read lazily and written as streamed shards.

A model directory holds the weights (``model.safetensors``, or shards listed by
``model.safetensors.index.json``) and the files that travel beside them (config.json,
generation_config.json, tokenizer files, chat template). :func:`read` parses the safetensors headers
itself and exposes every tensor as a :class:`~slmpkg.checkpoint.LazyTensor` whose ``raw()`` is a
zero-copy slice of a memory map, so reading a directory never touches tensor data; the other files go
to ``Checkpoint.sidecar``. :func:`write` lays out each shard's header first (offsets follow from
shapes and dtypes before any data exists), then pulls one tensor at a time, so peak memory is about
one tensor; the whole directory is built beside the target and moved into place when complete.

File layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{"__metadata__": {str: str}, NAME: {"dtype", "shape", "data_offsets": [begin, end]}}``
(offsets relative to the byte after the header), then the tensor data, contiguous, no gaps.

Example:
    >>> from slmpkg.formats import safetensors as st
    >>> ckpt = st.read("tiny-llama/")                                   # doctest: +SKIP
    >>> [t.name for t in ckpt.tensors][:1], sorted(ckpt.sidecar)[:1]    # doctest: +SKIP
    (['model.embed_tokens.weight'], ['config.json'])
    >>> st.write("tiny-llama-sharded/", ckpt, max_shard_size="500MB")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Union

import numpy as np

from .._io import atomic_directory, check_output_directory, read_range, write_synced
from ..checkpoint import Checkpoint, LazyTensor
from ..errors import FormatError
from ..quant import QuantType
from ..sizes import parse_size

__all__ = [
    "read",
    "write",
    "SINGLE_FILE",
    "INDEX_FILE",
    "DEFAULT_MAX_SHARD_SIZE",
    "WRITABLE_TYPES",
]

PathLike = Union[str, "os.PathLike[str]"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default ("5GB")

# Every dtype the safetensors format defines, with its element size: a header is validated in full
# (offsets against shape x dtype) even for tensors we then refuse, so "damaged file" and "dtype we do
# not handle" are told apart. Sub-byte types (F4, F6_*) are absent: they are reported as unknown.
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# The dtypes slmpkg holds in a Checkpoint: the float types the quantizer reads and writes, and the
# integer/double types ggml also has (buffers such as BERT's int64 position_ids, which mappings skip).
_DTYPE_TO_QTYPE = {
    "F32": QuantType.F32, "F16": QuantType.F16, "BF16": QuantType.BF16, "F64": QuantType.F64,
    "I8": QuantType.I8, "I16": QuantType.I16, "I32": QuantType.I32, "I64": QuantType.I64,
}
_QTYPE_TO_DTYPE = {q: d for d, q in _DTYPE_TO_QTYPE.items()}
WRITABLE_TYPES: tuple[QuantType, ...] = tuple(_QTYPE_TO_DTYPE)

# Files in a model directory that are weights in some other format (or their indexes): never sidecar,
# both because they are not "beside the weights" and because reading them eagerly would load a model.
_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data",
    ".onnx.data", ".tflite", ".ot", ".npz", ".npy", ".pb", ".index.json",
)


# ---- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _MappedFile:
    """One safetensors file whose tensors are read on demand, each into its own buffer
    (:func:`slmpkg._io.read_range`), so ``read`` reads no data and a written tensor's memory is freed."""

    def __init__(self, path: Path, data_start: int) -> None:
        self.path = path
        self.data_start = data_start

    def tensor(self, name: str, shape: tuple[int, ...], qtype: QuantType, begin: int, end: int) -> LazyTensor:
        base = self.data_start + begin
        return LazyTensor(
            name, shape, qtype,
            raw=lambda: read_range(self.path, base, end - begin),
            read=lambda offset, n: read_range(self.path, base + offset, n),
        )


def _parse_header(path: Path) -> tuple[dict[str, str], list[_Entry], int]:
    """(``__metadata__``, entries in data-offset order, data start) of one safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(
                    f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise FormatError(f"{path}: header length {n} is larger than the file ({size} bytes)")
            raw_header = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise FormatError(f"{path}: header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is JSON but not an object")

    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: __metadata__ is not an object")
    data_start = 8 + n
    data_size = size - data_start
    entries = [_parse_entry(path, name, info, data_size) for name, info in header.items()]
    # Order = where the data sits in the file; zero-size tensors share an offset, the name breaks the tie.
    entries.sort(key=lambda e: (e.begin, e.end, e.name))
    return {str(k): str(v) for k, v in meta.items()}, entries, data_start


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(path: Path, name: str, info: Any, data_size: int) -> _Entry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise FormatError(f"{where}: missing or non-string dtype")
    if dtype not in _DTYPE_SIZES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise FormatError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the file's {data_size} data bytes"
        )
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise FormatError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes"
            f" but shape {shape} x {dtype} needs {expected}"
        )
    return _Entry(name, dtype, tuple(shape), begin, end)


def _lazy(path: Path, mapped: _MappedFile, entry: _Entry) -> LazyTensor:
    qtype = _DTYPE_TO_QTYPE.get(entry.dtype)
    if qtype is None:
        raise FormatError(
            f"{path}: tensor {entry.name!r} has dtype {entry.dtype}; slmpkg reads only {', '.join(_DTYPE_TO_QTYPE)}"
        )
    return mapped.tensor(entry.name, entry.shape, qtype, entry.begin, entry.end)


def _read_file(path: Path, only: Optional[set[str]] = None) -> list[LazyTensor]:
    """The tensors of one file in data-offset order (``only``: keep just these names)."""
    _meta, entries, data_start = _parse_header(path)
    mapped = _MappedFile(path, data_start)
    return [_lazy(path, mapped, e) for e in entries if only is None or e.name in only]


def _read_index(index: Path) -> list[LazyTensor]:
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"{index}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{index}: not JSON ({type(e).__name__}: {e})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index}: no weight_map object mapping tensor names to shard files")

    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        rel = PurePosixPath(shard)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise FormatError(f"{index}: shard name {shard!r} (for tensor {name!r}) is not a file in the directory")
        by_shard.setdefault(shard, set()).add(name)

    tensors: list[LazyTensor] = []
    # Shards in file-name order (HF numbers them model-00001-of-0000N); inside a shard, data-offset
    # order. The weight_map decides which tensors belong to the model: a tensor a shard holds but the
    # map assigns elsewhere (or not at all) is ignored, as transformers does, so names stay unique.
    for shard in sorted(by_shard):
        path = index.parent / shard
        if not path.is_file():
            raise FormatError(f"{index}: names shard {shard}, which does not exist")
        wanted = by_shard[shard]
        found = _read_file(path, wanted)
        missing = wanted - {t.name for t in found}
        if missing:
            first = sorted(missing)[0]
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FormatError(f"{path}: lacks tensor {first!r}{more}, which {index.name} places in it")
        tensors += found
    return tensors


def _is_sidecar(p: Path) -> bool:
    name = p.name.lower()
    # Hidden files (.gitattributes, .DS_Store, editor swap files) are repository plumbing, not model files.
    return p.is_file() and not name.startswith(".") and not name.endswith(_WEIGHT_SUFFIXES)


# how deep sidecar files are collected: sentence-transformers keeps its pooling settings one level
# down (1_Pooling/config.json); deeper trees are not part of a model's own files
_SIDECAR_DEPTH = 2


def _read_sidecar(directory: Path, prefix: str = "", depth: int = _SIDECAR_DEPTH) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in sorted(directory.iterdir()):
        if _is_sidecar(p):
            try:
                out[prefix + p.name] = p.read_bytes()
            except OSError as e:
                raise FormatError(f"{p}: cannot read ({e.strerror or e})") from None
        elif depth > 1 and p.is_dir() and not p.is_symlink() and not p.name.startswith("."):
            out.update(_read_sidecar(p, f"{prefix}{p.name}/", depth - 1))
    return out


def read(path: PathLike) -> Checkpoint:
    """Open a Hugging Face model directory, or one ``.safetensors`` file, without reading tensor data.

    Which weights a directory means (transformers' own precedence): ``model.safetensors`` if present,
    else ``model.safetensors.index.json`` and the shards it names, else the directory's only
    ``*.safetensors.index.json`` or only ``*.safetensors`` file.

    Tensor order is deterministic: shard files in name order, and inside each file the order of the
    data (``data_offsets``), which is the order the writer stored them in; :func:`write` keeps
    checkpoint order, so ``write(read(d))`` reproduces the order. Names are the HF names as stored.
    ``raw()`` reads the tensor's bytes into a fresh uint8 array (``nbytes`` long); BF16 stays raw
    bits because numpy has no bfloat16. ``metadata`` is empty (mapping config.json to typed metadata
    is the architecture mapper's job). ``sidecar`` holds every other regular file of the directory
    by name (config.json, tokenizer files, chat template, README...), except hidden files,
    subdirectories and weights of other formats; reading one file gives an empty sidecar.

    Raises :class:`FormatError` (one line naming the file) for a missing path, a directory without
    safetensors, a damaged header, offsets outside the file or not matching shape x dtype, a dtype
    other than F32/F16/BF16, or an index naming a missing shard or a tensor its shard lacks.

    Example:
        >>> ckpt = read("tiny-llama/")                                   # doctest: +SKIP
        >>> t = ckpt.tensors[0]; t.qtype.name, t.raw().nbytes == t.nbytes # doctest: +SKIP
        ('BF16', True)
    """
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            raise FormatError(f"{path}: is an index; pass the directory that holds it")
        return Checkpoint({}, _read_file(path))
    if not path.is_dir():
        raise FormatError(f"{path}: no such file or directory")

    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        tensors = _read_file(single)
    elif index.is_file():
        tensors = _read_index(index)
    else:
        indexes = sorted(p for p in path.glob("*.safetensors.index.json") if p.is_file())
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(indexes) == 1:
            tensors = _read_index(indexes[0])
        elif not indexes and len(files) == 1:
            tensors = _read_file(files[0])
        elif not indexes and not files:
            raise FormatError(f"{path}: no .safetensors files in the directory")
        else:
            names = ", ".join(p.name for p in (indexes or files))
            raise FormatError(f"{path}: cannot tell which weights to read ({names}); pass one file")
    return Checkpoint({}, tensors, _read_sidecar(path))


# ---- writing ------------------------------------------------------------------------------------

def _tensor_bytes(t: LazyTensor) -> int:
    # computed here rather than LazyTensor.nbytes, which divides by the last dimension (0 in empty tensors)
    return int(np.prod(t.shape, dtype=np.int64)) * _DTYPE_SIZES[_QTYPE_TO_DTYPE[t.qtype]]


@dataclass
class _Shard:
    tensors: list[LazyTensor]
    header: bytes  # the 8-byte length, the JSON and its padding: everything before the data
    data_size: int

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


_META_FRAGMENT = '"__metadata__":' + json.dumps({"format": "pt"}, separators=(",", ":"))


def _entry_fragment(t: LazyTensor, begin: int, end: int) -> str:
    info = {"dtype": _QTYPE_TO_DTYPE[t.qtype], "shape": list(t.shape), "data_offsets": [begin, end]}
    return json.dumps(t.name) + ":" + json.dumps(info, separators=(",", ":"))


def _header_bytes(fragments: list[str], json_len: int) -> bytes:
    text = ("{" + ",".join(fragments) + "}").encode("utf-8")
    assert len(text) == json_len
    # The safetensors library pads the JSON with spaces so the data starts 8-byte aligned.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _plan(tensors: list[LazyTensor], max_shard_size: int) -> list[_Shard]:
    """Greedy shards in checkpoint order, each file (header included) at most ``max_shard_size``.

    A header entry's text depends only on its own offset, so the header length is a running sum and
    each candidate costs O(1); a tensor too big for any shard gets a shard of its own.
    """
    shards: list[_Shard] = []
    cur: list[LazyTensor] = []
    frags: list[str] = []
    json_len = data = 0

    def close() -> None:
        shards.append(_Shard(list(cur), _header_bytes(frags, json_len), data))

    def start() -> None:
        nonlocal json_len, data
        cur.clear()
        frags[:] = [_META_FRAGMENT]
        json_len, data = 2 + len(_META_FRAGMENT.encode("utf-8")), 0

    start()
    for t in tensors:
        size = _tensor_bytes(t)
        frag = _entry_fragment(t, data, data + size)
        new_json = json_len + 1 + len(frag.encode("utf-8"))
        if cur and 8 + new_json + (-new_json % 8) + data + size > max_shard_size:
            close()
            start()
            frag = _entry_fragment(t, 0, size)
            new_json = json_len + 1 + len(frag.encode("utf-8"))
        cur.append(t)
        frags.append(frag)
        json_len, data = new_json, data + size
    if cur or not shards:  # an empty checkpoint still gets one (empty) model.safetensors
        close()
    return shards


def _check(checkpoint: Checkpoint) -> None:
    """Refuse what cannot be written before anything is created."""
    seen: set[str] = set()
    for t in checkpoint.tensors:
        if t.qtype not in _QTYPE_TO_DTYPE:
            raise FormatError(
                f"tensor {t.name}: type {t.qtype.name} cannot be stored in safetensors"
                " (F32, F16, BF16 only); dequantize it first"
            )
        if t.name in seen or t.name == "__metadata__":
            raise FormatError(f"tensor {t.name}: name is duplicated or reserved; safetensors names must be unique")
        seen.add(t.name)
    for name in checkpoint.sidecar:
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in name:
            raise FormatError(f"sidecar file {name!r}: not a relative path inside the model directory")
        if rel.parts[0].lower().endswith(_WEIGHT_SUFFIXES):
            raise FormatError(f"sidecar file {name!r}: would collide with or pose as the weights")


def _write_shard(path: Path, shard: _Shard, on_tensor: Optional[Callable[[LazyTensor], None]]) -> None:
    with open(path, "wb") as f:
        f.write(shard.header)
        for t in shard.tensors:
            # at most one tensor in memory, one piece of it when it is made in pieces
            written = 0
            for piece in t.iter_bytes():
                data = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
                f.write(memoryview(data))
                written += data.size
            if written != _tensor_bytes(t):
                raise FormatError(f"tensor {t.name}: produced {written} bytes, expected {_tensor_bytes(t)}")
            if on_tensor is not None:
                on_tensor(t)
        if f.tell() != shard.file_size:  # the header promised these offsets
            raise FormatError(f"{path}: wrote {f.tell()} bytes, planned {shard.file_size}")
        f.flush()
        os.fsync(f.fileno())


def write(
    directory: PathLike,
    checkpoint: Checkpoint,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    on_tensor: Optional[Callable[[LazyTensor], None]] = None,
) -> list[Path]:
    """Write ``checkpoint`` as a Hugging Face model directory; returns the files written.

    Tensors (F32/F16/BF16 only, else :class:`FormatError` naming the tensor and type) are packed
    greedily in checkpoint order into shards of at most ``max_shard_size`` bytes per file (an int or
    a string for :func:`slmpkg.sizes.parse_size`: ``"5GB"`` is 5 * 10**9, as transformers reads it),
    header included; a tensor bigger than that gets a shard of its own.
    One shard is ``model.safetensors``; several are ``model-00001-of-0000N.safetensors`` plus
    ``model.safetensors.index.json`` (``{"metadata": {"total_size": N, "total_parameters": P},
    "weight_map": {...}}``, as transformers writes it; ``total_size`` counts tensor bytes). Each shard has
    ``__metadata__ = {"format": "pt"}`` (transformers wants it) and a header padded with spaces to a
    multiple of 8, as the safetensors library writes; data follows in checkpoint order with no gaps.
    ``checkpoint.sidecar`` files are written by their relative names. ``on_tensor`` is called after
    each tensor is written (progress).

    Nothing partial appears at ``directory``: everything is built in a hidden temporary sibling
    (``.NAME.*.partial``) that is renamed onto ``directory`` only when complete, and removed on any
    error. ``directory`` must not exist or be an empty directory (an empty one is replaced, a
    non-empty one or a file is a :class:`UsageError`; nothing is ever overwritten); missing parent
    directories are created.

    Returned paths are in ``directory``: the shards in order, the index if any, then the sidecar
    files in name order.

    Example:
        >>> write("out/tiny", read("tiny-llama/"), max_shard_size="2GB")  # doctest: +SKIP
        [PosixPath('out/tiny/model.safetensors'), PosixPath('out/tiny/config.json'), ...]
    """
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    _check(checkpoint)
    check_output_directory(Path(os.path.abspath(directory)))  # fail before any work
    sidecar = dict(checkpoint.sidecar)

    shards = _plan(list(checkpoint.tensors), limit)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    relative: list[str] = list(names)
    if n > 1:
        relative.append(INDEX_FILE)
    relative += sorted(sidecar)

    with atomic_directory(directory) as tmp:
        for name, shard in zip(names, shards):
            _write_shard(tmp / name, shard, on_tensor)
        if n > 1:
            index = {
                # total_parameters: what transformers 5 adds beside total_size; older readers ignore it
                "metadata": {
                    "total_size": sum(s.data_size for s in shards),
                    "total_parameters": sum(t.n_elements for t in checkpoint.tensors),
                },
                "weight_map": {t.name: name for name, s in zip(names, shards) for t in s.tensors},
            }
            write_synced(tmp / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
        for name in sorted(sidecar):
            write_synced(tmp / name, sidecar[name])
    return [directory / r for r in relative]
