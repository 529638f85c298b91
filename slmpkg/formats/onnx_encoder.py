"""ONNX: a streaming writer of BERT encoder graphs, laid out as optimum exports them and onnxruntime's
transformers optimizer fuses them.

The graph is built from the canonical (GGUF-named, architecture ``bert``) checkpoint with the ``onnx``
package, no torch export:

* inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` [batch_size, sequence_length] int64;
  output ``last_hidden_state`` [batch_size, sequence_length, hidden];
* ``com.microsoft.EmbedLayerNormalization``: word + position (0..S-1) + token-type embeddings, then
  LayerNorm (it takes int32 ids, so the inputs are ``Cast`` first);
* per layer ``com.microsoft.Attention`` over the packed q/k/v weights [hidden, 3·hidden] with the raw
  2-D attention mask (int32, so any padding side works; masked scores get the op's mask_filter_value,
  −10000, whose softmax weight is 0 as with HF's dtype minimum);
  the output projection is a ``MatMul`` whose bias, residual add and post-LayerNorm are one
  ``com.microsoft.SkipLayerNormalization``; the FFN is ``MatMul`` → ``com.microsoft.BiasGelu`` (the
  erf GELU that BERT's ``hidden_act="gelu"`` is) → ``MatMul`` → ``SkipLayerNormalization``.

Each of these contrib ops has a CPU kernel for float32 and float16 in onnxruntime 1.32, so ``f16``
uses the same graph with float16 weights, activations and output.

Weights go to one external data file (``model.onnx.data``) through :class:`slmpkg.formats.onnx_graph.Graph`,
tensor by tensor (q, k and v of one layer are held together to pack them).

Example:
    >>> from slmpkg.formats import onnx_encoder
    >>> onnx_encoder.write_encoder("out/minilm-onnx", checkpoint)      # doctest: +SKIP
    [PosixPath('out/minilm-onnx/model.onnx'), PosixPath('out/minilm-onnx/model.onnx.data'), ...]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Union

import numpy as np
from onnx import TensorProto, helper

from .._io import atomic_directory, write_synced
from ..checkpoint import Checkpoint, LazyTensor
from ..errors import FormatError, UsageError
from .onnx_graph import DATA_FILE, IR_VERSION, MODEL_FILE, MS_DOMAIN, OPSET, PRECISIONS, Graph

__all__ = ["ARCHITECTURE", "OUTPUT", "INPUTS", "write_encoder"]

PathLike = Union[str, "os.PathLike[str]"]

ARCHITECTURE = "bert"
OUTPUT = "last_hidden_state"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Spec:
    """The encoder's dimensions, read from GGUF-style ``bert.*`` metadata."""

    def __init__(self, ckpt: Checkpoint, tensors: dict[str, LazyTensor]):
        if ckpt.architecture != ARCHITECTURE:
            raise FormatError(f"ONNX encoder export supports the {ARCHITECTURE} architecture, not {ckpt.architecture!r}")
        g = lambda key, default=None: ckpt.get(f"{ARCHITECTURE}.{key}", default)
        missing = [f"{ARCHITECTURE}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                                   "attention.head_count") if g(k) is None]
        if missing:
            raise FormatError(f"ONNX encoder export: the checkpoint lacks metadata {', '.join(missing)}")
        self.n_layer = int(g("block_count"))
        self.hidden = int(g("embedding_length"))
        self.n_ff = int(g("feed_forward_length"))
        self.n_head = int(g("attention.head_count"))
        if self.hidden % self.n_head:
            raise FormatError(f"ONNX encoder export: hidden size {self.hidden} is not a multiple of "
                              f"{self.n_head} heads")
        # BERT's default (1e-12); the same epsilon for every LayerNorm, as in HF's BertModel
        self.eps = float(g("attention.layer_norm_epsilon", 1e-12))
        # a BERT without token-type embeddings has no token_type_ids input
        self.token_types = "token_types.weight" in tensors


def _build(g: Graph, spec: _Spec, tensors: dict[str, LazyTensor], np_dtype: Any,
           on_tensor: Callable[[LazyTensor], None] | None) -> None:
    def load(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise FormatError(f"ONNX encoder export: the checkpoint lacks tensor {name}")
        if shape is not None and (len(t.shape) != len(shape)
                                  or any(want not in (-1, got) for want, got in zip(shape, t.shape))):
            want = "×".join("any" if d < 0 else str(d) for d in shape)
            raise FormatError(f"ONNX encoder export: tensor {name} has shape {list(t.shape)}, expected {want}")
        values = t.float32()
        if on_tensor is not None:
            on_tensor(t)
        return values

    h, ff = spec.hidden, spec.n_ff
    vec = lambda name, n=h: load(name, (n,)).astype(np_dtype)
    table = lambda name: load(name, (-1, h)).astype(np_dtype)  # embedding rows of width hidden

    # the contrib ops take int32 ids and masks; the graph's inputs stay int64 as optimum exports them
    (ids,) = g.node("Cast", ["input_ids"], "/embeddings/input_ids/Cast", to=TensorProto.INT32)
    (mask,) = g.node("Cast", ["attention_mask"], "/embeddings/attention_mask/Cast", to=TensorProto.INT32)
    word = g.weight("embeddings.word_embeddings.weight", table("token_embd.weight"))
    position = g.weight("embeddings.position_embeddings.weight", table("position_embd.weight"))
    if spec.token_types:
        (segments,) = g.node("Cast", ["token_type_ids"], "/embeddings/token_type_ids/Cast", to=TensorProto.INT32)
        types = g.weight("embeddings.token_type_embeddings.weight", table("token_types.weight"))
    else:
        segments = types = ""
    gamma = g.weight("embeddings.LayerNorm.weight", vec("token_embd_norm.weight"))
    beta = g.weight("embeddings.LayerNorm.bias", vec("token_embd_norm.bias"))
    # mask_index (its second output) is only the count of ones per row, which assumes right padding;
    # Attention gets the raw mask instead, so the mask input is left out here
    x = g.node("EmbedLayerNormalization", [ids, segments, word, position, types, gamma, beta],
               "/embeddings/EmbedLayerNormalization", n_out=2, domain=MS_DOMAIN, epsilon=spec.eps)[0]

    for i in range(spec.n_layer):
        blk, layer, scope = f"blk.{i}", f"encoder.layer.{i}", f"/encoder/layer.{i}"
        last = i == spec.n_layer - 1
        # Attention's packed projection: [hidden, q | k | v] and one bias [q | k | v]
        qkv_w = np.concatenate([load(f"{blk}.attn_{p}.weight", (h, h)).T for p in "qkv"], axis=1)
        qkv_b = np.concatenate([vec(f"{blk}.attn_{p}.bias") for p in "qkv"])
        w = g.weight(f"{layer}.attention.self.qkv.weight", qkv_w.astype(np_dtype))
        del qkv_w
        b = g.weight(f"{layer}.attention.self.qkv.bias", qkv_b)
        (ctx,) = g.node("Attention", [x, w, b, mask], f"{scope}/attention/self/Attention",
                        domain=MS_DOMAIN, num_heads=spec.n_head)
        wo = g.weight(f"{layer}.attention.output.dense.weight", load(f"{blk}.attn_output.weight", (h, h)).T.astype(np_dtype))
        (proj,) = g.node("MatMul", [ctx, wo], f"{scope}/attention/output/dense/MatMul")
        x = _skip_norm(g, proj, x, spec, f"{scope}/attention/output/LayerNorm/SkipLayerNorm", [
            g.weight(f"{layer}.attention.output.LayerNorm.weight", vec(f"{blk}.attn_output_norm.weight")),
            g.weight(f"{layer}.attention.output.LayerNorm.bias", vec(f"{blk}.attn_output_norm.bias")),
            g.weight(f"{layer}.attention.output.dense.bias", vec(f"{blk}.attn_output.bias")),
        ])

        wu = g.weight(f"{layer}.intermediate.dense.weight", load(f"{blk}.ffn_up.weight", (ff, h)).T.astype(np_dtype))
        (up,) = g.node("MatMul", [x, wu], f"{scope}/intermediate/dense/MatMul")
        bu = g.weight(f"{layer}.intermediate.dense.bias", vec(f"{blk}.ffn_up.bias", ff))
        (act,) = g.node("BiasGelu", [up, bu], f"{scope}/intermediate/BiasGelu", domain=MS_DOMAIN)
        wd = g.weight(f"{layer}.output.dense.weight", load(f"{blk}.ffn_down.weight", (h, ff)).T.astype(np_dtype))
        (down,) = g.node("MatMul", [act, wd], f"{scope}/output/dense/MatMul")
        x = _skip_norm(g, down, x, spec, f"{scope}/output/LayerNorm/SkipLayerNorm", [
            g.weight(f"{layer}.output.LayerNorm.weight", vec(f"{blk}.layer_output_norm.weight")),
            g.weight(f"{layer}.output.LayerNorm.bias", vec(f"{blk}.layer_output_norm.bias")),
            g.weight(f"{layer}.output.dense.bias", vec(f"{blk}.ffn_down.bias")),
        ], output=OUTPUT if last else None)
    if spec.n_layer == 0:  # degenerate, but then the embeddings are the hidden states
        g.node("Identity", [x], "/encoder/Identity", outputs=[OUTPUT])


def _skip_norm(g: Graph, x: str, skip: str, spec: _Spec, name: str, params: list[str],
               output: str | None = None) -> str:
    """LayerNorm(x + bias + skip) as one SkipLayerNormalization; ``params`` = [gamma, beta, bias]."""
    outs = [output or f"{name}/output_0"]
    g.node("SkipLayerNormalization", [x, skip, *params], name, domain=MS_DOMAIN, epsilon=spec.eps, outputs=outs)
    return outs[0]


def _sidecar_path(name: str) -> PurePosixPath:
    """A sidecar file name as a relative path inside the model directory (a pooling config may sit in
    a subdirectory, as sentence-transformers lays it out); anything that could leave it is refused."""
    path = PurePosixPath(name)
    if (not name or path.is_absolute() or "\\" in name
            or any(part in ("", ".", "..") or part.startswith(".") for part in path.parts)
            or str(path) in (MODEL_FILE, DATA_FILE)):
        raise FormatError(f"sidecar file {name!r}: not a relative file name inside the model directory")
    return path


def write_encoder(
    directory: PathLike,
    checkpoint: Checkpoint,
    precision: str = "f32",
    on_tensor: Callable[[LazyTensor], None] | None = None,
) -> list[Path]:
    """Write ``checkpoint`` (GGUF-named, architecture ``bert``) as an ONNX encoder directory:
    ``model.onnx``, ``model.onnx.data``, then the checkpoint's sidecar files (returned in that order).

    The graph takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` ([batch, seq] int64; no
    ``token_type_ids`` when the checkpoint has no token-type embeddings) and returns
    ``last_hidden_state`` [batch, seq, hidden]. ``precision`` is ``"f32"`` or ``"f16"``: the type of the
    weights, activations and output. Stored tensors of any type are read as float32 (quantized ones
    dequantized) and cast. ``on_tensor`` is called after each checkpoint tensor is read (progress).

    Nothing partial appears at ``directory`` (built in a hidden sibling, renamed when complete);
    ``directory`` must not exist or be empty (else :class:`UsageError`).
    Raises :class:`FormatError` for another architecture, missing metadata or a missing/misshapen tensor.

    Example:
        >>> files = write_encoder("out/minilm-onnx", checkpoint, precision="f16")   # doctest: +SKIP
        >>> [f.name for f in files][:2]                                             # doctest: +SKIP
        ['model.onnx', 'model.onnx.data']
    """
    if precision not in PRECISIONS:
        raise UsageError(f"ONNX precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    np_dtype, elem = PRECISIONS[precision]
    tensors = {t.name: t for t in checkpoint.tensors}
    spec = _Spec(checkpoint, tensors)
    sidecar = [(name, _sidecar_path(name)) for name in checkpoint.sidecar]
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        with open(tmp / DATA_FILE, "wb") as data:
            g = Graph(data, DATA_FILE)
            _build(g, spec, tensors, np_dtype, on_tensor)
            data.flush()
            os.fsync(data.fileno())
        dims = ["batch_size", "sequence_length"]
        names = INPUTS if spec.token_types else INPUTS[:2]
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in names]
        outputs = [helper.make_tensor_value_info(OUTPUT, elem, [*dims, spec.hidden])]
        graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            ir_version=IR_VERSION, producer_name="slmpkg",
        )
        write_synced(tmp / MODEL_FILE, model.SerializeToString())
        for name, rel in sidecar:  # tokenizer (and pooling) files an embedding runtime reads
            write_synced(tmp.joinpath(*rel.parts), checkpoint.sidecar[name])
    return [directory / MODEL_FILE, directory / DATA_FILE] + [directory.joinpath(*rel.parts) for _, rel in sidecar]
