"""ONNX: a streaming writer of decoder graphs in onnxruntime-genai's layout (llama, qwen2, qwen3).

The graph is built from the canonical (GGUF-named) checkpoint with the ``onnx`` package, no torch
export, as onnxruntime-genai's model builder lays it out:

* inputs ``input_ids`` [B,S] int64, ``attention_mask`` [B,T] int64, ``past_key_values.{i}.key|value``
  [B, kv_heads, past, head_dim]; outputs ``logits`` [B,S,vocab] and ``present.{i}.key|value``;
* ``Gather`` embedding, ``SimplifiedLayerNormalization`` before the first layer, then
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (residual add + RMS norm) everywhere after;
* ``com.microsoft.GroupQueryAttention`` with ``do_rotary=1`` and cos/sin caches
  [context_length, rotary_dim/2]; ``seqlens_k`` (attention_mask row sums − 1, int32) and
  ``total_sequence_length`` (attention_mask's width, int32) are computed in the graph, as the builder
  does. llama's q/k rows are GGUF-permuted (each head's rotary pairs adjacent), which is GQA's
  ``rotary_interleaved=1``; qwen2/qwen3 keep HF's half-split layout (``rotary_interleaved=0``);
* linears are float ``MatMul`` with weights transposed to [in, out] (qwen2's q/k/v biases are ``Add``);
  qwen3's per-head q/k norms are ``SimplifiedLayerNormalization`` over head_dim before GQA;
  the MLP is ``down(silu(gate(x)) * up(x))`` with SiLU as ``Sigmoid`` × input.

Weights go to one external data file, ``model.onnx.data``, written tensor by tensor as the graph is
built (one tensor in memory at a time); the graph references them by location/offset/length.
Tensors under 1024 bytes are stored inline and shape/axes values are ``Constant`` nodes (external
tiny tensors break ReduceSum's shape inference). ``genai_config.json`` is written beside.

Example:
    >>> from slmpkg.formats import onnx as onnx_format
    >>> onnx_format.write("out/tiny-onnx", checkpoint)      # doctest: +SKIP
    [PosixPath('out/tiny-onnx/model.onnx'), PosixPath('out/tiny-onnx/model.onnx.data'), ...]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import onnx
from onnx import TensorProto, helper

from .._io import atomic_directory, write_synced
from ..checkpoint import Checkpoint, LazyTensor
from ..errors import FormatError, UsageError

PathLike = Union[str, "os.PathLike[str]"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CONFIG_FILE = "genai_config.json"
ARCHITECTURES = ("llama", "qwen2", "qwen3")
PRECISIONS = {"f32": (np.float32, TensorProto.FLOAT), "f16": (np.float16, TensorProto.FLOAT16)}
# tensors smaller than this are stored in the .onnx file itself
INLINE_BYTES = 1024
# as onnx's own external-data writer: tensors of 1 MiB or more start on a page boundary (mmap-friendly)
ALIGN_THRESHOLD = 1 << 20
ALIGNMENT = 4096
OPSET = 21
IR_VERSION = 10  # opset 21's IR; older runtimes reject newer IR versions
MS_DOMAIN = "com.microsoft"


class _Graph:
    """Nodes, inline and external initializers; external bytes stream into ``data``."""

    def __init__(self, data: BinaryIO, data_name: str):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data, self.data_name, self.offset = data, data_name, 0

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, domain: str = "",
             outputs: Sequence[str] | None = None, **attrs: Any) -> list[str]:
        outs = list(outputs) if outputs is not None else [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs

    def const(self, name: str, values: Any, dtype: Any = np.int64) -> str:
        """A small constant (shapes, axes, scalars) as a Constant node."""
        array = np.asarray(values, dtype=dtype)
        out = f"{name}/output_0"
        self.nodes.append(helper.make_node("Constant", [], [out], name=name,
                                           value=onnx.numpy_helper.from_array(array, name=f"{name}/value")))
        return out

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer: inline when tiny, else appended to the data file and referenced."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            self.initializers.append(onnx.numpy_helper.from_array(array, name=name))
            return name
        if array.nbytes >= ALIGN_THRESHOLD and self.offset % ALIGNMENT:
            pad = ALIGNMENT - self.offset % ALIGNMENT
            self.data.write(b"\0" * pad)
            self.offset += pad
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.data.write(memoryview(array.reshape(-1).view(np.uint8)))
        self.offset += array.nbytes
        self.initializers.append(tensor)
        return name


class _Spec:
    """The model's dimensions and options, read from GGUF-style metadata."""

    def __init__(self, ckpt: Checkpoint):
        arch = ckpt.architecture
        if arch not in ARCHITECTURES:
            raise FormatError(f"ONNX export supports the {', '.join(ARCHITECTURES)} architectures, not {arch!r}")
        g = lambda key, default=None: ckpt.get(f"{arch}.{key}", default)
        missing = [f"{arch}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                           "attention.head_count") if g(k) is None]
        if missing:
            raise FormatError(f"ONNX export: the checkpoint lacks metadata {', '.join(missing)}")
        if g("expert_count"):
            raise FormatError("ONNX export: mixture-of-experts models are not supported yet")
        self.arch = arch
        self.n_layer = int(g("block_count"))
        self.hidden = int(g("embedding_length"))
        self.n_ff = int(g("feed_forward_length"))
        self.n_head = int(g("attention.head_count"))
        self.n_head_kv = int(g("attention.head_count_kv", self.n_head))
        self.head_dim = int(g("attention.key_length", self.hidden // self.n_head))
        if int(g("attention.value_length", self.head_dim)) != self.head_dim:
            raise FormatError("ONNX export: GroupQueryAttention needs equal key and value head sizes")
        self.eps = float(g("attention.layer_norm_rms_epsilon", 1e-6))
        self.context = int(g("context_length", 2048))
        self.rope_base = float(g("rope.freq_base", 10000.0))
        self.rope_dim = int(g("rope.dimension_count", self.head_dim))
        self.rope_scaling = g("rope.scaling.type")
        self.rope_factor = float(g("rope.scaling.factor", 1.0) or 1.0)
        if self.rope_scaling not in (None, "none", "linear"):
            raise FormatError(f"ONNX export: rope scaling {self.rope_scaling!r} is not supported yet")
        # llama's q/k rows are GGUF-permuted (pairs adjacent); qwen2/qwen3 use the NEOX (half-split) layout
        self.interleaved = 1 if arch == "llama" else 0
        names = {t.name for t in ckpt.tensors}
        self.vocab = next(t.shape[0] for t in ckpt.tensors if t.name == "token_embd.weight")
        self.tied = "output.weight" not in names
        self.bos = ckpt.get("tokenizer.ggml.bos_token_id")
        self.eos = ckpt.get("tokenizer.ggml.eos_token_id")
        self.pad = ckpt.get("tokenizer.ggml.padding_token_id", self.eos)


def _rotary_caches(spec: _Spec, factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [context_length, rotary_dim/2] of position × inverse frequency (float64, then cast)."""
    dim = spec.rope_dim
    inv_freq = 1.0 / spec.rope_base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factors is not None:  # Llama 3.1+ rope_freqs: llama.cpp divides each frequency by its factor
        inv_freq = inv_freq / factors.astype(np.float64)
    positions = np.arange(spec.context, dtype=np.float64)
    if spec.rope_scaling == "linear":
        positions = positions / spec.rope_factor
    angles = np.outer(positions, inv_freq)
    return np.cos(angles), np.sin(angles)


def _build(g: _Graph, spec: _Spec, tensors: dict[str, LazyTensor], np_dtype: Any, on_tensor: Callable[[LazyTensor], None] | None) -> None:
    def load(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise FormatError(f"ONNX export: the checkpoint lacks tensor {name}")
        values = t.float32()
        if on_tensor is not None:
            on_tensor(t)
        return values

    def linear(x: str, gguf: str, onnx_name: str, scope: str) -> str:
        w = g.weight(f"{onnx_name}.MatMul.weight", load(f"{gguf}.weight").T.astype(np_dtype))
        (y,) = g.node("MatMul", [x, w], f"{scope}/MatMul")
        if f"{gguf}.bias" in tensors:
            b = g.weight(f"{onnx_name}.Add.bias", load(f"{gguf}.bias").astype(np_dtype))
            (y,) = g.node("Add", [y, b], f"{scope}/Add")
        return y

    def norm_weight(gguf: str, onnx_name: str) -> str:
        return g.weight(onnx_name, load(gguf).astype(np_dtype))

    # the attention-mask subgraph GQA wants: seqlens_k = sum(mask, 1) - 1 and total = mask width, int32
    scope = "/model/attn_mask_reformat/attn_mask_subgraph"
    (mask_sum,) = g.node("ReduceSum", ["attention_mask", g.const(f"{scope}/ReduceSum/Constant", [1])],
                         f"{scope}/ReduceSum", keepdims=0)
    (seqlens,) = g.node("Sub", [mask_sum, g.const(f"{scope}/Sub/Constant", 1)], f"{scope}/Sub")
    (seqlens_k,) = g.node("Cast", [seqlens], f"{scope}/Sub/Cast", to=TensorProto.INT32)
    (mask_shape,) = g.node("Shape", ["attention_mask"], f"{scope}/Shape")
    (width,) = g.node("Gather", [mask_shape, g.const(f"{scope}/Gather/Constant", 1)], f"{scope}/Gather", axis=0)
    (total_len,) = g.node("Cast", [width], f"{scope}/Gather/Cast", to=TensorProto.INT32)

    embed = g.weight("model.embed_tokens.weight", load("token_embd.weight").astype(np_dtype))
    (hidden,) = g.node("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")

    factors = load("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    cos, sin = _rotary_caches(spec, factors)
    cos_cache = g.weight("cos_cache", cos.astype(np_dtype))
    sin_cache = g.weight("sin_cache", sin.astype(np_dtype))

    residual: str | None = None
    mlp_out: str | None = None

    def skip_norm(weight: str, scope_name: str) -> tuple[str, str]:
        """(normed, new residual) of mlp_out + residual through SkipSimplifiedLayerNormalization."""
        out = g.node("SkipSimplifiedLayerNormalization", [mlp_out, residual, weight], scope_name,
                     domain=MS_DOMAIN, epsilon=spec.eps,
                     outputs=[f"{scope_name}/output_0", "", "", f"{scope_name}/output_3"])
        return out[0], out[3]

    for i in range(spec.n_layer):
        blk, layer = f"blk.{i}", f"model.layers.{i}"
        scope = f"/model/layers.{i}"
        w = norm_weight(f"{blk}.attn_norm.weight", f"{layer}.input_layernorm.weight")
        if i == 0:
            (x,) = g.node("SimplifiedLayerNormalization", [hidden, w], f"{scope}/input_layernorm/LayerNorm",
                          axis=-1, epsilon=spec.eps, stash_type=1)
            residual = hidden
        else:
            x, residual = skip_norm(w, f"{scope}/input_layernorm/SkipLayerNorm")

        q = linear(x, f"{blk}.attn_q", f"{layer}.attn.q_proj", f"{scope}/attn/q_proj")
        k = linear(x, f"{blk}.attn_k", f"{layer}.attn.k_proj", f"{scope}/attn/k_proj")
        v = linear(x, f"{blk}.attn_v", f"{layer}.attn.v_proj", f"{scope}/attn/v_proj")
        if f"{blk}.attn_q_norm.weight" in tensors:  # qwen3: RMS norm of each head before rotary
            per_head = g.const(f"{scope}/attn/per_head_shape", [0, 0, -1, spec.head_dim])
            flat = g.const(f"{scope}/attn/flat_shape", [0, 0, -1])
            for proj, name in (("q", "q_norm"), ("k", "k_norm")):
                nw = norm_weight(f"{blk}.attn_{name}.weight", f"{layer}.attn.{name}.layernorm.weight")
                s = f"{scope}/attn/{name}"
                src = q if proj == "q" else k
                (r,) = g.node("Reshape", [src, per_head], f"{s}/Reshape_to_heads")
                (n,) = g.node("SimplifiedLayerNormalization", [r, nw], f"{s}/SimplifiedLayerNormalization",
                              axis=-1, epsilon=spec.eps, stash_type=1)
                (out,) = g.node("Reshape", [n, flat], f"{s}/Reshape_to_hidden")
                if proj == "q":
                    q = out
                else:
                    k = out
        gqa = f"{scope}/attn/GroupQueryAttention"
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len, cos_cache, sin_cache],
            gqa, domain=MS_DOMAIN, num_heads=spec.n_head, kv_num_heads=spec.n_head_kv,
            do_rotary=1, rotary_interleaved=spec.interleaved, scale=1.0 / math.sqrt(spec.head_dim),
            outputs=[f"{gqa}/output_0", f"present.{i}.key", f"present.{i}.value"],
        )
        mlp_out = linear(attn, f"{blk}.attn_output", f"{layer}.attn.o_proj", f"{scope}/attn/o_proj")

        w = norm_weight(f"{blk}.ffn_norm.weight", f"{layer}.post_attention_layernorm.weight")
        x, residual = skip_norm(w, f"{scope}/post_attention_layernorm/SkipLayerNorm")
        gate = linear(x, f"{blk}.ffn_gate", f"{layer}.mlp.gate_proj", f"{scope}/mlp/gate_proj")
        up = linear(x, f"{blk}.ffn_up", f"{layer}.mlp.up_proj", f"{scope}/mlp/up_proj")
        (sig,) = g.node("Sigmoid", [gate], f"{scope}/mlp/act_fn/Sigmoid")
        (act,) = g.node("Mul", [gate, sig], f"{scope}/mlp/act_fn/Mul")
        (prod,) = g.node("Mul", [act, up], f"{scope}/mlp/Mul")
        mlp_out = linear(prod, f"{blk}.ffn_down", f"{layer}.mlp.down_proj", f"{scope}/mlp/down_proj")

    w = norm_weight("output_norm.weight", f"model.layers.{spec.n_layer}.final_norm_layernorm.weight")
    x, _ = skip_norm(w, f"/model/layers.{spec.n_layer}/final_norm_layernorm/SkipLayerNorm")
    head = "token_embd.weight" if spec.tied else "output.weight"
    lm = g.weight("lm_head.MatMul.weight", load(head).T.astype(np_dtype))
    g.node("MatMul", [x, lm], "/lm_head/MatMul", outputs=["logits"])


def _genai_config(spec: _Spec) -> dict[str, Any]:
    eos = spec.eos if spec.eos is not None else 0
    model: dict[str, Any] = {
        "bos_token_id": spec.bos if spec.bos is not None else eos,
        "context_length": spec.context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": MODEL_FILE,
            "head_size": spec.head_dim,
            "hidden_size": spec.hidden,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
            "num_attention_heads": spec.n_head,
            "num_hidden_layers": spec.n_layer,
            "num_key_value_heads": spec.n_head_kv,
        },
        "eos_token_id": eos,
        "pad_token_id": spec.pad if spec.pad is not None else eos,
        "type": spec.arch,
        "vocab_size": spec.vocab,
    }
    search = {
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
        "max_length": spec.context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_k": 1, "top_p": 1.0,
    }
    return {"model": model, "search": search}


def _io(spec: _Spec, elem: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    kv = lambda name, seq: helper.make_tensor_value_info(name, elem, ["batch_size", spec.n_head_kv, seq, spec.head_dim])
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch_size", "sequence_length", spec.vocab])]
    for i in range(spec.n_layer):
        inputs += [kv(f"past_key_values.{i}.key", "past_sequence_length"), kv(f"past_key_values.{i}.value", "past_sequence_length")]
        outputs += [kv(f"present.{i}.key", "total_sequence_length"), kv(f"present.{i}.value", "total_sequence_length")]
    return inputs, outputs


def write(
    directory: PathLike,
    checkpoint: Checkpoint,
    precision: str = "f32",
    on_tensor: Callable[[LazyTensor], None] | None = None,
) -> list[Path]:
    """Write ``checkpoint`` (GGUF-named, architecture llama/qwen2/qwen3) as an onnxruntime-genai
    model directory: ``model.onnx``, ``model.onnx.data``, ``genai_config.json`` (returned in that order).

    ``precision`` is ``"f32"`` or ``"f16"``: the type of the weights, activations, KV cache and logits.
    Stored tensors of any type are read as float32 (quantized ones dequantized) and cast. ``on_tensor``
    is called after each checkpoint tensor is read (progress).

    Nothing partial appears at ``directory``: the files are built in a hidden sibling
    (``.NAME.*.partial``) renamed onto ``directory`` when complete, removed on any error.
    ``directory`` must not exist or be empty (else :class:`UsageError`); parents are created.
    Raises :class:`FormatError` for an unsupported architecture, rope scaling or missing tensor.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"ONNX precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    np_dtype, elem = PRECISIONS[precision]
    spec = _Spec(checkpoint)
    tensors = {t.name: t for t in checkpoint.tensors}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        with open(tmp / DATA_FILE, "wb") as data:
            g = _Graph(data, DATA_FILE)
            _build(g, spec, tensors, np_dtype, on_tensor)
            data.flush()
            os.fsync(data.fileno())
        inputs, outputs = _io(spec, elem)
        graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            ir_version=IR_VERSION, producer_name="slmpkg",
        )
        write_synced(tmp / MODEL_FILE, model.SerializeToString())
        config = json.dumps(_genai_config(spec), indent=4) + "\n"
        write_synced(tmp / CONFIG_FILE, config.encode("utf-8"))
        for name, content in checkpoint.sidecar.items():  # tokenizer files onnxruntime-genai reads
            if "/" in name or name.startswith(".") or name in (MODEL_FILE, DATA_FILE, CONFIG_FILE):
                raise FormatError(f"sidecar file {name!r}: not a plain file name for the model directory")
            write_synced(tmp / name, content)
    return [directory / MODEL_FILE, directory / DATA_FILE, directory / CONFIG_FILE] + [
        directory / name for name in checkpoint.sidecar
    ]
