"""The ONNX graph as slmpkg reads it: nodes (subgraphs included), initializers, producers and consumers, and the
weights found in it: linears (MatMul, Gemm, MatMulNBits) named by initializer or node scope, the embedding, MoE experts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...checkpoint import LazyTensor
from ...errors import FormatError, SlmpkgError
from ...quant import QuantType
from .stored import _Stored, _cached_reads, _plain, _stored, _transposed


# the projection named in a node scope or initializer name → the GGUF tensor (None: fused, split below)
_PROJECTIONS = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "qkv_proj": None, "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
    "gate_up_proj": None, "lm_head": "output",
    "gate": "ffn_gate_inp",  # an MoE router (slmpkg's moe.gate, optimum's block_sparse_moe.gate)
    # plain MLPs: the builder's and HF Phi's fc1/fc2, HF StarCoder2's c_fc/c_proj; HF Phi's attention output
    "fc1": "ffn_up", "fc2": "ffn_down", "c_fc": "ffn_up", "c_proj": "ffn_down", "dense": "attn_output",
}


_LAYER = re.compile(r"(?:^|[./])layers[./](\d+)(?:[./]|$)")


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
        # subgraphs too: optimum's merged decoders run the whole model inside If branches that read the
        # main graph's initializers (each branch once more, so the same weight may be met twice)
        self.nodes: list[Any] = list(_walk(graph))
        _check_text(model, self.nodes, model_file)
        for node in self.nodes:
            _check_node(node, self.where(node))
        sizes: dict[Path, int] = {}
        self.inits = {t.name: _stored(t, directory, model_file, sizes) for t in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
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


# what the reader takes from the nodes it reads: the inputs it indexes (at least), and each attribute's kind
# as onnx.helper.get_attribute_value gives it; a node short of them is damage, refused by name
_INPUTS = {"MatMul": 2, "Gemm": 2, "MatMulNBits": 3, "Gather": 2, "GatherBlockQuantized": 3, "Transpose": 1,
           "Cast": 1, "Identity": 1, "Mul": 2, "Div": 2, "Sub": 2, "Add": 2, "Tanh": 1, "Reshape": 1, "If": 1,
           "Greater": 2, "MoE": 1, "SkipSimplifiedLayerNormalization": 2, "SkipLayerNormalization": 2}
_NORM_ATTRIBUTES = {"epsilon": float}
_ATTRIBUTES: dict[str, dict[str, type]] = {
    "GroupQueryAttention": {"num_heads": int, "kv_num_heads": int, "local_window_size": int, "scale": float,
                            "softcap": float, "do_rotary": int, "rotary_interleaved": int},
    "PagedAttention": {"num_heads": int, "kv_num_heads": int, "do_rotary": int, "rotary_interleaved": int},
    "RotaryEmbedding": {"interleaved": int},
    "MatMulNBits": {"N": int, "K": int, "bits": int, "block_size": int},
    "MoE": {"k": int, "swiglu_fusion": int, "activation_type": bytes},
    "Gemm": {"transB": int}, "Transpose": {"perm": list},
    "SimplifiedLayerNormalization": _NORM_ATTRIBUTES, "SkipSimplifiedLayerNormalization": _NORM_ATTRIBUTES,
    "LayerNormalization": _NORM_ATTRIBUTES, "SkipLayerNormalization": _NORM_ATTRIBUTES,
}

_REQUIRED = {"GroupQueryAttention": ("num_heads", "kv_num_heads"), "PagedAttention": ("num_heads", "kv_num_heads"),
             "MatMulNBits": ("N", "K", "block_size")}


def _check_node(node: Any, where: str) -> None:
    """Refuse a node without the inputs, an output, or attributes of the kinds the reader takes from it."""
    if not node.output:
        raise FormatError(f"{where}: a {node.op_type} node without outputs")
    if len(node.input) < _INPUTS.get(node.op_type, 0):
        raise FormatError(f"{where}: a {node.op_type} node with {len(node.input)} inputs (at least {_INPUTS[node.op_type]})")
    kinds = _ATTRIBUTES.get(node.op_type, {})
    for name in _REQUIRED.get(node.op_type, ()):
        if not any(a.name == name for a in node.attribute):
            raise FormatError(f"{where}: a {node.op_type} node without its {name} attribute")
    for name in ("then_branch", "else_branch") if node.op_type == "If" else ():
        if not any(a.name == name and a.HasField("g") for a in node.attribute):
            raise FormatError(f"{where}: an If node without its {name} graph")
    for a in node.attribute:
        kind = kinds.get(a.name)
        if kind is None:
            continue
        value = _attr(node, a.name)
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, int) for v in value)):
            wanted = {int: "an integer", float: "a float", list: "a list of integers", bytes: "a string"}[kind]
            raise FormatError(f"{where}: attribute {a.name} is {value!r}, not {wanted}")
        if kind is float and not np.isfinite(value):
            raise FormatError(f"{where}: attribute {a.name} is {value}")


def _check_text(model: Any, nodes: list[Any], model_file: Path) -> None:
    """Refuse a model with a name that is not UTF-8: protobuf hands such (proto2) string fields back as
    bytes, which no name comparison would match."""

    def names() -> Iterable[Any]:
        for t in model.graph.initializer:
            yield t.name
            for e in t.external_data:
                yield from (e.key, e.value)
        for n in nodes:
            yield from (n.name, n.op_type, n.domain, *n.input, *n.output, *(a.name for a in n.attribute))
        for p in model.metadata_props:
            yield from (p.key, p.value)

    for name in names():
        if not isinstance(name, str):
            raise FormatError(f"{model_file}: not an ONNX model (the name {bytes(name)[:40]!r} is not UTF-8)")


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
    if init.qtype is None or len(init.shape) != 2 or 0 in init.shape:
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
        from .. import onnx_nbits
    except ImportError:
        raise FormatError(f"{g.where(node)}: MatMulNBits weights cannot be imported yet (slmpkg.formats.onnx_nbits is missing)") from None
    n, k = _attr(node, "N", 0), _attr(node, "K", 0)
    bits, block = _attr(node, "bits", 4), _attr(node, "block_size", 0)
    if n < 1 or k < 1 or not 2 <= bits <= 8 or block < 16 or block & (block - 1):
        raise FormatError(f"{g.where(node)}: MatMulNBits with N={n}, K={k}, bits={bits}, block_size={block} "
                          "(N, K positive; bits 2 to 8; block_size a power of two from 16)")
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

    k_blocks = -(-k // block)
    sizes = {"packed": n * k_blocks * (block * bits // 8), "scales": n * k_blocks * parts["scales"].dtype.itemsize}  # type: ignore[union-attr]
    for key, size in sizes.items():
        if parts[key].nbytes != size:  # type: ignore[union-attr]
            raise FormatError(f"{where}: MatMulNBits {key} hold {parts[key].nbytes} bytes, N={n}, K={k} need {size}")  # type: ignore[union-attr]
    if zp is not None and (zp.nbytes == 0 or zp.nbytes % n):
        raise FormatError(f"{where}: MatMulNBits zero points hold {zp.nbytes} bytes, not a whole number per row of N={n}")

    def build() -> Any:
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


def _scalar(g: _Graph, name: str) -> Optional[float]:
    """A one-value constant (a ``Constant`` node or an initializer) as the shortest decimal its stored
    type rounds to (0.22, not 0.2199999988079071), or None."""
    from onnx import TensorProto, numpy_helper

    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant":
        value = _attr(node, "value")
        try:
            array = numpy_helper.to_array(value) if isinstance(value, TensorProto) else None
        except (ValueError, TypeError, KeyError):  # a value tensor whose data does not fit its type and shape
            array = None
    elif name in g.inits and g.inits[name].qtype in (QuantType.F32, QuantType.F16):
        array = g.inits[name].array().view({QuantType.F32: np.float32, QuantType.F16: np.float16}[g.inits[name].qtype])
    else:
        return None
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(str(array.reshape(-1)[0]))


def _parse(model_file: Path) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(model_file), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{model_file}: not an ONNX model (protobuf does not parse: {why})") from None
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
        if init is None or init.qtype is None or len(init.shape) != 2 or 0 in init.shape:
            raise FormatError(f"{g.where(node)}: the embedding is not a 2-D float initializer")
        if via:
            rows, cols = init.shape
            return _transposed("token_embd.weight", init), init
        return _plain("token_embd.weight", init), init
    raise FormatError(f"{g.file}: no embedding Gather over input_ids (not a decoder language model?)")


def _experts(g: _Graph, node: Any, layer: int) -> dict[str, LazyTensor]:
    """ffn_gate_exps / ffn_up_exps / ffn_down_exps of one ``com.microsoft.MoE`` node: its fused SwiGLU
    weight [experts, 2 × ff, hidden] holds gate and up rows interleaved (``swiglu_fusion=1``: gate row,
    up row, ...), taken apart here one expert at a time; the down weight is stored as GGUF keeps it."""
    activation = _attr(node, "activation_type", b"")
    if activation.decode(errors="replace") != "swiglu" or _attr(node, "swiglu_fusion", 0) != 1:
        raise FormatError(f"{g.where(node)}: only SwiGLU experts with interleaved gate/up rows (swiglu_fusion=1) are imported")
    names = list(node.input) + [""] * 5
    fc1, fc2 = g.inits.get(names[2]), g.inits.get(names[4])
    if (fc1 is None or fc2 is None or fc1.qtype is None or fc2.qtype is None or len(fc1.shape) != 3 or len(fc2.shape) != 3
            or 0 in fc1.shape + fc2.shape or fc1.shape[1] % 2):
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
