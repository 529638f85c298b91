"""GGUF: a lazy reader and a streaming writer.

The reader parses the header itself (``gguf.GGUFReader`` builds several numpy arrays per string,
which takes seconds on a 150k vocabulary) and reads nothing else up front. Tensor bytes are read on
demand into their own buffers (not memory-mapped: mapped pages would stay
resident). The writer lays out the header and every tensor's info first (sizes are known from shapes and types
before any data exists), then pulls one tensor at a time and writes it, so peak memory is one tensor,
unlike ``gguf.GGUFWriter`` which holds every tensor until the end. Output goes to a temporary file
that is renamed into place only when complete.

Example:
    >>> from slmpkg.formats import gguf as gguf_format
    >>> ckpt = gguf_format.read("model-f16.gguf")          # doctest: +SKIP
    >>> gguf_format.write("copy.gguf", ckpt)                # doctest: +SKIP
"""

from __future__ import annotations

import collections
import errno
import math
import os
import re
import struct
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

import numpy as np
from gguf import GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from .._io import atomic_writes, read_range
from ..checkpoint import Checkpoint, LazyTensor, MetaValue
from ..errors import FormatError
from ..parallel import Placement
from ..quant import QuantType

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_SCALAR_DTYPES = {t: np.dtype(f) for t, f in _SCALAR_FORMATS.items()}

Progress = Callable[[int], None]


# ---- reading ------------------------------------------------------------------------------------

# bytes of each scalar value type; a GGUF string is a u64 byte count and that many UTF-8 bytes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_READ_AHEAD = 1 << 20
# the most dimensions a tensor may have (ggml's GGML_MAX_DIMS)
MAX_DIMS = 4


class StringArray(Sequence[str]):
    """The strings of a GGUF string array (a vocabulary, its merges), decoded on first use.

    It keeps the array's GGUF encoding (each string a u64 byte count and its bytes), so a vocabulary
    that is only carried from one file to another is never decoded nor encoded again. Immutable;
    equal to any sequence of the same strings.
    """

    __slots__ = ("encoded", "_count", "_strings")

    def __init__(self, encoded: bytes, count: int):
        self.encoded = encoded
        self._count = count
        self._strings: Optional[list[str]] = None

    def _decoded(self) -> list[str]:
        if self._strings is None:
            buf, pos, unpack = self.encoded, 0, _U64.unpack_from
            out: list[str] = []
            append = out.append
            for _ in range(self._count):
                end = pos + 8 + unpack(buf, pos)[0]
                append(buf[pos + 8 : end].decode("utf-8", errors="surrogateescape"))
                pos = end
            self._strings = out
        return self._strings

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # type: ignore[override]
        return self._decoded()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return self.encoded == other.encoded and self._count == other._count
        if isinstance(other, (list, tuple)):
            return len(other) == self._count and self._decoded() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringArray({self._count} strings)"


class _Header:
    """The parser of everything before the tensor data: key/values and tensor infos.

    The header is read into memory from the start of the file, growing as parsing needs (a 150k
    vocabulary makes a header of a few MB; tensor data is never read here). String arrays, which hold
    the vocabulary and merges, are decoded in one tight loop into a list of ``str``; number arrays
    become one numpy array each. Every read is bounds-checked, so a damaged or truncated header is a
    :class:`FormatError` naming the file and the byte where it went wrong.
    """

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size
        self.buf = b""

    def fail(self, message: str) -> FormatError:
        return FormatError(f"{self.path}: {message}")

    def need(self, pos: int, n: int, what: str) -> bytes:
        """Make ``buf`` hold bytes ``[pos, pos + n)``; the buffer, to be indexed at ``pos``."""
        end = pos + n
        if end > len(self.buf):
            if end > self.size:
                raise self.fail(f"truncated: {what} at byte {pos} runs past the end of the file ({self.size} bytes)")
            grow = min(self.size, max(end, 2 * len(self.buf), _READ_AHEAD)) - len(self.buf)
            self.f.seek(len(self.buf))
            more = self.f.read(grow)
            if len(more) != grow:
                raise self.fail(f"truncated: the file ended while reading its header (at byte {len(self.buf) + len(more)})")
            self.buf += more
        return self.buf

    def u32(self, pos: int, what: str) -> int:
        return _U32.unpack_from(self.need(pos, 4, what), pos)[0]

    def u64(self, pos: int, what: str) -> int:
        return _U64.unpack_from(self.need(pos, 8, what), pos)[0]

    def name(self, pos: int, what: str) -> tuple[str, int]:
        """A key or tensor name (strict UTF-8) at ``pos``; the position after it."""
        n = self.u64(pos, what)
        raw = self.need(pos + 8, n, what)[pos + 8 : pos + 8 + n]
        try:
            return raw.decode("utf-8"), pos + 8 + n
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {pos} is not UTF-8") from None

    def value(self, kind: int, pos: int, key: str) -> tuple[MetaValue, int]:
        """The value of type ``kind`` at ``pos`` (key ``key``); the position after it."""
        try:
            vtype = GGUFValueType(kind)
        except ValueError:
            raise self.fail(f"key {key} has unknown value type {kind}") from None
        if vtype is GGUFValueType.STRING:
            n = self.u64(pos, f"value of {key}")
            raw = self.need(pos + 8, n, f"value of {key}")[pos + 8 : pos + 8 + n]
            return MetaValue(vtype, raw.decode("utf-8", errors="surrogateescape")), pos + 8 + n
        if vtype is GGUFValueType.ARRAY:
            item_kind = self.u32(pos, f"item type of {key}")
            count = self.u64(pos + 4, f"length of {key}")
            pos += 12
            try:
                item = GGUFValueType(item_kind)
            except ValueError:
                raise self.fail(f"array {key} has unknown item type {item_kind}") from None
            if item is GGUFValueType.ARRAY:
                raise self.fail(f"nested arrays are not supported (key {key})")
            if item is GGUFValueType.STRING:
                values, pos = self.strings(pos, count, key)
                return MetaValue(vtype, values, item), pos
            dtype = _SCALAR_DTYPES[item]
            if count > (self.size - pos) // dtype.itemsize:
                raise self.fail(f"truncated: array {key} of {count} {item.name} at byte {pos} runs past the end of "
                                f"the file ({self.size} bytes)")
            nbytes = count * dtype.itemsize
            array = np.frombuffer(self.need(pos, nbytes, f"array {key}"), dtype, count, pos).copy()
            return MetaValue(vtype, array, item), pos + nbytes
        fmt = _SCALAR_FORMATS[vtype]
        size = struct.calcsize(fmt)
        return MetaValue(vtype, struct.unpack_from(fmt, self.need(pos, size, f"value of {key}"), pos)[0]), pos + size

    def strings(self, pos: int, count: int, key: str) -> tuple["StringArray", int]:
        """``count`` strings from ``pos``, kept encoded (a vocabulary: only their lengths are walked
        here, and the buffer is grown only when a string reaches past it)."""
        if count > (self.size - pos) // 8:
            raise self.fail(f"truncated: array {key} of {count} strings at byte {pos} runs past the end of the file ({self.size} bytes)")
        start = pos
        unpack = _U64.unpack_from
        buf = self.buf
        limit = len(buf)
        for _ in range(count):
            if pos + 8 > limit:
                buf = self.need(pos, 8, f"array {key}")
                limit = len(buf)
            pos += 8 + unpack(buf, pos)[0]
            if pos > limit:
                buf = self.need(limit, pos - limit, f"array {key}")
                limit = len(buf)
        return StringArray(buf[start:pos], count), pos

    def parse(self) -> tuple[dict[str, MetaValue], list[tuple[str, tuple[int, ...], int, int]], int]:
        """``(metadata, tensor infos (name, ne, type id, offset), start of the tensor data)``."""
        version = self.u32(4, "version")
        if version & 0xFFFF == 0 and version:
            raise self.fail("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise self.fail(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = self.u64(8, "tensor count")
        n_kv = self.u64(16, "key/value count")
        pos = 24
        # the smallest key/value is 13 bytes and the smallest tensor info 24: counts beyond that are damage
        if n_kv > (self.size - pos) // 13 or n_tensors > (self.size - pos) // 24:
            raise self.fail(f"truncated or damaged header: {n_kv} keys and {n_tensors} tensors cannot fit in {self.size} bytes")
        metadata: dict[str, MetaValue] = {}
        for _ in range(n_kv):
            at = pos
            key, pos = self.name(pos, "key")
            if key in metadata:
                raise self.fail(f"duplicate key {key} (at byte {at})")
            kind = self.u32(pos, f"type of {key}")
            metadata[key], pos = self.value(kind, pos + 4, key)
        infos = []
        seen: set[str] = set()
        for _ in range(n_tensors):
            name, pos = self.name(pos, "tensor name")
            if name in seen:
                raise self.fail(f"duplicate tensor {name}")
            seen.add(name)
            n_dims = self.u32(pos, f"dimensions of tensor {name}")
            if n_dims > MAX_DIMS:
                raise self.fail(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
            ne = struct.unpack_from(f"<{n_dims}Q", self.need(pos + 4, 8 * n_dims, f"shape of tensor {name}"), pos + 4)
            pos += 4 + 8 * n_dims
            type_id = self.u32(pos, f"type of tensor {name}")
            offset = self.u64(pos + 4, f"offset of tensor {name}")
            infos.append((name, ne, type_id, offset))
            pos += 12
        alignment = DEFAULT_ALIGNMENT
        item = metadata.get("general.alignment")
        if item is not None:
            if item.type is not GGUFValueType.UINT32:
                raise self.fail(f"general.alignment must be UINT32, not {item.type.name}")
            alignment = item.value
            if alignment == 0 or alignment & (alignment - 1):
                raise self.fail(f"general.alignment {alignment} is not a power of two")
        return metadata, infos, pos + _pad(pos, alignment)


def read(path: Union[str, os.PathLike]) -> Checkpoint:
    """Open a GGUF file lazily: metadata is read now, each tensor's bytes when it is asked for.

    A split model (``NAME-00001-of-0000N.gguf``) is read whole from its first file: the tensors of
    every shard, the metadata of the first, without the ``split.*`` keys.
    Raises :class:`FormatError` naming the file for anything that is not a complete GGUF v2/v3 file.
    """
    path = Path(path)
    first = _read_one(path)
    count = int(first.get("split.count", 0) or 0)
    if count <= 1:
        return first
    if int(first.get("split.no", 0)) != 0:
        raise FormatError(f"{path}: shard {int(first.get('split.no')) + 1} of {count}; pass the first shard")
    tensors = list(first.tensors)
    for i in range(1, count):
        shard_path = split_path(_split_prefix(path) + ".gguf", i, count)
        if not shard_path.exists():
            raise FormatError(f"{shard_path}: missing shard {i + 1} of {count} (split model {path})")
        tensors += _read_one(shard_path).tensors
    expected = int(first.get("split.tensors.count", len(tensors)))
    if len(tensors) != expected:
        raise FormatError(f"{path}: the shards hold {len(tensors)} tensors, split.tensors.count says {expected}")
    metadata = {k: v for k, v in first.metadata.items() if k not in SPLIT_KEYS}
    return Checkpoint(metadata, tensors)


def _split_prefix(path: Path) -> str:
    match = _SPLIT_NAME.match(str(path))
    if match is None:
        raise FormatError(f"{path}: split model whose name is not NAME-00001-of-0000N.gguf")
    return match.group("prefix")


def _read_one(path: Path) -> Checkpoint:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise FormatError(f"{path}: not a GGUF file (magic {magic!r})")
        file_size = os.fstat(f.fileno()).st_size
        metadata, infos, data_start = _Header(f, path, file_size).parse()

    tensors: list[LazyTensor] = []
    for name, ne, type_id, offset in infos:
        try:
            qtype = QuantType(type_id)
        except ValueError:
            raise FormatError(f"{path}: tensor {name} has unknown type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if ne and ne[0] % block:
            raise FormatError(f"{path}: tensor {name} has rows of {ne[0]}, not a multiple of {qtype.name}'s block of {block}")
        n_bytes = math.prod(ne) // block * type_size
        base = data_start + offset
        end = base + n_bytes
        if end > file_size:
            raise FormatError(
                f"{path}: truncated: tensor {name} ends at byte {end} but the file has {file_size}"
            )
        tensors.append(LazyTensor(
            name, tuple(reversed(ne)), qtype,
            raw=lambda base=base, n=n_bytes: read_range(path, base, n),
            read=lambda offset, n, base=base: read_range(path, base + offset, n),
            region=(str(path), base),
        ))
    return Checkpoint(metadata, tensors)


# ---- writing ------------------------------------------------------------------------------------


def _string(s: str) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _encode_value(item: MetaValue) -> bytes:
    kind = item.type
    if kind is GGUFValueType.STRING:
        return _string(item.value)
    if kind is GGUFValueType.ARRAY:
        sub = item.item_type
        assert sub is not None
        values = item.value
        head = struct.pack("<IQ", int(sub), len(values))
        if sub is GGUFValueType.STRING:
            if isinstance(values, StringArray):
                return head + values.encoded
            return head + b"".join([_string(v) for v in values])
        return head + np.asarray(values, dtype=_SCALAR_DTYPES[sub]).tobytes()
    return struct.pack(_SCALAR_FORMATS[kind], item.value)


def _pad(n: int, alignment: int) -> int:
    return (alignment - n % alignment) % alignment


def encode_header(metadata: dict[str, MetaValue], tensors: list[LazyTensor], alignment: int) -> bytes:
    """Everything before the tensor data: header, key/values, tensor infos, padding."""
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, item in metadata.items():
        parts += [_string(key), struct.pack("<I", int(item.type)), _encode_value(item)]
    offset = 0
    for t in tensors:
        ne = list(reversed(t.shape))
        parts += [_string(t.name), struct.pack(f"<I{len(ne)}Q", len(ne), *ne), struct.pack("<IQ", int(t.qtype), offset)]
        offset += t.nbytes + _pad(t.nbytes, alignment)
    head = b"".join(parts)
    return head + bytes(_pad(len(head), alignment))


def alignment_of(metadata: dict[str, MetaValue]) -> int:
    item = metadata.get("general.alignment")
    return int(item.value) if item is not None else DEFAULT_ALIGNMENT


SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_path(path: Union[str, os.PathLike], index: int, count: int) -> Path:
    """llama.cpp's name of shard ``index`` (0-based) of ``count``: ``NAME-00001-of-00003.gguf``."""
    path = Path(path)
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return path.with_name(f"{stem}-{index + 1:05d}-of-{count:05d}.gguf")


def plan_splits(tensors: list[LazyTensor], max_size: Optional[int], alignment: int = DEFAULT_ALIGNMENT) -> list[list[LazyTensor]]:
    """Group tensors into shards as llama.cpp's gguf-split does: start a new shard when the next
    tensor's padded size would push this shard's data past ``max_size`` (never leaving one empty)."""
    if not max_size:
        return [tensors]
    shards: list[list[LazyTensor]] = [[]]
    used = 0
    for t in tensors:
        size = t.nbytes + _pad(t.nbytes, alignment)
        if shards[-1] and used + size > max_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += size
    return shards


def write(
    path: Union[str, os.PathLike],
    checkpoint: Checkpoint,
    on_tensor: Optional[Callable[[LazyTensor], None]] = None,
    split_max_size: Optional[int] = None,
) -> list[Path]:
    """Stream ``checkpoint`` into GGUF at ``path``; returns the files written.

    With ``split_max_size`` (bytes of tensor data per file) and more data than that, the output is
    llama.cpp's split layout: ``NAME-00001-of-0000N.gguf``, all metadata in the first file, the
    ``split.*`` keys in each. ``on_tensor`` is called after each tensor is written (progress).
    Nothing appears at the target names unless every file was written completely.
    """
    alignment = alignment_of(checkpoint.metadata)
    metadata = {k: v for k, v in checkpoint.metadata.items() if k not in SPLIT_KEYS}
    shards = plan_splits(list(checkpoint.tensors), split_max_size, alignment)
    if len(shards) == 1:
        targets = [Path(path)]
        headers = [metadata]
    else:
        n, total = len(shards), sum(len(s) for s in shards)
        targets = [split_path(path, i, n) for i in range(n)]
        split_meta = lambda i: {  # noqa: E731
            "split.no": MetaValue(GGUFValueType.UINT16, i),
            "split.count": MetaValue(GGUFValueType.UINT16, n),
            "split.tensors.count": MetaValue(GGUFValueType.INT32, total),
        }
        headers = [{**(metadata if i == 0 else {}), **split_meta(i)} for i in range(n)]
    report = on_tensor if on_tensor is not None else (lambda t: None)
    pending: collections.deque[tuple[LazyTensor, Placement]] = collections.deque()

    def report_finished() -> None:
        while pending and pending[0][1].done():
            pending[0][1].wait()
            report(pending.popleft()[0])

    with atomic_writes(targets) as files:
        try:
            # Headers and the worker processes' jobs first: the conversions are the long pole, so
            # they start before this thread spends any time copying the tensors that stay as they are.
            layouts: list[list[int]] = []
            for f, header, shard in zip(files, headers, shards):
                head = encode_header(header, shard, alignment)
                f.write(head)
                offsets, at = [], len(head)
                for t in shard:
                    offsets.append(at)
                    if t.placer is not None:
                        pending.append((t, t.placer(f.name, at)))
                    at += t.nbytes + _pad(t.nbytes, alignment)
                offsets.append(at)
                layouts.append(offsets)
            for f, shard, offsets in zip(files, shards, layouts):
                for t, at in zip(shard, offsets):
                    if t.placer is None:
                        f.seek(at)
                        _write_tensor(f, t, alignment)
                        report(t)
                    report_finished()
                f.truncate(offsets[-1])  # placed tensors at the end leave the file short until written
            with _Flusher(files) as flusher:
                while pending:
                    t, placement = pending.popleft()
                    placement.wait()
                    report(t)
                    flusher.wrote(t.nbytes)
        except BaseException:
            for _, placement in pending:
                placement.cancel()
            for _, placement in pending:  # a job still running would write into the next file of that name
                placement.settle()
            raise
    return targets


class _Flusher:
    """Writes the files' dirty pages back to disk from a background thread while the workers still
    convert, so the final fsync (see ``atomic_writes``) has little left to wait for: started once on
    entry (the copied tensors) and again after every :data:`FLUSH_BYTES` of placed tensors."""

    FLUSH_BYTES = 64 << 20

    def __init__(self, files: Sequence[BinaryIO]):
        for f in files:
            f.flush()
        self._fds = [f.fileno() for f in files]
        self._kick = threading.Event()
        self._stop = False
        self._since = 0
        self._thread = threading.Thread(target=self._run, name="slmpkg-flush", daemon=True)

    def __enter__(self) -> "_Flusher":
        self._kick.set()
        self._thread.start()
        return self

    def wrote(self, nbytes: int) -> None:
        self._since += nbytes
        if self._since >= self.FLUSH_BYTES:
            self._since = 0
            self._kick.set()

    def _run(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._stop:
                return
            for fd in self._fds:
                try:
                    os.fdatasync(fd)
                except OSError:  # the final fsync reports what matters
                    return

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._kick.set()
        self._thread.join()


def _write_tensor(f: BinaryIO, t: LazyTensor, alignment: int) -> None:
    if t.region is not None and t.pieces is None and _copy_region(f, t):
        written = t.nbytes
    else:
        written = 0
        for piece in t.iter_bytes():
            data = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
            f.write(memoryview(data))
            written += data.size
        if written != t.nbytes:
            raise FormatError(f"tensor {t.name}: produced {written} bytes, expected {t.nbytes}")
    f.write(bytes(_pad(written, alignment)))


# errors of copy_file_range that mean "not between these files here", before anything was copied
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def _copy_region(f: BinaryIO, t: LazyTensor) -> bool:
    """Copy a file-backed tensor unchanged from its file to ``f`` inside the kernel: no buffer of
    ours, so no fresh memory is touched (on a virtual machine a first touch of a page can cost more
    than the copy). False where the platform cannot; the caller then copies through memory."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None or t.region is None:
        return False
    path, offset = t.region
    f.flush()
    out, at, done = f.fileno(), f.tell(), 0
    try:
        with open(path, "rb", buffering=0) as src:
            while done < t.nbytes:
                n = copy(src.fileno(), out, t.nbytes - done, offset + done, at + done)
                if n == 0:
                    raise FormatError(f"{path}: truncated: {t.nbytes} bytes expected at offset {offset}, file ends first")
                done += n
    except OSError as e:
        if done == 0 and e.errno in _NO_KERNEL_COPY:
            return False
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    f.seek(done, os.SEEK_CUR)
    return True
