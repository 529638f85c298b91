"""ONNX → the canonical checkpoint: read a decoder graph's weights back into GGUF names and metadata.

Three layouts of the same decoder are understood, told apart by what the graph holds, not by who wrote it:

* **slmpkg's and onnxruntime-genai's builder graphs**: linears are ``MatMul`` nodes whose weight is an
  initializer named after the node (``model.layers.0.attn.q_proj.MatMul.weight``, [in, out]); the builder
  may fuse q/k/v into one ``qkv_proj`` (split here by the head counts) and, for tied embeddings, feed the
  embedding ``Gather`` through a ``Transpose`` of ``lm_head``'s weight. Norms are
  ``(Skip)SimplifiedLayerNormalization`` weights, stored as applied (Gemma's ``1 + w`` already added, which
  is also llama.cpp's convention). Rotary runs in ``GroupQueryAttention``: ``rotary_interleaved=1`` means
  the q/k rows are already in llama.cpp's pair-adjacent order.
* **optimum (torch.onnx) exports**: linear weights are anonymous initializers (``onnx::MatMul_123``,
  W transposed), identified through the consuming node's scope (``/model/layers.0/self_attn/q_proj/MatMul``);
  norms keep their Hugging Face names and values (Gemma's ``w`` without the 1); rotary is plain HF math.
  Nodes inside subgraphs count too (the merged decoder runs everything in ``If`` branches), and the
  Hugging Face layout with the .onnx files in ``onnx/`` and config.json/tokenizer one level up is read.
* ``MatMulNBits`` linears (any of the above, quantized) become ggml blocks through
  :mod:`slmpkg.formats.onnx_nbits`: symmetric → Q4_0, zero points → Q4_1, 8 bits → Q8_0 (exact up to the
  fp16 rounding of scales and minimums; larger blocks repeat their scale). What 32-value ggml blocks
  cannot hold (16-value blocks, slmpkg's separate min term) becomes F32 with exactly the values
  onnxruntime computes with, never rounded a second time.

Families: every one slmpkg's writer exports (Llama/Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Gemma 1/2/3,
Granite; others give a FormatError naming the family). An ``lm_head`` equal to the embedding (the
builder's shared initializer, or slmpkg's copy) is tied: one matrix in GGUF, ``tie_word_embeddings``
in config.json. Mixtral's ``com.microsoft.MoE`` fused SwiGLU experts (gate and up rows interleaved)
come apart into ``ffn_gate_exps``/``ffn_up_exps``; Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` stay
fused, as llama.cpp's phi3 graph reads them (separate projections, as the builder writes gate and up,
are fused). The builder's Mistral, Phi-3, Gemma 2 (HF's sandwich-norm names) and Granite graphs
(multipliers on the skip input, logits × 1/scale) are read too.

Metadata comes from ``config.json`` when it is beside the model (optimum writes it) or stored in the
model's ``metadata_props`` under ``slmpkg.config.json`` (:data:`CONFIG_PROPERTY`), else from
``genai_config.json`` and the graph itself: head counts, rotary layout, per-layer sliding windows, the
attention scale (Gemma's query_pre_attn_scalar, Granite's multiplier) and soft-cap from
``GroupQueryAttention``; epsilon from the norm nodes; the rope base and a linear factor from
``cos_cache``/``sin_cache`` (Gemma 3's sliding layers' base from their own pair; Phi-3 LongRoPE's
short/long factors and attention factor from the two pairs its ``If`` chooses between, with Phi-3's
base 10000, which those caches cannot separate from the factors); Granite's embedding/residual/logit
multipliers and Gemma 2's final soft-cap from the constants of their ``Mul``/``Div``/``Tanh`` nodes;
the expert count and top-k from ``MoE``. The tokenizer files beside the model give the ``tokenizer.*`` keys. Tensors stay lazy: each one reads its byte range
of the external data file when a writer asks for it (a transposed weight is transposed then, one tensor
in memory at a time). External data is checked before anything is returned: a location outside the
model directory (``../x``, an absolute path, a symlink out), a missing file or one shorter than the
tensors it should hold is a :class:`~slmpkg.errors.FormatError` naming the file and the tensor.

Example:
    >>> from slmpkg.formats import onnx_import
    >>> ckpt = onnx_import.read("out/tiny-onnx")                # doctest: +SKIP
    >>> ckpt.architecture, ckpt.tensors[0].name                # doctest: +SKIP
    ('llama', 'token_embd.weight')
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .._io import read_range
from ..checkpoint import Checkpoint, LazyTensor
from ..errors import FormatError, SlmpkgError
from ..quant import QuantType

PathLike = Union[str, "os.PathLike[str]"]

# onnxruntime-genai's "type" (the HF class name before "For", lower-cased) → the HF class
_GENAI_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
# the HF model_type of each class this reads
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
                "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3", "GraniteForCausalLM": "granite",
                "MixtralForCausalLM": "mixtral"}
_GEMMAS = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
SUPPORTED_CLASSES = tuple(_MODEL_TYPES)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja", "generation_config.json")

# the projection named in a node scope or initializer name → the GGUF tensor (None: fused, split below)
_PROJECTIONS = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "qkv_proj": None, "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
    "gate_up_proj": None, "lm_head": "output",
    "gate": "ffn_gate_inp",  # an MoE router (slmpkg's moe.gate, optimum's block_sparse_moe.gate)
}
# norm weights by a component of their name (HF's, slmpkg's and the builder's all contain these)
_NORMS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "final_norm_layernorm": "output_norm",
    # Gemma 2/3's norms after each branch (slmpkg's names; HF's, which the builder keeps, below)
    "post_attention_norm": "post_attention_norm", "post_feedforward_norm": "post_ffw_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}
# ops whose weight input is the scale as applied (no Gemma offset left to add)
_APPLIED_NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                     "LayerNormalization", "SkipLayerNormalization", "RMSNormalization"}
_ROTARY_OPS = {"GroupQueryAttention", "RotaryEmbedding", "PagedAttention"}
_LAYER = re.compile(r"(?:^|[./])layers[./](\d+)(?:[./]|$)")


# ---- stored tensors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """Where an initializer's bytes are: a range of an external file, or the proto itself (inline)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # the element type as stored (bf16 as uint16)
    qtype: Optional[QuantType]  # None for non-float types (MatMulNBits' uint8 blocks, int64 shapes)
    proto: Any
    file: Optional[Path] = None
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of the stored bytes from ``offset`` (uint8)."""
        if self.file is not None:
            return read_range(self.file, self.offset + offset, nbytes)
        return self.bytes()[offset : offset + nbytes]

    def columns(self, start: int, nbytes: int) -> np.ndarray:
        """Bytes ``start:start+nbytes`` of every row of a 2-D tensor, [rows, nbytes] uint8, with one open
        file and one read per row (a transposed slab without reading the rest)."""
        rows, cols = self.shape
        stride = cols * self.dtype.itemsize
        out = np.empty((rows, nbytes), np.uint8)
        if self.file is None:
            out[:] = self.bytes().reshape(rows, stride)[:, start : start + nbytes]
            return out
        with open(self.file, "rb", buffering=0) as f:
            for r in range(rows):
                f.seek(self.offset + r * stride + start)
                if f.readinto(memoryview(out[r])) != nbytes:
                    raise FormatError(f"{self.file}: truncated: tensor {self.name} ends past the end of the file")
        return out

    def bytes(self) -> np.ndarray:
        if self.file is not None:
            return read_range(self.file, self.offset, self.nbytes)
        from onnx import numpy_helper

        array = numpy_helper.to_array(self.proto)
        if self.qtype is QuantType.BF16:  # onnx hands bf16 back in its own ml_dtypes type; keep the bits
            array = array.view(np.uint16)
        return np.ascontiguousarray(array).reshape(-1).view(np.uint8)

    def array(self) -> np.ndarray:
        """The elements in ``shape``; floats as same-size unsigned ints, so moving them is exact."""
        return self.bytes().view(self.dtype).reshape(self.shape)


_FLOATS = {1: (np.float32, QuantType.F32), 10: (np.float16, QuantType.F16), 16: (np.uint16, QuantType.BF16)}
_OTHERS = {2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 11: np.float64}


def _inside(directory: Path, location: str) -> tuple[Optional[Path], str]:
    """``location`` resolved inside ``directory`` (symlinks followed), or None and why it is refused."""
    if not location:
        return None, "external data without a location"
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        # the ONNX spec: locations are relative to the model file's directory
        return None, f"external data location {location!r} is an absolute path, not one inside the model directory"
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, location))
    if os.path.commonpath([root, target]) != root:
        return None, f"external data location {location!r} leaves the model directory"
    return Path(target), ""


def _stored(tensor: Any, directory: Path, model_file: Path, sizes: dict[Path, int]) -> _Stored:
    """Describe one initializer, checking its external data: inside the directory, present, long enough."""
    from onnx import TensorProto

    where = f"{model_file}: tensor {tensor.name}"
    if tensor.data_type in _FLOATS:
        dtype, qtype = _FLOATS[tensor.data_type]
    elif tensor.data_type in _OTHERS:
        dtype, qtype = _OTHERS[tensor.data_type], None
    else:
        dtype, qtype = np.uint8, None  # a type we never read as a weight; its size is not checked
    shape = tuple(int(d) for d in tensor.dims)
    stored = _Stored(tensor.name, shape, np.dtype(dtype), qtype, tensor)
    if tensor.data_location != TensorProto.EXTERNAL:
        return stored
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    path, refused = _inside(directory, location)
    if path is None:
        raise FormatError(f"{where}: {refused}")
    if not path.is_file():
        raise FormatError(f"{where}: external data file {location!r} is missing")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else stored.nbytes
    except ValueError:
        raise FormatError(f"{where}: external data offset/length are not numbers") from None
    if offset < 0 or length < 0:
        raise FormatError(f"{where}: negative external data offset or length")
    if length != stored.nbytes and tensor.data_type in _FLOATS:
        raise FormatError(f"{where}: declares {length} bytes of external data but its shape {list(shape)} needs {stored.nbytes}")
    size = sizes.setdefault(path, path.stat().st_size)
    if offset + length > size:
        raise FormatError(
            f"{where}: external data {location!r} is {size} bytes, shorter than offset {offset} + length {length}"
        )
    return _Stored(tensor.name, shape, np.dtype(dtype), qtype, tensor, path, offset)


# ---- lazy canonical tensors ----------------------------------------------------------------------


def _plain(name: str, src: _Stored) -> LazyTensor:
    """An initializer whose stored layout is the canonical one: ranged reads straight from the file."""
    return LazyTensor(name, src.shape, src.qtype, src.bytes, read=src.read)  # type: ignore[arg-type]


def _cached_reads(raw: Callable[[], np.ndarray]) -> Callable[[int, int], np.ndarray]:
    """Ranged reads of a tensor that must be computed whole (converted from MatMulNBits blocks).

    Writers and conversions read a tensor front to back, possibly in slabs or as a fused projection's
    parts; the computed bytes are kept between those reads and dropped when the last byte has been
    read, so the source is read once and at most this one tensor is held.
    """
    cache: dict[str, np.ndarray] = {}

    def read(offset: int, nbytes: int) -> np.ndarray:
        data = cache.get("data")
        if data is None:
            data = cache["data"] = raw()
        piece = data[offset : offset + nbytes].copy()
        if offset + nbytes >= data.size:
            cache.clear()
        return piece

    read.release = cache.clear  # type: ignore[attr-defined]  # for a reader that stops early (a probe)
    return read


# stored rows read at a time while transposing a whole tensor
_CHUNK_BYTES = 8 << 20


def _transposed(name: str, src: _Stored) -> LazyTensor:
    """``src`` [rows, cols] as [cols, rows] (a MatMul weight [in, out] as [out, in]); elements are moved
    as same-size integers, so any float type stays bit-exact.

    The whole tensor is built from stored row chunks (the result and one chunk in memory, not two
    copies). A ranged read (a converter's slab, a fused projection's part, a probe) is a range of
    output rows, i.e. of stored columns: it reads just those bytes of each stored row, so memory stays
    at the slab and the file is read once over all slabs.
    """
    rows, cols = src.shape
    item = src.dtype.itemsize

    def raw() -> np.ndarray:
        out = np.empty((cols, rows), src.dtype)
        step = max(1, _CHUNK_BYTES // max(cols * item, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[:, r0:r1] = src.read(r0 * cols * item, (r1 - r0) * cols * item).view(src.dtype).reshape(r1 - r0, cols).T
        return out.reshape(-1).view(np.uint8)

    row_bytes = rows * item  # one output row

    def read(offset: int, nbytes: int) -> np.ndarray:
        if nbytes <= 0:
            return np.empty(0, np.uint8)
        first, last = offset // row_bytes, (offset + nbytes - 1) // row_bytes + 1
        stored = src.columns(first * item, (last - first) * item).view(src.dtype)  # [rows, last - first]
        gathered = np.ascontiguousarray(stored.T).reshape(-1).view(np.uint8)
        start = offset - first * row_bytes
        return gathered[start : start + nbytes]

    return LazyTensor(name, (cols, rows), src.qtype, raw, read=read)  # type: ignore[arg-type]


def _row_bytes(t: LazyTensor) -> int:
    return t.nbytes // t.shape[0]  # a 2-D tensor's rows are whole blocks in any type; a 1-D one's are elements


def _with_rows(t: LazyTensor, fn: Callable[[np.ndarray], np.ndarray]) -> LazyTensor:
    """``t`` with its rows reordered by ``fn``, moved as bytes (exact for any type)."""

    def raw() -> np.ndarray:
        rows = np.asarray(t.raw()).reshape(-1).view(np.uint8).reshape(t.shape[0], _row_bytes(t))
        return np.ascontiguousarray(fn(rows)).reshape(-1)

    return LazyTensor(t.name, t.shape, t.qtype, raw)


def _rows(t: LazyTensor, start: int, stop: int) -> LazyTensor:
    """Rows ``start:stop`` of ``t`` (one part of a fused projection), read as that byte range."""
    row = _row_bytes(t)

    def raw() -> np.ndarray:
        return np.asarray(t.byte_range(start * row, (stop - start) * row)).reshape(-1).view(np.uint8).copy()

    return LazyTensor(t.name, (stop - start, *t.shape[1:]), t.qtype, raw)


# ---- the graph -------------------------------------------------------------------------------------


@dataclass
class _Linear:
    """One projection found in the graph: where its weight and bias are and how they are laid out."""

    node: Any  # the MatMul / MatMulNBits / Gemm node
    target: Optional[str]  # GGUF tensor stem, None for a fused qkv/gate_up to split
    fused: str  # "", "qkv" or "gate_up"
    layer: Optional[int]
    weight: LazyTensor  # canonical orientation [out, in], not yet split or permuted
    bias: Optional[LazyTensor]


class _Graph:
    def __init__(self, model: Any, model_file: Path, directory: Path):
        self.model, self.file, self.directory = model, model_file, directory
        graph = model.graph
        sizes: dict[Path, int] = {}
        self.inits = {t.name: _stored(t, directory, model_file, sizes) for t in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        # subgraphs too: optimum's merged decoders run the whole model inside If branches that read the
        # main graph's initializers (each branch once more, so the same weight may be met twice)
        self.nodes: list[Any] = list(_walk(graph))
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)

    def where(self, node: Any) -> str:
        return f"{self.file}: node {node.name or node.op_type}"

    def source(self, value: str) -> tuple[Optional[_Stored], bool]:
        """The initializer behind a node input and whether a 2-D ``Transpose`` sits between them."""
        if value in self.inits:
            return self.inits[value], False
        node = self.producer.get(value)
        if node is not None and node.op_type == "Transpose" and node.input[0] in self.inits:
            perm = _attr(node, "perm")
            if perm in (None, [1, 0]) and len(self.inits[node.input[0]].shape) == 2:
                return self.inits[node.input[0]], True
        if node is not None and node.op_type in ("Cast", "Identity") and node.input[0] in self.inits:
            return self.inits[node.input[0]], False
        return None, False


def _walk(graph: Any) -> Iterable[Any]:
    """The nodes of ``graph`` and of every subgraph (If/Loop/Scan bodies), in order."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _walk(sub)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _parts(text: str) -> list[str]:
    return [p for p in re.split(r"[./]", text) if p]


def _layer_of(text: str) -> Optional[int]:
    m = _LAYER.search(text)
    return int(m.group(1)) if m else None


def _projection(texts: Iterable[str]) -> Optional[tuple[str, Optional[int]]]:
    """(projection key, layer) from the first of ``texts`` (initializer name, node name) that names one."""
    for text in texts:
        parts = _parts(text)
        for key in reversed(parts):
            if key in _PROJECTIONS:
                return key, _layer_of(text)
    return None


def _float_weight(g: _Graph, node: Any, init: _Stored, via_transpose: bool) -> LazyTensor:
    """A MatMul/Gemm weight as a canonical [out, in] tensor."""
    if init.qtype is None or len(init.shape) != 2:
        raise FormatError(f"{g.where(node)}: weight {init.name} is not a 2-D float tensor (type {init.dtype}, shape {list(init.shape)})")
    transposed = node.op_type == "MatMul"  # MatMul's B is [in, out]
    if node.op_type == "Gemm":
        transposed = not bool(_attr(node, "transB", 0))
    if via_transpose:
        transposed = not transposed
    if not transposed:
        return _plain(init.name, init)
    rows, cols = init.shape
    return _transposed(init.name, init)


def _nbits_weight(g: _Graph, node: Any, min_term: Optional[_Stored] = None) -> LazyTensor:
    """A MatMulNBits weight as ggml blocks through onnx_nbits (Q4_0, Q4_1, Q8_0: exact up to the fp16
    rounding of scales and minimums), converted when a writer reads it.

    Weights ggml's 32-value blocks cannot hold, decided from the node's structure alone (16-value
    blocks with their own scales, as slmpkg writes Q6_K/Q3_K/Q2_K; a separate min term; 8 bits with
    float zero points; K not a multiple of 32), become F32 holding exactly the values onnxruntime
    computes with, rather than being rounded a second time.
    """
    try:
        from . import onnx_nbits
    except ImportError:
        raise FormatError(f"{g.where(node)}: MatMulNBits weights cannot be imported yet (slmpkg.formats.onnx_nbits is missing)") from None
    n, k = int(_attr(node, "N")), int(_attr(node, "K"))
    bits, block = int(_attr(node, "bits", 4)), int(_attr(node, "block_size"))
    names = list(node.input) + [""] * 6
    if len(node.input) > 4 and node.input[4]:
        raise FormatError(f"{g.where(node)}: MatMulNBits with g_idx (act-order) cannot be mapped to GGUF blocks")
    parts: dict[str, Optional[_Stored]] = {}
    for key, name in (("packed", names[1]), ("scales", names[2]), ("zero_points", names[3])):
        stored = g.inits.get(name) if name else None
        if name and stored is None:
            raise FormatError(f"{g.where(node)}: MatMulNBits input {name} is not an initializer")
        parts[key] = stored
    if parts["packed"] is None or parts["scales"] is None:
        raise FormatError(f"{g.where(node)}: MatMulNBits without its weight or scales")
    zp = parts["zero_points"]
    where = f"{g.where(node)}: weight {parts['packed'].name}"  # type: ignore[union-attr]

    def build() -> Any:
        k_blocks = -(-k // block)
        packed = parts["packed"].bytes().reshape(n, k_blocks, -1)  # type: ignore[union-attr]
        scales = parts["scales"].array().reshape(n, k_blocks)  # type: ignore[union-attr]
        zeros = zp.array().reshape(n, -1) if zp is not None else None
        extra: dict[str, Any] = {}
        if min_term is not None:
            mins = min_term.array()
            extra = {"min_term": mins, "min_block": k // mins.shape[0]}
        try:
            return onnx_nbits.NBitsWeight(bits=bits, block_size=block, n=n, k=k, packed=packed, scales=scales,
                                          zero_points=zeros, **extra)
        except SlmpkgError as e:
            raise FormatError(f"{where}: {e}") from None

    float_zp = zp is not None and zp.dtype != np.uint8
    if min_term is not None or block < 32 or k % 32 or (bits == 8 and float_zp):
        def values() -> np.ndarray:
            return np.ascontiguousarray(build().dequantize(), np.float32).reshape(-1).view(np.uint8)

        return LazyTensor(parts["packed"].name, (n, k), QuantType.F32, values,  # type: ignore[union-attr]
                          read=_cached_reads(values))

    # the block type, from the zero points alone (to_gguf's rule), so no weight is read until a writer asks
    symmetric = zp is None
    if zp is not None and not float_zp:
        levels = onnx_nbits.unpack_levels(zp.array().reshape(n, -1), bits, -(-k // block))
        symmetric = bool((levels == onnx_nbits.default_zero_point(bits)).all())
    qtype = QuantType.Q8_0 if bits == 8 else QuantType.Q4_0 if symmetric else QuantType.Q4_1

    def raw() -> np.ndarray:
        got, data = onnx_nbits.to_gguf(build(), name=where)
        if got is not qtype:
            raise FormatError(f"{where}: blocks came out as {got.name}, expected {qtype.name}")
        return np.frombuffer(data, np.uint8)

    return LazyTensor(parts["packed"].name, (n, k), qtype, raw, read=_cached_reads(raw))  # type: ignore[union-attr]


def _min_terms(g: _Graph) -> dict[str, tuple[Any, _Stored]]:
    """slmpkg's exact minimums: ``MatMulNBits(x) - MatMul(ReduceSum(blocks of x), mins)``; by the
    MatMulNBits node's name, the MatMul node and its ``mins`` initializer."""
    found = {}
    for node in g.nodes:
        if node.op_type != "MatMul" or node.input[1] not in g.inits:
            continue
        for consumer in g.consumers.get(node.output[0], []):
            head = g.producer.get(consumer.input[0]) if consumer.op_type == "Sub" else None
            if head is not None and head.op_type == "MatMulNBits" and consumer.input[1] == node.output[0]:
                found[head.name] = (node, g.inits[node.input[1]])
    return found


def _bias_of(g: _Graph, node: Any, out_dim: int) -> Optional[LazyTensor]:
    """The bias added right after a linear: Gemm's C, or an ``Add`` of a 1-D initializer of ``out_dim``."""
    candidates: list[str] = []
    if node.op_type == "Gemm" and len(node.input) > 2:
        candidates.append(node.input[2])
    if node.op_type == "MatMulNBits" and len(node.input) > 5:
        candidates.append(node.input[5])
    outputs = [node.output[0]]
    # past slmpkg's min-term subtraction, if any
    outputs += [c.output[0] for c in g.consumers.get(node.output[0], []) if c.op_type == "Sub" and c.input[0] == node.output[0]]
    for out in outputs:
        for consumer in g.consumers.get(out, []):
            if consumer.op_type == "Add":
                candidates += [i for i in consumer.input if i != out]
    for name in candidates:
        init = g.inits.get(name)
        if init is not None and init.qtype is not None and init.shape == (out_dim,):
            return _plain(name, init)
    return None


def _linears(g: _Graph) -> list[_Linear]:
    found = []
    min_terms = _min_terms(g)
    min_term_nodes = {id(node) for node, _ in min_terms.values()}
    for node in g.nodes:
        if node.op_type not in ("MatMul", "Gemm", "MatMulNBits") or len(node.input) < 2 or id(node) in min_term_nodes:
            continue
        if node.op_type == "MatMulNBits":
            init, via = g.inits.get(node.input[1]), False
            if init is None:
                continue
        else:
            init, via = g.source(node.input[1])
            if init is None or init.qtype is None or len(init.shape) != 2:
                continue  # activations × activations (attention scores), or a constant that is no weight
        named = _projection([init.name, node.name])
        if named is None:
            raise FormatError(
                f"{g.where(node)}: cannot tell which projection weight {init.name} is "
                "(neither its name nor the node's scope names q_proj/k_proj/.../lm_head)"
            )
        key, layer = named
        if key != "lm_head" and layer is None:
            raise FormatError(f"{g.where(node)}: weight {init.name} ({key}) is in no layer (no layers.N in its scope)")
        if node.op_type == "MatMulNBits":
            weight = _nbits_weight(g, node, min_terms[node.name][1] if node.name in min_terms else None)
        else:
            weight = _float_weight(g, node, init, via)
        fused = {"qkv_proj": "qkv", "gate_up_proj": "gate_up"}.get(key, "")
        found.append(_Linear(node, _PROJECTIONS[key], fused, layer, weight, _bias_of(g, node, weight.shape[0])))
    return found


# ---- metadata ----------------------------------------------------------------------------------------


def _json_file(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a JSON object")
    return data


def _nice(value: float) -> float:
    """A float32 attribute as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _shortest(value: float, accept: Callable[[float], bool]) -> Optional[float]:
    """The decimal with the fewest significant digits (up to 7) near ``value`` that ``accept`` takes."""
    digits = int(math.floor(math.log10(value)))
    for significant in range(1, 8):
        candidate = float(round(value, significant - 1 - digits))
        if candidate > 0 and accept(candidate):
            return candidate
    return None


def _frequencies(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Each column's angular step per position, from the phase unwrapped along the positions (steps
    are below π since rotary frequencies are at most 1), least squares through the origin."""
    phase = np.unwrap(np.arctan2(sin, cos), axis=0)  # [positions, half]
    p = np.arange(cos.shape[0], dtype=np.float64)
    return (phase * p[:, None]).sum(axis=0) / (p * p).sum()


def _rope_base(cos: np.ndarray, sin: np.ndarray, eps: float, source: str) -> tuple[float, float]:
    """(rope base, linear scaling factor) behind cos/sin caches [positions, dim/2] of
    ``position × base^(-2j/dim) / factor``.

    The first frequency is ``1 / factor`` (1 unscaled); the base is fitted in log space across the
    others, each weighted by its total angle (its precision). Caches stored in float16 (or short ones)
    pin them only to a few digits, so the answer is the shortest decimals (10000, 500000, 1e6; 8, 4)
    whose recomputed caches match the stored ones within ``eps`` (the caches' rounding plus a float32
    writer's accumulated error); no match means a rope scaling this cannot name (per-frequency
    factors: Llama 3's, LongRoPE without its two caches).
    """
    positions, half = cos.shape
    if positions < 2 or half < 2:
        raise FormatError(f"{source}: cos/sin caches too small to read the rope base from")
    dim = 2 * half
    p = np.arange(positions, dtype=np.float64)
    inv_freq = _frequencies(cos, sin)
    if not (inv_freq > 0).all():
        raise FormatError(f"{source}: cos/sin caches do not look like rotary embeddings")
    j = np.arange(1, half)
    x = 2 * j / dim

    def matches(base: float, factor: float) -> bool:
        freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim) / factor
        angles = np.outer(p, freqs)
        return bool(np.abs(np.cos(angles) - cos).max() <= eps and np.abs(np.sin(angles) - sin).max() <= eps)

    factors = [1.0] if abs(inv_freq[0] - 1.0) < 1e-4 else []
    factors += [f for f in [_shortest(1.0 / inv_freq[0], lambda f: True)] if f is not None and f not in factors]
    for factor in factors:
        scaled = inv_freq[1:] * factor
        weights = scaled * (positions - 1)
        estimate = float(np.exp(-(weights * x * np.log(scaled)).sum() / (weights * x * x).sum()))
        base = _shortest(estimate, lambda b, f=factor: matches(b, f))
        if base is None and matches(estimate, factor):
            base = float(np.float32(estimate))
        if base is None:
            continue
        # the factor too, to the fewest digits that still match
        return base, _shortest(factor, lambda f, b=base: matches(b, f)) or factor
    raise FormatError(
        f"{source}: cos_cache/sin_cache are not plain rotary embeddings of any base (a per-frequency rope scaling?); "
        "put the model's config.json beside the ONNX file to say which"
    )


def _writer_inv_freq(base: float, dim: int) -> np.ndarray:
    """Rotary inverse frequencies as float32 the way slmpkg's writer (and transformers) computes them."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def _longrope_factors(cos: np.ndarray, sin: np.ndarray, base: float, source: str) -> tuple[np.ndarray, float]:
    """(per-frequency divisors, cos/sin magnitude) of one LongRoPE cache pair (float32 arrays as stored).

    Caches are ``cos(position × inv_freq / factor) × magnitude``; the magnitude is position 0's cosine.
    Each factor is first estimated from its column's phase slope, then made exact where the caches
    allow: the float32 neighbours of the estimated frequency are recomputed as the writer computes
    them and the one reproducing the stored column bit for bit is taken, then the float32 factor that
    divides the base frequency into exactly that value (the nearest to the estimate when several do).
    Caches that reproduce no candidate (float16 caches, another writer) keep the float32 estimate.
    """
    half = cos.shape[1]
    magnitude = np.float32(cos[0, 0])
    if not magnitude > 0:
        raise FormatError(f"{source}: LongRoPE caches with a non-positive magnitude")
    c64, s64 = cos.astype(np.float64), sin.astype(np.float64)
    estimate = _frequencies(c64, s64)
    base_inv = _writer_inv_freq(base, 2 * half)
    positions = np.arange(cos.shape[0], dtype=np.float32)
    out = np.empty(half, np.float32)
    for j in range(half):
        guess = np.float32(estimate[j])
        if not guess > 0:
            raise FormatError(f"{source}: LongRoPE caches do not look like rotary embeddings (column {j})")
        found = None
        if cos.dtype == np.float32:
            steps = np.arange(-96, 97)
            candidates = (guess.view(np.int32) + steps).astype(np.int32).view(np.float32)
            for inv in candidates[np.argsort(np.abs(steps))]:
                angles = (positions * inv).astype(np.float32).astype(np.float64)
                if (np.array_equal(np.cos(angles).astype(np.float32) * magnitude, cos[:, j])
                        and np.array_equal(np.sin(angles).astype(np.float32) * magnitude, sin[:, j])):
                    found = np.float32(inv)
                    break
        if found is None:
            out[j] = np.float32(float(base_inv[j]) / float(guess))
            continue
        f_guess = np.float32(float(base_inv[j]) / float(found))
        steps = np.arange(-8, 9)
        options = (f_guess.view(np.int32) + steps).astype(np.int32).view(np.float32)
        exact = [f for f in options[np.argsort(np.abs(steps))] if np.float32(base_inv[j] / f) == found]
        out[j] = exact[0] if exact else f_guess
    return out, float(magnitude)


class _Facts:
    """What the graph says about the model beyond its weights: head counts, epsilon, rotary caches and
    layout, per-layer windows and attention settings, experts, and the constants of the scaling nodes."""

    def __init__(self, g: _Graph):
        self.n_head = self.n_head_kv = None
        self.eps: Optional[float] = None
        self.interleaved: Optional[bool] = None
        self.caches: Optional[tuple[_Stored, _Stored]] = None
        self.layer_caches: dict[int, tuple[str, str]] = {}  # GQA's cos/sin inputs by layer
        self.windows: dict[int, int] = {}  # GQA local_window_size by layer (-1: global)
        self.scale: Optional[float] = None  # GQA's scale (1/sqrt(head size) unless a family changes it)
        self.softcap: Optional[float] = None
        self.moe: dict[int, Any] = {}  # com.microsoft.MoE nodes by layer
        for node in g.nodes:
            if node.op_type == "GroupQueryAttention":
                layer = _layer_of(node.name)
                if layer is not None:
                    self.windows[layer] = int(_attr(node, "local_window_size", -1))
                    if len(node.input) > 8:
                        self.layer_caches[layer] = (node.input[7], node.input[8])
                if self.scale is None and _attr(node, "scale"):
                    self.scale = float(_attr(node, "scale"))
                if self.softcap is None and _attr(node, "softcap"):
                    self.softcap = float(_attr(node, "softcap"))
            if node.op_type == "MoE":
                layer = _layer_of(node.name)
                if layer is None:
                    raise FormatError(f"{g.where(node)}: an MoE node in no layer (no layers.N in its name)")
                self.moe[layer] = node
            if node.op_type in ("GroupQueryAttention", "PagedAttention") and self.n_head is None:
                self.n_head, self.n_head_kv = _attr(node, "num_heads"), _attr(node, "kv_num_heads")
                if _attr(node, "do_rotary", 0) and len(node.input) > 8:
                    cos, sin = g.inits.get(node.input[7]), g.inits.get(node.input[8])
                    if cos is not None and sin is not None:
                        self.caches = (cos, sin)
            if node.op_type in _ROTARY_OPS and self.interleaved is None:
                flag = _attr(node, "rotary_interleaved" if "Attention" in node.op_type else "interleaved")
                if node.op_type != "GroupQueryAttention" or _attr(node, "do_rotary", 0):
                    self.interleaved = bool(flag or 0)
                if node.op_type == "RotaryEmbedding" and self.caches is None and len(node.input) > 3:
                    cos, sin = g.inits.get(node.input[2]), g.inits.get(node.input[3])
                    if cos is not None and sin is not None:
                        self.caches = (cos, sin)
            if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization") and self.eps is None:
                eps = _attr(node, "epsilon")
                if eps is not None:
                    self.eps = _nice(eps)
        self.embed_scale = self._embed_scale(g)
        self.residual_scale = self._residual_scale(g)
        self.logit_scale, self.final_softcap = self._logit_steps(g)

    @staticmethod
    def _embed_scale(g: _Graph) -> Optional[float]:
        """The constant the embedding is multiplied by (Gemma's sqrt(hidden), Granite's multiplier)."""
        for node in g.nodes:
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids":
                for c in g.consumers.get(node.output[0], []):
                    if c.op_type == "Mul":
                        return _scalar(g, next(i for i in c.input if i != node.output[0]))
        return None

    @staticmethod
    def _residual_scale(g: _Graph) -> Optional[float]:
        """Granite's multiplier of each residual branch: a ``Mul`` by a constant right before the
        residual add (``SkipSimplifiedLayerNormalization``'s first input)."""
        for node in g.nodes:
            if node.op_type != "SkipSimplifiedLayerNormalization":
                continue
            for value_name in node.input[:2]:  # slmpkg multiplies the branch (input 0), the builder the skip (1)
                producer = g.producer.get(value_name)
                if producer is None or producer.op_type != "Mul":
                    continue
                data = [g.producer.get(i) for i in producer.input if _scalar(g, i) is None]
                if any(d is not None and d.op_type == "Gather" for d in data):
                    continue  # the embedding's multiplier
                value = next((_scalar(g, i) for i in producer.input if _scalar(g, i) is not None), None)
                if value is not None:
                    return value
        return None

    @staticmethod
    def _logit_steps(g: _Graph) -> tuple[Optional[float], Optional[float]]:
        """(Granite's logit divisor, Gemma 2's final soft-cap) from the nodes between lm_head's MatMul and
        ``logits``: ``Div(scale)``, then ``Div(cap) → Tanh → Mul(cap)``."""
        steps: list[tuple[str, Optional[float]]] = []
        node = g.producer.get("logits")
        while node is not None and node.op_type in ("Div", "Tanh", "Mul"):
            value = _scalar(g, node.input[1]) if len(node.input) > 1 else None
            steps.insert(0, (node.op_type, value))
            node = g.producer.get(node.input[0])
        cap = None
        if [op for op, _ in steps[-3:]] == ["Div", "Tanh", "Mul"] and steps[-3][1] == steps[-1][1]:
            cap = steps[-1][1]
            steps = steps[:-3]
        scale = None
        if [op for op, _ in steps] == ["Div"]:
            scale = steps[0][1]
        elif [op for op, _ in steps] == ["Mul"] and steps[0][1]:  # the builder multiplies by 1 / scale
            scale = float(str(np.float32(1.0 / steps[0][1])))
        return scale, cap


def _scalar(g: _Graph, name: str) -> Optional[float]:
    """A one-value constant (a ``Constant`` node or an initializer) as the shortest decimal its stored
    type rounds to (0.22, not 0.2199999988079071), or None."""
    from onnx import numpy_helper

    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant":
        value = _attr(node, "value")
        array = numpy_helper.to_array(value) if value is not None else None
    elif name in g.inits and g.inits[name].qtype in (QuantType.F32, QuantType.F16):
        array = g.inits[name].array().view({QuantType.F32: np.float32, QuantType.F16: np.float16}[g.inits[name].qtype])
    else:
        return None
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(str(array.reshape(-1)[0]))


def _family_class(g: _Graph, facts: _Facts, kind: Any) -> str:
    """The HF class from genai_config.json's ``type`` and what the graph holds: slmpkg writes Mistral as
    ``llama`` (one GGUF architecture) and Mixtral as the generic ``decoder``; experts and windows tell."""
    if facts.moe:
        return "MixtralForCausalLM"
    if kind == "llama" and any(w > 0 for w in facts.windows.values()):
        return "MistralForCausalLM"
    if kind not in _GENAI_TYPES:
        known = ", ".join(_GENAI_TYPES)
        raise FormatError(
            f"{g.file}: cannot tell the model family: no config.json beside it and genai_config.json "
            f"{'has type ' + repr(kind) if kind else 'is missing'} (ONNX import knows {known})"
        )
    return _GENAI_TYPES[kind]


def _hf_config(
    g: _Graph, facts: _Facts, config: Optional[dict[str, Any]], genai: Optional[dict[str, Any]],
    shapes: Mapping[str, tuple[int, ...]], n_layer: int, tied: bool,
) -> dict[str, Any]:
    """The Hugging Face config.json of the model: the one beside it, completed from genai_config.json and the graph."""
    model = (genai or {}).get("model", {}) if genai else {}
    decoder = model.get("decoder", {}) if isinstance(model, dict) else {}
    cfg: dict[str, Any] = dict(config or {})
    if not cfg.get("architectures"):
        cfg["architectures"] = [_family_class(g, facts, model.get("type") if isinstance(model, dict) else None)]
    family = cfg["architectures"][0]
    if family not in SUPPORTED_CLASSES:
        raise FormatError(f"{g.file}: ONNX import supports {', '.join(SUPPORTED_CLASSES)}, not {family}")

    def fill(key: str, *values: Any) -> None:
        if cfg.get(key) is None:
            cfg[key] = next((v for v in values if v is not None), None)

    vocab, hidden = shapes["token_embd.weight"]
    fill("hidden_size", hidden)
    fill("num_hidden_layers", decoder.get("num_hidden_layers"), n_layer)
    fill("num_attention_heads", decoder.get("num_attention_heads"), facts.n_head)
    fill("num_key_value_heads", decoder.get("num_key_value_heads"), facts.n_head_kv, cfg.get("num_attention_heads"))
    if cfg.get("num_attention_heads") is None:
        raise FormatError(f"{g.file}: cannot tell the number of attention heads (no config.json, genai_config.json or GroupQueryAttention)")
    q_rows = shapes.get("blk.0.attn_q.weight", (None,))[0]
    n_head = int(cfg["num_attention_heads"])
    fill("head_dim", decoder.get("head_size"), q_rows // n_head if q_rows else None, hidden // n_head)
    fill("intermediate_size", shapes.get("blk.0.ffn_gate.weight", (None,))[0],
         shapes.get("blk.0.ffn_gate_exps.weight", (None, None))[1])
    if family == "MixtralForCausalLM":
        fill("num_local_experts", shapes.get("blk.0.ffn_gate_exps.weight", (None,))[0])
    fill("rms_norm_eps", facts.eps)
    fill("vocab_size", vocab)
    fill("tie_word_embeddings", tied)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fill(key, model.get(key) if isinstance(model, dict) else None)
    if cfg.get("max_position_embeddings") is None:
        context = model.get("context_length") if isinstance(model, dict) else None
        if context is None and facts.caches is not None:
            context = facts.caches[0].shape[0]
        fill("max_position_embeddings", context)
    if config is None:  # settings the graph holds, when no config.json says them
        _rope_config(g, facts, cfg)
        _graph_config(facts, cfg, n_layer)
        if family == "MixtralForCausalLM" and cfg["head_dim"] == hidden // n_head:
            del cfg["head_dim"]  # transformers' Mixtral saves none when it is the default (no key_length in GGUF)
    cfg.setdefault("model_type", _MODEL_TYPES[family])
    if family in _GEMMAS:
        cfg.setdefault("hidden_activation" if family != "GemmaForCausalLM" else "hidden_act", "gelu_pytorch_tanh")
    else:
        cfg.setdefault("hidden_act", "silu")
    return cfg


def _graph_config(facts: _Facts, cfg: dict[str, Any], n_layer: int) -> None:
    """config.json entries of the family settings the graph computes with: windows, soft-caps, query
    scale, multipliers, experts."""
    family = cfg["architectures"][0]
    windows = [facts.windows.get(i, -1) for i in range(n_layer)]
    sliding = [w > 0 for w in windows]
    if any(sliding):
        cfg["sliding_window"] = max(windows)
        if family in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
            cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    elif family in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        cfg["sliding_window"] = None
        cfg["layer_types"] = ["full_attention"] * n_layer
    elif family in ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"):
        cfg["sliding_window"] = None
    if family in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        cfg["attn_logit_softcapping"] = facts.softcap
        cfg["final_logit_softcapping"] = facts.final_softcap
        if facts.scale:  # GQA's scale is 1/sqrt(query_pre_attn_scalar)
            cfg["query_pre_attn_scalar"] = int(round(1.0 / facts.scale**2))
    if family == "GraniteForCausalLM":
        # each multiplier as the graph applies it; HF's default (1) where the writer left the node out
        cfg["embedding_multiplier"] = facts.embed_scale or 1.0
        cfg["residual_multiplier"] = facts.residual_scale or 1.0
        cfg["attention_multiplier"] = _nice(facts.scale) if facts.scale else 1.0
        cfg["logits_scaling"] = facts.logit_scale or 1.0
    if family == "MixtralForCausalLM":
        node = next(iter(facts.moe.values()))
        cfg["num_experts_per_tok"] = int(_attr(node, "k", 1))


def _rope_config(g: _Graph, facts: _Facts, cfg: dict[str, Any]) -> None:
    """Rope settings from the cos/sin caches GQA rotates with: the base and a linear factor, Gemma 3's
    second (sliding layers') base, partial rotary from the caches' width, Phi-3's LongRoPE factors
    from the two cache pairs its ``If`` chooses between."""
    family = cfg["architectures"][0]
    pairs = {i: names for i, names in facts.layer_caches.items()}
    if not pairs and facts.caches is None:
        raise FormatError(f"{g.file}: no config.json beside it and no cos_cache/sin_cache to read the rope base from")
    if facts.caches is not None and not pairs:
        pairs = {0: (facts.caches[0].name, facts.caches[1].name)}
    global_names = {names for i, names in pairs.items() if facts.windows.get(i, -1) <= 0} or set(pairs.values())
    local_names = {names for i, names in pairs.items() if facts.windows.get(i, -1) > 0} - global_names
    if len(global_names) != 1 or len(local_names) > 1:
        raise FormatError(f"{g.file}: the layers rotate with {len(global_names | local_names)} different cos/sin caches")
    cos_name, sin_name = next(iter(global_names))
    producer = g.producer.get(cos_name)
    if cos_name not in g.inits and producer is not None and producer.op_type == "If":
        _longrope_config(g, producer, cfg)
        return
    if cos_name not in g.inits or sin_name not in g.inits:
        raise FormatError(f"{g.file}: GroupQueryAttention's cos/sin caches {cos_name}, {sin_name} are not initializers")
    if cos_name.endswith("_short"):
        raise FormatError(f"{g.file}: LongRoPE caches without the long pair (context within the original) cannot "
                          "give the long factors; put the model's config.json beside the ONNX file")
    base, factor, width = _fit(g, g.inits[cos_name], g.inits[sin_name])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": base}
    if factor != 1.0:
        rope = {"rope_type": "linear", "factor": factor, "rope_theta": base}
    if 2 * width != cfg["head_dim"]:
        cfg["partial_rotary_factor"] = 2 * width / cfg["head_dim"]
    if local_names:
        (lcos, lsin), = local_names
        local_base, local_factor, _ = _fit(g, g.inits[lcos], g.inits[lsin])
        if local_factor != 1.0:
            raise FormatError(f"{g.file}: {lcos}: sliding layers' rope is scaled (x{local_factor}); llama.cpp scales none")
        if family != "Gemma3ForCausalLM":
            raise FormatError(f"{g.file}: sliding layers rotate with their own caches ({lcos}), which only Gemma 3 does")
        cfg["rope_parameters"] = {"full_attention": rope,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": local_base}}
        return
    if family == "Phi3ForCausalLM":  # the writer records Phi-3's original context only with LongRoPE
        cfg.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    if rope["rope_type"] == "default":
        cfg["rope_theta"] = base
    else:
        cfg["rope_parameters"] = rope


def _fit(g: _Graph, cos: _Stored, sin: _Stored) -> tuple[float, float, int]:
    """(base, linear factor, cache width) of one cache pair, within what its stored type can say."""
    c, s = _as_f64(cos), _as_f64(sin)
    # the caches' own rounding, and a float32 writer's (the builder's) error growing with position
    eps = {QuantType.F16: 2e-3, QuantType.BF16: 1.6e-2}.get(cos.qtype, 1e-6) + c.shape[0] * 2.5e-7
    base, factor = _rope_base(c, s, eps, f"{g.file}: {cos.name}")
    return base, factor, c.shape[1]


def _longrope_config(g: _Graph, choice: Any, cfg: dict[str, Any]) -> None:
    """Phi-3 LongRoPE from slmpkg's ``If(total length > original context)``: the then branch returns
    the long caches, the else branch the short ones (each an ``Identity`` of an outer initializer).

    The caches fix each frequency (``base^(-2j/d) / factor_j``) and the attention factor (their
    magnitude), not the base and the factors apart: the base is config.json's when there is one, else
    Phi-3's 10000 (every Phi-3 / 3.5 / 4 release); a writer that records it lets this read any.
    """
    greater = g.producer.get(choice.input[0])
    original = _scalar(g, greater.input[1]) if greater is not None and greater.op_type == "Greater" else None
    if original is None:
        raise FormatError(f"{g.where(choice)}: an If choosing rotary caches by something other than the total length")
    caches = {}
    for kind, attr in (("long", "then_branch"), ("short", "else_branch")):
        branch = _attr(choice, attr)
        sources = [n.input[0] for n in branch.node if n.op_type == "Identity"]
        stored = [g.inits.get(name) for name in sources]
        if len(stored) != 2 or any(t is None or t.qtype is None for t in stored):
            raise FormatError(f"{g.where(choice)}: the {kind} branch does not return two cache initializers")
        caches[kind] = stored
    base = float(cfg.get("rope_theta") or 10000.0)
    rope: dict[str, Any] = {"rope_type": "longrope", "rope_theta": base}
    magnitudes = {}
    for kind, (cos, sin) in caches.items():
        stored_cos = _as_stored_floats(cos)
        factors, magnitudes[kind] = _longrope_factors(stored_cos, _as_stored_floats(sin), base, f"{g.file}: {cos.name}")
        stored_type = stored_cos.dtype.type
        rope[f"{kind}_factor"] = [float(f) for f in factors]
    width = caches["long"][0].shape[1]
    context = caches["long"][0].shape[0]
    original = int(original)
    # transformers' default attention factor (the LongRoPE paper's) is left implicit, as a source would
    factor = context / original
    default = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    if stored_type(default) != stored_type(magnitudes["long"]):  # as exact as the caches' type says
        rope["attention_factor"] = float(str(stored_type(magnitudes["long"])))
    rope["original_max_position_embeddings"] = original
    cfg["original_max_position_embeddings"] = original
    cfg["max_position_embeddings"] = context
    if 2 * width != cfg["head_dim"]:
        rope["partial_rotary_factor"] = 2 * width / cfg["head_dim"]
    cfg["rope_parameters"] = rope


# a model property holding the model's Hugging Face config.json (the runtimes ignore model properties;
# onnxruntime-genai refuses keys it does not know in genai_config.json, so settings travel here)
CONFIG_PROPERTY = "slmpkg.config.json"


def _embedded_config(g: _Graph) -> Optional[dict[str, Any]]:
    """The config.json a writer stored in the model's ``metadata_props`` (:data:`CONFIG_PROPERTY`), or None.

    It says what the graph cannot (LongRoPE's base and exact factors, Phi-3's original context), so
    with it nothing is inferred from the graph but what config.json leaves out.
    """
    entry = next((p.value for p in g.model.metadata_props if p.key == CONFIG_PROPERTY), None)
    if entry is None:
        return None
    try:
        data = json.loads(entry)
    except ValueError as e:
        raise FormatError(f"{g.file}: model property {CONFIG_PROPERTY} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{g.file}: model property {CONFIG_PROPERTY} is not a JSON object")
    return data


def _as_stored_floats(s: _Stored) -> np.ndarray:
    """A small float initializer in its own float type (bf16, which numpy lacks, as float32: exact)."""
    if s.qtype is QuantType.F16:
        return s.array().view(np.float16)
    if s.qtype is QuantType.F32:
        return s.array().view(np.float32)
    return _as_f64(s).astype(np.float32)


def _as_f64(s: _Stored) -> np.ndarray:
    """A small float initializer (rotary caches) as float64."""
    if s.qtype is QuantType.BF16:
        return (s.array().astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return s.array().astype(np.float64)


# ---- reading -----------------------------------------------------------------------------------------


def _locate(path: Path) -> tuple[Path, Path]:
    """(model file, model directory) for a directory or a .onnx file."""
    if path.is_dir():
        genai = _json_file(path / "genai_config.json")
        name = None
        if genai is not None:
            name = ((genai.get("model") or {}).get("decoder") or {}).get("filename")
        candidates = [path / name] if isinstance(name, str) and name else []
        candidates += [path / "model.onnx"] + sorted(path.glob("*.onnx"))
        # the Hugging Face layout keeps them in onnx/ (optimum, transformers.js: model.onnx or the merged decoder)
        candidates += [path / "onnx" / "model.onnx", path / "onnx" / "decoder_model_merged.onnx"]
        for c in candidates:
            if c.is_file():
                return c, c.parent
        raise FormatError(f"{path}: no .onnx model in this directory")
    if not path.is_file():
        raise FormatError(f"{path}: no such file or directory")
    return path, path.parent


def _beside(directory: Path) -> Path:
    """Where config.json and the tokenizer are: the model's directory, or its parent for the Hugging Face
    layout that keeps the .onnx files in ``onnx/`` (optimum, transformers.js)."""
    own = any((directory / name).is_file() for name in ("config.json", "genai_config.json"))
    if not own and directory.name == "onnx" and (directory.parent / "config.json").is_file():
        return directory.parent
    return directory


def _parse(model_file: Path) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(model_file), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise FormatError(f"{model_file}: not an ONNX model (protobuf does not parse: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not model.graph.node:
        raise FormatError(f"{model_file}: not an ONNX model (no graph nodes)")
    return model


def _embedding(g: _Graph) -> tuple[Optional[LazyTensor], Optional[_Stored]]:
    """token_embd from the Gather over input_ids, and the initializer behind it (to spot a tied lm_head).

    The builder's int4 graphs with tied embeddings gather from lm_head's own MatMulNBits blocks
    (``Reshape`` → ``GatherBlockQuantized`` with lm_head's scales): then the tensor is None and the
    initializer is that weight; :func:`read` takes lm_head's blocks as the embedding.
    """
    for node in g.nodes:
        if node.op_type not in ("Gather", "GatherBlockQuantized") or len(node.input) < 2:
            continue
        if node.input[1] != "input_ids" and "embed_tokens" not in node.name:
            continue
        if node.op_type == "GatherBlockQuantized":
            producer = g.producer.get(node.input[0])
            data = producer.input[0] if producer is not None and producer.op_type == "Reshape" else node.input[0]
            head = next((c for c in g.consumers.get(data, []) if c.op_type == "MatMulNBits"), None)
            if head is None or data not in g.inits or len(node.input) < 3 or head.input[2] != node.input[2]:
                raise FormatError(f"{g.where(node)}: a quantized embedding (GatherBlockQuantized) is imported only "
                                  "when it shares lm_head's MatMulNBits blocks")
            return None, g.inits[data]
        init, via = g.source(node.input[0])
        if init is None or init.qtype is None or len(init.shape) != 2:
            raise FormatError(f"{g.where(node)}: the embedding is not a 2-D float initializer")
        if via:
            rows, cols = init.shape
            return _transposed("token_embd.weight", init), init
        return _plain("token_embd.weight", init), init
    raise FormatError(f"{g.file}: no embedding Gather over input_ids (not a decoder language model?)")


def _norms(g: _Graph) -> dict[str, tuple[LazyTensor, bool]]:
    """Norm weights by GGUF name, with whether the graph applies them as stored (fused norm ops)."""
    out: dict[str, tuple[LazyTensor, bool]] = {}
    # Gemma 2/3 in HF's names: with a pre_feedforward_layernorm, post_attention_layernorm is the norm
    # after attention (llama.cpp's post_attention_norm), not the one before the MLP
    sandwich = any("pre_feedforward_layernorm" in name for name in g.inits)
    names = dict(_NORMS, post_attention_layernorm="post_attention_norm") if sandwich else _NORMS
    for name, init in g.inits.items():
        if init.qtype is None or len(init.shape) != 1:
            continue
        parts = _parts(name)
        stem = next((names[p] for p in reversed(parts) if p in names), None)
        layer = _layer_of(name)
        if stem is None and name in ("model.norm.weight", "norm.weight"):
            stem = "output_norm"
        if stem is None:
            continue
        if stem == "output_norm":
            target = "output_norm.weight"
        elif layer is None:
            raise FormatError(f"{g.file}: tensor {name}: a layer norm outside any layer")
        else:
            target = f"blk.{layer}.{stem}.weight"
        if target in out:
            raise FormatError(f"{g.file}: tensors {out[target][0].name} and {name} both map to {target}")
        applied = any(c.op_type in _APPLIED_NORM_OPS for c in g.consumers.get(name, []))
        out[target] = (_plain(name, init), applied)
    return out


def read(path: PathLike) -> Checkpoint:
    """Read an ONNX decoder (a model directory or a ``.onnx`` file) as a canonical, GGUF-named checkpoint.

    Supports every family slmpkg's writer exports (Llama/Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Gemma
    1/2/3, Granite) and the Llama/Qwen/Gemma graphs of onnxruntime-genai's builder and optimum; ``MatMulNBits`` weights become GGUF blocks (see :mod:`slmpkg.formats.onnx_nbits`).
    Raises :class:`FormatError` (one line naming the file) for a file that is not ONNX, external data
    that is outside the directory, missing or short, and a graph whose weights cannot be mapped.

    Example:
        >>> ckpt = read("out/tiny-onnx")                                  # doctest: +SKIP
        >>> ckpt.get("llama.block_count"), len(ckpt.tensors)              # doctest: +SKIP
        (2, 21)
    """
    from .. import architectures as arch_mod

    model_file, directory = _locate(Path(path))
    g = _Graph(_parse(model_file), model_file, directory)
    facts = _Facts(g)
    beside = _beside(directory)
    config = _json_file(beside / "config.json") or _embedded_config(g)
    genai = _json_file(beside / "genai_config.json")

    embd, embd_init = _embedding(g)
    tensors: dict[str, LazyTensor] = {}
    origin: dict[str, str] = {}
    linears = _linears(g)
    tied = False
    for lin in linears:
        if lin.target == "output" and embd_init is not None:
            init = g.inits.get(lin.node.input[1]) if lin.node.op_type == "MatMulNBits" else g.source(lin.node.input[1])[0]
            if init is embd_init:  # the builder's tied embedding: one initializer read both ways
                tied = True
                if embd is None:  # gathered from lm_head's blocks: they are the embedding
                    embd = lin.weight
    if embd is None:
        raise FormatError(f"{g.file}: the quantized embedding's blocks belong to no lm_head MatMulNBits")
    head = next((lin for lin in linears if lin.target == "output"), None)
    if not tied and head is not None and _same_values(embd, head.weight):
        tied = True  # a writer that copies the tied matrix into lm_head (slmpkg's own): one copy is enough

    def put(name: str, t: LazyTensor, src: str) -> None:
        if name in tensors and origin[name] == src:
            return  # the same weight met again (another If branch of a merged decoder)
        if name in tensors:
            raise FormatError(f"{g.file}: {origin[name]} and {src} both map to {name}")
        tensors[name], origin[name] = t.renamed(name), src

    put("token_embd.weight", embd, embd.name)
    fused: list[_Linear] = []
    for lin in linears:
        if lin.fused:
            fused.append(lin)
            continue
        if lin.target == "output" and tied:
            continue
        stem = "output" if lin.target == "output" else f"blk.{lin.layer}.{lin.target}"
        put(f"{stem}.weight", lin.weight, lin.weight.name)
        if lin.bias is not None:
            put(f"{stem}.bias", lin.bias, lin.bias.name)
    norms = _norms(g)
    for name, (t, _) in norms.items():
        put(name, t, t.name)
    for layer, node in facts.moe.items():
        for name, t in _experts(g, node, layer).items():
            put(name, t, t.name)

    layers = sorted({lin.layer for lin in linears if lin.layer is not None} | set(facts.moe))
    n_layer = len(layers)
    if layers != list(range(n_layer)):
        raise FormatError(f"{g.file}: layers {layers} are not numbered 0..{n_layer - 1}")
    shapes = {name: t.shape for name, t in tensors.items()}
    for lin in fused:  # a fused gate_up gives the feed-forward width; a fused qkv needs the head counts
        if lin.fused == "gate_up":
            shapes.setdefault("blk.0.ffn_gate.weight", (lin.weight.shape[0] // 2,))
    sidecar = {}
    for name in _TOKENIZER_FILES:
        p = beside / name
        if p.is_file():
            sidecar[name] = p.read_bytes()
    cfg = _hf_config(g, facts, config, genai, shapes, n_layer, tied)
    if int(cfg["num_hidden_layers"]) != n_layer:
        raise FormatError(f"{g.file}: the graph has {n_layer} layers but its configuration says {cfg['num_hidden_layers']}")
    sidecar["config.json"] = json.dumps(cfg).encode()
    name = beside.name if model_file.name == "model.onnx" or beside != directory else model_file.stem
    metadata, extra = arch_mod.hf_metadata(cfg, sidecar, name)
    family, dims = arch_mod.hf_dims(cfg)
    q_size, kv_size = dims.n_head * dims.head_dim, dims.n_head_kv * dims.head_dim

    kept = {r.gguf for r in family.layer_tensors}
    for lin in fused:
        stem = f"blk.{lin.layer}"
        whole = "attn_qkv" if lin.fused == "qkv" else "ffn_up"
        if whole in kept and "attn_q" not in kept:  # llama.cpp's phi3 keeps both fused (gate rows, then up)
            put(f"{stem}.{whole}.weight", lin.weight, lin.weight.name)
            if lin.bias is not None:
                put(f"{stem}.{whole}.bias", lin.bias, lin.bias.name)
            continue
        if lin.fused == "qkv":
            sizes = (("attn_q", q_size), ("attn_k", kv_size), ("attn_v", kv_size))
        else:
            half = lin.weight.shape[0] // 2
            sizes = (("ffn_gate", half), ("ffn_up", half))
        if sum(s for _, s in sizes) != lin.weight.shape[0]:
            raise FormatError(
                f"{g.where(lin.node)}: fused weight {lin.weight.name} has {lin.weight.shape[0]} outputs, "
                f"the head counts need {sum(s for _, s in sizes)}"
            )
        start = 0
        for part, size in sizes:
            for suffix, src in (("weight", lin.weight), ("bias", lin.bias)):
                if src is not None:
                    put(f"{stem}.{part}.{suffix}", _rows(src, start, start + size), src.name)
            start += size

    if "attn_qkv" in kept and "attn_q" not in kept:  # Phi-3 from a graph with separate projections
        for i in range(n_layer):
            for whole, parts in (("attn_qkv", ("attn_q", "attn_k", "attn_v")), ("ffn_up", ("ffn_gate", "ffn_up"))):
                for suffix in ("weight", "bias"):
                    names = [f"blk.{i}.{p}.{suffix}" for p in parts]
                    if all(n in tensors for n in names):
                        pieces = [tensors.pop(n) for n in names]
                        target = f"blk.{i}.{whole}.{suffix}"
                        tensors[target], origin[target] = _concat_rows(target, pieces), "+".join(t.name for t in pieces)

    # rotary layout: llama.cpp's llama graph wants q/k rows pair-adjacent; the graph's GQA says which it has
    wants_pairs = any(isinstance(r.transform, arch_mod.PermuteHeads) for r in family.layer_tensors)
    has_pairs = bool(facts.interleaved)
    for i in range(n_layer):
        for part, heads in (("attn_q", dims.n_head), ("attn_k", dims.n_head_kv)):
            for suffix in ("weight", "bias"):
                name = f"blk.{i}.{part}.{suffix}"
                if name not in tensors or wants_pairs == has_pairs:
                    continue
                move = arch_mod.permute_qk if wants_pairs else arch_mod.unpermute_qk
                tensors[name] = _with_rows(tensors[name], lambda rows, n=heads, f=move: f(rows, n))

    # norms the graph computes as HF does (optimum) get llama.cpp's convention (Gemma: 1 + w)
    shifts = {r.gguf: r.transform for r in family.layer_tensors + family.global_tensors
              if isinstance(r.transform, arch_mod.Shift)}
    for name, (t, applied) in norms.items():
        stem = name.split(".")[-2]
        if not applied and stem in shifts:
            tensors[name] = shifts[stem].forward(tensors[name], dims)
        elif len(t.shape) == 1 and tensors[name].qtype is not QuantType.F32:
            tensors[name] = tensors[name].converted(QuantType.F32)  # llama.cpp keeps norms in F32

    if family.output == "tied" and "output.weight" in tensors:
        del tensors["output.weight"]  # llama.cpp's graph reads token_embd (the builder wrote a copy)
    _check_complete(g, tensors, origin, n_layer, family, dims)
    ordered = [tensors["token_embd.weight"]] + [t for t in extra]
    for i in range(n_layer):
        ordered += [t for name, t in tensors.items() if name.startswith(f"blk.{i}.")]
    ordered += [tensors[n] for n in ("output_norm.weight", "output.weight") if n in tensors]
    return Checkpoint(metadata, ordered, sidecar={})


def _concat_rows(name: str, parts: list[LazyTensor]) -> LazyTensor:
    """``parts`` stacked row-wise (Phi-3's fused q/k/v or gate/up), one part in memory besides the result."""
    qtype = parts[0].qtype
    if any(p.qtype is not qtype or p.shape[1:] != parts[0].shape[1:] for p in parts):
        raise FormatError(f"{name}: the projections to fuse differ in type or width")

    def raw() -> np.ndarray:
        return np.concatenate([np.asarray(p.raw()).reshape(-1).view(np.uint8) for p in parts])

    return LazyTensor(name, (sum(p.shape[0] for p in parts), *parts[0].shape[1:]), qtype, raw)


def _experts(g: _Graph, node: Any, layer: int) -> dict[str, LazyTensor]:
    """ffn_gate_exps / ffn_up_exps / ffn_down_exps of one ``com.microsoft.MoE`` node: its fused SwiGLU
    weight [experts, 2 × ff, hidden] holds gate and up rows interleaved (``swiglu_fusion=1``: gate row,
    up row, ...), taken apart here one expert at a time; the down weight is stored as GGUF keeps it."""
    activation = _attr(node, "activation_type", b"")
    if (activation.decode() if isinstance(activation, bytes) else activation) != "swiglu" or int(_attr(node, "swiglu_fusion", 0) or 0) != 1:
        raise FormatError(f"{g.where(node)}: only SwiGLU experts with interleaved gate/up rows (swiglu_fusion=1) are imported")
    names = list(node.input) + [""] * 5
    fc1, fc2 = g.inits.get(names[2]), g.inits.get(names[4])
    if fc1 is None or fc2 is None or fc1.qtype is None or fc2.qtype is None or len(fc1.shape) != 3 or len(fc2.shape) != 3:
        raise FormatError(f"{g.where(node)}: MoE expert weights are not 3-D float initializers")
    if names[3] or names[5]:
        raise FormatError(f"{g.where(node)}: MoE expert biases have no place in llama.cpp's graph")
    n_expert, rows, hidden = fc1.shape
    ff = rows // 2
    per_expert = rows * hidden * fc1.dtype.itemsize

    def half(parity: int) -> Callable[[], np.ndarray]:
        def raw() -> np.ndarray:
            out = np.empty((n_expert, ff, hidden), fc1.dtype)
            for e in range(n_expert):
                both = fc1.read(e * per_expert, per_expert).view(fc1.dtype).reshape(rows, hidden)
                out[e] = both[parity::2]
            return out.reshape(-1).view(np.uint8)
        return raw

    stem = f"blk.{layer}"
    return {
        f"{stem}.ffn_gate_exps.weight": LazyTensor(fc1.name, (n_expert, ff, hidden), fc1.qtype, half(0)),  # type: ignore[arg-type]
        f"{stem}.ffn_up_exps.weight": LazyTensor(f"{fc1.name}[up]", (n_expert, ff, hidden), fc1.qtype, half(1)),  # type: ignore[arg-type]
        f"{stem}.ffn_down_exps.weight": _plain(fc2.name, fc2),
    }


def _same_values(a: LazyTensor, b: LazyTensor, rows: int = 4096) -> bool:
    """Whether two float tensors hold the same bytes. Their first rows decide for almost every untied
    pair (a cheap ranged read); only a tied-looking pair is compared whole, ``b`` computed once and
    ``a`` read in row ranges beside it, so this holds one tensor and a slab."""
    if a.shape != b.shape or a.qtype is not b.qtype or a.qtype not in (QuantType.F32, QuantType.F16, QuantType.BF16):
        return False
    row = _row_bytes(a)
    probe = min(4, a.shape[0]) * row
    same = np.array_equal(a.byte_range(0, probe), b.byte_range(0, probe))
    for t in (a, b):  # a tensor computed whole keeps its bytes for the next read; there is none now
        getattr(t.read, "release", lambda: None)()
    if not same:
        return False
    whole = np.asarray(b.raw()).reshape(-1).view(np.uint8)
    for start in range(0, a.nbytes, rows * row):
        stop = min(start + rows * row, a.nbytes)
        if not np.array_equal(a.byte_range(start, stop - start), whole[start:stop]):
            return False
    return True


def _check_complete(
    g: _Graph, tensors: Mapping[str, LazyTensor], origin: Mapping[str, str], n_layer: int, family: Any, dims: Any,
) -> None:
    """Every tensor llama.cpp's graph needs is there, with the shape the configuration implies."""
    from .. import architectures as arch_mod

    optional = {"attn_q_norm", "attn_k_norm"} if family.gguf_arch != "qwen3" else set()
    wanted = [(f"{r.gguf}.weight", r) for r in family.global_tensors if r.gguf != "output"]
    for i in range(n_layer):
        wanted += [(f"blk.{i}.{r.gguf}.weight", r) for r in family.layer_tensors if r.gguf not in optional]
    for name, rule in wanted:
        t = tensors.get(name)
        if t is None:
            raise FormatError(f"{g.file}: found no weight for {name} (the graph's names and scopes do not lead to it)")
        want = arch_mod.expected_shape(rule, dims)
        if want is not None and tuple(t.shape) != want:
            raise FormatError(f"{g.file}: tensor {origin[name]} for {name} has shape {list(t.shape)}, the configuration implies {list(want)}")

