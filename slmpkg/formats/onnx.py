"""ONNX: a streaming writer of decoder graphs in onnxruntime-genai's layout.

The graph is built from the canonical (GGUF-named) checkpoint with the ``onnx`` package, no torch
export, as onnxruntime-genai's model builder lays it out:

* inputs ``input_ids`` [B,S] int64, ``attention_mask`` [B,T] int64, ``past_key_values.{i}.key|value``
  [B, kv_heads, past, head_dim]; outputs ``logits`` [B,S,vocab] and ``present.{i}.key|value``;
* ``Gather`` embedding, ``SimplifiedLayerNormalization`` before the first layer, then
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (residual add + RMS norm) everywhere after; a
  GGUF whose architecture reads ``attention.layer_norm_epsilon`` (LayerNorm: mean and variance) gets
  ``LayerNormalization`` and ``com.microsoft.SkipLayerNormalization`` instead, each with its bias;
* ``com.microsoft.GroupQueryAttention`` with ``do_rotary=1`` and cos/sin caches
  [context_length, rotary_dim/2]; ``seqlens_k`` (attention_mask row sums − 1, int32) and
  ``total_sequence_length`` (attention_mask's width, int32) are computed in the graph, as the builder
  does. Rows GGUF-permuted for llama.cpp's ``llama`` graph (llama, mistral, mixtral, granite: each
  head's rotary pairs adjacent) are GQA's ``rotary_interleaved=1``; the other families keep HF's
  half-split layout (``rotary_interleaved=0``);
* linears are float ``MatMul`` with weights transposed to [in, out] (biases are ``Add``), all made
  by one function (``_Builder.linear``); the gated MLP is ``down(act(gate(x)) * up(x))``, a layer
  without ``ffn_gate`` (and an ``ffn_up`` of the feed-forward width) has a plain one
  ``fc2(act(fc1(x)))``; a layer without ``ffn_norm`` runs its MLP in parallel with attention from the
  same norm, both outputs joining the residual stream in one ``Add``;
* head counts and feed-forward widths may differ per layer (llama.cpp's arrays): each
  GroupQueryAttention and each layer's KV inputs/outputs have their own.

What each family adds, read from GGUF metadata and tensor names (the table ``FAMILIES`` holds only
what the checkpoint does not say):

* **llama** (Llama 2/3, Mistral): Llama 3 ``rope_freqs`` divide the frequencies;
  ``{arch}.attention.sliding_window`` becomes GQA ``local_window_size`` (Mistral; ``from_hf`` does
  not record Mistral's window yet, so such a model attends to the whole context, as llama.cpp does).
* **mixtral** (``llama`` with ``expert_count``): ``com.microsoft.MoE`` (top-k softmax routing,
  renormalized; SwiGLU experts with gate/up rows interleaved, the only layout onnxruntime's CPU
  kernel takes). The CPU kernel is float32; at f16 onnxruntime casts around it by itself.
* **qwen2** (q/k/v biases), **qwen3** (per-head q/k RMS norms: ``SimplifiedLayerNormalization``
  over head_dim before GQA).
* **phi3**: the fused ``attn_qkv`` feeds GQA as packed QKV; the fused ``ffn_up`` (gate rows, then
  up rows) is one MatMul and a ``Split``; partial rotary is a cos/sin cache narrower than the head;
  the window applies to every layer; LongRoPE (``rope_factors_short|long``) gets two cache pairs,
  the short one [original_context, rotary/2] and the long one [context, rotary/2], both scaled by
  ``rope.scaling.attn_factor``, chosen by an ``If`` on the attention mask's width (total length >
  original context → long), as transformers chooses by sequence length.
* **gemma** (1/2/3): embeddings × sqrt(hidden); MLP activation ``Gelu(approximate="tanh")``; norm
  weights used as stored (the GGUF already holds HF's ``1 + weight``). Gemma 2/3: RMS norms after
  attention and after the MLP (``post_attention_norm``, ``post_ffw_norm``), sliding-window layers per
  ``attention.sliding_window_pattern`` (flags, a period, or llama.cpp's default period 2 / 6),
  queries scaled by ``query_pre_attn_scalar`` as llama.cpp fixes it (head size; hidden/heads for
  the 46/62-layer models). Gemma 2: GQA ``softcap`` and final logit soft-capping
  (``tanh(x / cap) * cap``). Gemma 3: per-head q/k norms, sliding layers rotate with their own base
  (``rope.freq_base_swa``, llama.cpp's 10000 when absent, unscaled) from a second cache pair.
* **granite**: embeddings × ``embedding_scale``, each residual branch × ``residual_scale``, GQA
  ``scale`` = ``attention.scale``, logits ÷ ``logit_scale``.
* **phi2** (Phi-1/1.5/2): LayerNorms, one per layer feeding attention and the plain GELU MLP in
  parallel; biased projections and head; partial rotary (HF's half-split layout).
* **starcoder2**: LayerNorms, biased projections, a plain GELU MLP; the window (if the GGUF records
  one) on every layer. onnxruntime-genai has no StarCoder2 type: ``genai_config.json`` says
  ``decoder``.
* **openelm**: per-layer head counts and MLP widths; the fused ``attn_qkv`` is split (``Split``) for
  the per-head q/k RMS norms, then GQA gets q, k and v apart; the embedding is the head.
  ``genai_config.json`` says ``decoder`` with the largest KV head count (onnxruntime-genai 0.18.0
  sizes each layer's cache from the graph's inputs: it generates what the reference does).
* **bert**: delegated to :mod:`slmpkg.formats.onnx_encoder` (``last_hidden_state``).

Weights go to one external data file, ``model.onnx.data``, written tensor by tensor as the graph is
built (one tensor in memory at a time; an MoE layer's gate and up experts are both held while their
interleaved fusion is written expert by expert); the graph references them by location/offset/length.
Tensors under 1024 bytes are stored inline and shape/axes values are ``Constant`` nodes (external tiny
tensors break ReduceSum's shape inference).
``genai_config.json`` is written beside. The model's Hugging Face config.json
(:func:`slmpkg.architectures.hf_config`) is stored as the model property ``slmpkg.config.json``: it
says what the graph cannot say exactly (Llama 3's and LongRoPE's rope parameters, the original
context), so :mod:`slmpkg.formats.onnx_import` reads the model back without a config.json beside it.

Example:
    >>> from slmpkg.formats import onnx as onnx_format
    >>> onnx_format.write("out/tiny-onnx", checkpoint)      # doctest: +SKIP
    [PosixPath('out/tiny-onnx/model.onnx'), PosixPath('out/tiny-onnx/model.onnx.data'), ...]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper

from .._io import atomic_directory, write_synced
from .. import architectures
from ..checkpoint import Checkpoint, LazyTensor
from ..errors import FormatError, UsageError
from .onnx_graph import (  # noqa: F401  (the layout constants are this module's public names too)
    ALIGN_THRESHOLD, ALIGNMENT, CONFIG_PROPERTY, DATA_FILE, INLINE_BYTES, IR_VERSION, MODEL_FILE, MS_DOMAIN, OPSET,
    PRECISIONS, Graph,
)

__all__ = ["CONFIG_FILE", "LinearWeights", "FAMILIES", "ARCHITECTURES", "write",
           # the file layout, shared with the encoder writer (onnx_graph)
           "ALIGN_THRESHOLD", "ALIGNMENT", "INLINE_BYTES", "PRECISIONS"]

if TYPE_CHECKING:
    from .onnx_nbits import Carry, NBitsWeight

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_FILE = "genai_config.json"



@dataclass(frozen=True)
class LinearWeights:
    """How linear weights become operators (embeddings, norms and MoE experts stay float).

    * ``carry_quantized``: ggml-quantized weights keep their blocks as ``MatMulNBits`` inputs (exact or
      within one float32 ulp, see :mod:`slmpkg.formats.onnx_nbits`); types with no linear form (IQ)
      are re-quantized at ``bits`` (4 when unset). False: they are dequantized like float weights.
    * ``bits`` (4 or 8, or 2): float weights are quantized block-wise to ``MatMulNBits`` as
      onnxruntime's own quantizer does; None keeps them float ``MatMul``.
    * ``block_size`` (16…256, a power of two), ``symmetric`` (no zero points), ``accuracy_level``
      (MatMulNBits' compute type: 0 float activations; 4 int8 activations, faster on CPU, not exact),
      ``separate_min`` (Q4_1/Q4_K/Q2_K minimums as an exact min term instead of float zero points).

    Example:
        >>> LinearWeights(bits=4, block_size=64).bits
        4
    """

    carry_quantized: bool = False
    bits: Optional[int] = None
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    separate_min: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (None, 2, 4, 8):
            raise UsageError(f"MatMulNBits bits must be 2, 4 or 8, not {self.bits}")
        if not (16 <= self.block_size <= 256 and self.block_size & (self.block_size - 1) == 0):
            raise UsageError(f"block size must be a power of two from 16 to 256, not {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"accuracy level must be 0-4, not {self.accuracy_level}")


@dataclass(frozen=True)
class _Family:
    """What a GGUF architecture's graph does that its metadata and tensor names do not say.

    Everything else is read from the checkpoint: q/k norms, post-attention/post-MLP norms, biases,
    fused projections and experts from tensor names; multipliers, soft-capping, sliding windows and
    rope settings from metadata.
    """

    genai_type: str  # onnxruntime-genai's model type in genai_config.json
    interleaved: bool = False  # q/k rows GGUF-permuted (llama.cpp's llama graph): GQA rotary_interleaved=1
    activation: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh"
    embed_sqrt_hidden: bool = False  # Gemma multiplies embeddings by sqrt(hidden size)
    # with a window but no pattern in the GGUF: layer i slides unless (i + 1) % period == 0
    # (llama.cpp's defaults); None: every layer slides
    swa_period: Optional[int] = None
    # Gemma 2/3: llama.cpp scales queries by hidden/heads instead of the head size at this layer count
    wide_query_layers: int = 0
    swa_rope_base: Optional[float] = None  # sliding layers' rope base when the GGUF lacks rope.freq_base_swa


_GEMMA = dict(activation="gelu_tanh", embed_sqrt_hidden=True)
# onnxruntime-genai lists no StarCoder2 or OpenELM type; "decoder" is its generic decoder-only LLM
_GENERIC_GENAI_TYPE = "decoder"
FAMILIES: dict[str, _Family] = {
    "llama": _Family("llama", interleaved=True),
    "qwen2": _Family("qwen2"),
    "qwen3": _Family("qwen3"),
    "phi3": _Family("phi3"),
    "phi2": _Family("phi", activation="gelu_tanh"),  # GELU's tanh approximation: HF's gelu_new, llama.cpp's
    "starcoder2": _Family(_GENERIC_GENAI_TYPE, activation="gelu_tanh"),
    "openelm": _Family(_GENERIC_GENAI_TYPE),
    "gemma": _Family("gemma", **_GEMMA),
    "gemma2": _Family("gemma2", swa_period=2, wide_query_layers=46, **_GEMMA),
    "gemma3": _Family("gemma3_text", swa_period=6, wide_query_layers=62, swa_rope_base=10000.0, **_GEMMA),
    "granite": _Family("granite", interleaved=True),
}
ARCHITECTURES = tuple(FAMILIES) + ("bert",)


def _per_layer(value: Any, n_layer: int, key: str) -> list[int]:
    """A per-layer size: one value for every layer, or llama.cpp's array of one per layer (OpenELM)."""
    if np.ndim(value) == 0:
        return [int(value)] * n_layer
    values = [int(v) for v in value]
    if len(values) != n_layer:
        raise FormatError(f"ONNX export: {key} has {len(values)} entries for {n_layer} layers")
    return values


class _Spec:
    """The model's dimensions and options, read from GGUF-style metadata."""

    def __init__(self, ckpt: Checkpoint):
        arch = ckpt.architecture
        family = FAMILIES.get(arch)  # type: ignore[arg-type]
        if family is None:
            raise FormatError(f"ONNX export supports the {', '.join(ARCHITECTURES)} architectures, not {arch!r}")
        g = lambda key, default=None: ckpt.get(f"{arch}.{key}", default)  # noqa: E731
        missing = [f"{arch}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                           "attention.head_count") if g(k) is None]
        if missing:
            raise FormatError(f"ONNX export: the checkpoint lacks metadata {', '.join(missing)}")
        self.arch, self.family = arch, family
        self.n_layer = int(g("block_count"))
        self.hidden = int(g("embedding_length"))
        # per layer: OpenELM's grow with depth (llama.cpp's arrays); the others' are one value
        self.heads = _per_layer(g("attention.head_count"), self.n_layer, f"{arch}.attention.head_count")
        self.kv_heads = _per_layer(g("attention.head_count_kv", g("attention.head_count")), self.n_layer,
                                   f"{arch}.attention.head_count_kv")
        self.ffs = _per_layer(g("feed_forward_length"), self.n_layer, f"{arch}.feed_forward_length")
        self.n_head, self.n_head_kv = max(self.heads), max(self.kv_heads)
        self.head_dim = int(g("attention.key_length", self.hidden // self.n_head))
        if int(g("attention.value_length", self.head_dim)) != self.head_dim:
            raise FormatError("ONNX export: GroupQueryAttention needs equal key and value head sizes")
        # LayerNorm (mean and variance, with a bias: Phi-2, StarCoder2) where llama.cpp reads its epsilon,
        # else RMS norm
        self.layer_norm = g("attention.layer_norm_epsilon") is not None and g("attention.layer_norm_rms_epsilon") is None
        self.eps = float(g("attention.layer_norm_epsilon") if self.layer_norm else g("attention.layer_norm_rms_epsilon", 1e-6))
        self.context = int(g("context_length", 2048))
        self.n_expert = int(g("expert_count", 0) or 0)
        self.n_expert_used = int(g("expert_used_count", 0) or 0)
        if self.n_expert and not 0 < self.n_expert_used <= self.n_expert:
            raise FormatError(f"ONNX export: {arch}.expert_used_count must be 1..{self.n_expert}")

        # rope: one cache pair for global layers, maybe a second for sliding ones
        self.rope_base = float(g("rope.freq_base", 10000.0))
        self.rope_dim = int(g("rope.dimension_count", self.head_dim))
        self.rope_scaling = g("rope.scaling.type")
        self.rope_factor = float(g("rope.scaling.factor", 1.0) or 1.0)
        if self.rope_scaling not in (None, "none", "linear"):
            raise FormatError(f"ONNX export: rope scaling {self.rope_scaling!r} is not supported yet")
        if self.head_dim % 16 or self.rope_dim % 16 or not 0 < self.rope_dim <= self.head_dim:
            # onnxruntime 1.32's rotating GQA (measured): head size a multiple of 16, cos/sin caches
            # whose width (half the rotary width) is a multiple of 8 and at most half the head
            raise FormatError(f"ONNX export: head size {self.head_dim} with rotary width {self.rope_dim}: onnxruntime's "
                              "GroupQueryAttention rotates multiples of 16 within a head whose size is a multiple of 16")
        self.rope_attn_factor = float(g("rope.scaling.attn_factor", 1.0) or 1.0)
        self.original_context = int(g("rope.scaling.original_context_length", self.context) or self.context)
        swa_base = g("rope.freq_base_swa", family.swa_rope_base)
        self.rope_base_swa = None if swa_base is None else float(swa_base)

        # attention: scale, soft-capping, per-layer windows
        query_scalar = self.hidden // self.n_head if self.n_layer == family.wide_query_layers else self.head_dim
        # granite's attention.scale replaces 1/sqrt(head size); llama.cpp reads 0 as "not set"
        self.attn_scale = float(g("attention.scale", 0.0) or 1.0 / math.sqrt(query_scalar))
        self.attn_softcap = float(g("attn_logit_softcapping", 0.0) or 0.0)
        self.final_softcap = float(g("final_logit_softcapping", 0.0) or 0.0)
        self.windows = self._windows(g, family)

        # multipliers (granite), embedding scale (gemma)
        default_embed = math.sqrt(self.hidden) if family.embed_sqrt_hidden else 1.0
        self.embed_scale = float(g("embedding_scale", 0.0) or default_embed)
        self.residual_scale = float(g("residual_scale", 1.0) or 1.0)
        self.logit_scale = float(g("logit_scale", 1.0) or 1.0)

        self.interleaved = 1 if family.interleaved else 0
        self.genai_type = _GENERIC_GENAI_TYPE if self.n_expert else family.genai_type
        names = {t.name for t in ckpt.tensors}
        embd = next((t for t in ckpt.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise FormatError("ONNX export: the checkpoint lacks tensor token_embd.weight")
        self.vocab = embd.shape[0]
        self.tied = "output.weight" not in names
        self.bos = ckpt.get("tokenizer.ggml.bos_token_id")
        self.eos = ckpt.get("tokenizer.ggml.eos_token_id")
        self.pad = ckpt.get("tokenizer.ggml.padding_token_id", self.eos)

    def _windows(self, g: Callable[..., Any], family: _Family) -> list[int]:
        """GQA local_window_size per layer (-1: global attention)."""
        window = int(g("attention.sliding_window", 0) or 0)
        if window <= 0:
            return [-1] * self.n_layer
        pattern = g("attention.sliding_window_pattern")  # flags (a list, or an array from the GGUF reader) or a period
        if pattern is not None and np.ndim(pattern) == 1:
            if len(pattern) != self.n_layer:
                raise FormatError(f"ONNX export: {self.arch}.attention.sliding_window_pattern has {len(pattern)} "
                                  f"entries for {self.n_layer} layers")
            sliding = [bool(x) for x in pattern]
        else:
            period = int(pattern) if pattern is not None and int(pattern) > 0 else family.swa_period
            sliding = [period is None or (i + 1) % period != 0 for i in range(self.n_layer)]
        # transformers' sliding_window counts the query's own position, as GQA's local_window_size does
        return [window if s else -1 for s in sliding]


def _rotary_caches(length: int, dim: int, base: float, divisors: Optional[np.ndarray] = None,
                   magnitude: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [length, dim/2] (float32) of position × inverse frequency, as transformers computes
    them: the frequencies and each product in float32 (the cosine itself in float64, then rounded).

    ``divisors`` divide the frequencies (linear scaling's factor, Llama 3's ``rope_freqs``,
    LongRoPE's short/long factors); ``magnitude`` multiplies cos and sin (LongRoPE's attention factor).
    """
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)
    if divisors is not None:
        inv_freq = (inv_freq / divisors.astype(np.float32)).astype(np.float32)
    angles = np.outer(np.arange(length, dtype=np.float32), inv_freq).astype(np.float32).astype(np.float64)
    # the magnitude as a float32 (as torch applies a Python scalar to float32 values; and a GGUF stores it)
    scale = np.float32(magnitude)
    return np.cos(angles).astype(np.float32) * scale, np.sin(angles).astype(np.float32) * scale


class _Builder:
    """Lays one decoder out in a :class:`Graph`; each block of the model is one method."""

    def __init__(self, g: Graph, spec: _Spec, tensors: dict[str, LazyTensor], np_dtype: Any,
                 on_tensor: Optional[Callable[[LazyTensor], None]], linear_weights: "LinearWeights",
                 on_carry: "Optional[Callable[[Carry], None]]" = None):
        self.g, self.spec, self.tensors, self.dtype, self.on_tensor = g, spec, tensors, np_dtype, on_tensor
        self.linear_weights, self.on_carry = linear_weights, on_carry
        self.elem = helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))

    # ---- weights and small pieces ----

    def has(self, name: str) -> bool:
        return name in self.tensors

    def load(self, name: str) -> np.ndarray:
        t = self.tensors.get(name)
        if t is None:
            raise FormatError(f"ONNX export: the checkpoint lacks tensor {name}")
        values = t.float32()
        if self.on_tensor is not None:
            self.on_tensor(t)
        return values

    def linear(self, x: str, gguf: str, onnx_name: str, scope: str, output: Optional[str] = None,
               quantizable: bool = True) -> str:
        """``x @ W.T (+ b)`` for the GGUF weight ``{gguf}.weight``: the one place a weight matrix
        becomes an operator: ``MatMulNBits`` when :class:`LinearWeights` says so for this tensor,
        else a float ``MatMul`` (``quantizable=False`` keeps small routing matrices float)."""
        bias = f"{gguf}.bias" in self.tensors
        packed = self.pack(f"{gguf}.weight") if quantizable else None
        outputs = [output] if output is not None and not bias else None
        if packed is None:
            w = self.g.weight(f"{onnx_name}.MatMul.weight", self.load(f"{gguf}.weight").T.astype(self.dtype))
            (y,) = self.g.node("MatMul", [x, w], f"{scope}/MatMul", outputs=outputs)
        else:
            y = self.matmul_nbits(x, packed, onnx_name, scope, outputs)
        if bias:
            b = self.g.weight(f"{onnx_name}.Add.bias", self.load(f"{gguf}.bias").astype(self.dtype))
            (y,) = self.g.node("Add", [y, b], f"{scope}/Add", outputs=[output] if output is not None else None)
        return y

    def pack(self, name: str) -> "Optional[NBitsWeight]":
        """The MatMulNBits form of a stored weight, or None for a float MatMul (see LinearWeights)."""
        from .onnx_nbits import LINEAR_TYPES, REQUANTIZED, Carry, from_gguf, quantize_float

        t = self.tensors.get(name)
        if t is None:
            raise FormatError(f"ONNX export: the checkpoint lacks tensor {name}")
        opts = self.linear_weights
        carried = opts.carry_quantized and t.qtype.name not in ("F32", "F16", "BF16")
        if carried and t.qtype in LINEAR_TYPES:
            packed, carry = from_gguf(t, scale_dtype=self.dtype, separate_min=opts.separate_min)
        else:
            # IQ types have no linear form: re-quantized (the report says so) rather than inflated to float
            bits = opts.bits if opts.bits is not None or not carried else 4
            if bits is None:
                return None
            packed, error = quantize_float(t.float32(), bits, opts.block_size, opts.symmetric, self.dtype)
            carry = Carry(t.name, t.qtype.name, REQUANTIZED, error)
        if self.on_tensor is not None:
            self.on_tensor(t)
        if self.on_carry is not None:
            self.on_carry(carry)
        return packed

    def matmul_nbits(self, x: str, w: "NBitsWeight", onnx_name: str, scope: str, outputs: Optional[list[str]]) -> str:
        """``com.microsoft.MatMulNBits``, minus the separate min term where the weight has one."""
        g, prefix = self.g, f"{onnx_name}.MatMul.weight"
        inputs = [x, g.weight(f"{prefix}_Q{w.bits}", w.packed), g.weight(f"{prefix}_scales", w.scales.astype(self.dtype))]
        if w.zero_points is not None:
            zp = w.zero_points if w.zero_points.dtype == np.uint8 else w.zero_points.astype(self.dtype)
            inputs.append(g.weight(f"{prefix}_zero_points", zp))
        final = outputs if w.min_term is None else None
        (y,) = g.node("MatMulNBits", inputs, f"{scope}/MatMulNBits", domain=MS_DOMAIN, outputs=final,
                      **w.attributes(self.linear_weights.accuracy_level))
        if w.min_term is None:
            return y
        # y - sum over each block of x times the block's minimum: minimums MatMulNBits cannot hold
        blocks = g.const(f"{scope}/min_term/shape", [0, 0, w.k // w.min_block, w.min_block])
        (xb,) = g.node("Reshape", [x, blocks], f"{scope}/min_term/Reshape")
        (sums,) = g.node("ReduceSum", [xb, g.const(f"{scope}/min_term/axes", [-1])], f"{scope}/min_term/ReduceSum", keepdims=0)
        mins = g.weight(f"{prefix}_mins", w.min_term.astype(self.dtype))
        (offset,) = g.node("MatMul", [sums, mins], f"{scope}/min_term/MatMul")
        (y,) = g.node("Sub", [y, offset], f"{scope}/min_term/Sub", outputs=outputs)
        return y

    def scalar(self, name: str, value: float) -> str:
        return self.g.const(name, value, dtype=self.dtype)

    def norm_weights(self, stem: str, onnx_name: str) -> list[str]:
        """A norm's scale (and a LayerNorm's bias, when stored) as initializers named like the builder's."""
        inputs = [self.g.weight(f"{onnx_name}.weight", self.load(f"{stem}.weight").astype(self.dtype))]
        if self.spec.layer_norm and self.has(f"{stem}.bias"):
            inputs.append(self.g.weight(f"{onnx_name}.bias", self.load(f"{stem}.bias").astype(self.dtype)))
        return inputs

    def norm(self, x: str, stem: str, onnx_name: str, scope: str) -> str:
        """The norm of ``x`` with the stored weights ``{stem}.weight`` (and ``.bias``): LayerNormalization for
        the LayerNorm families, else RMS norm (Gemma's GGUF weights already hold HF's 1 + w)."""
        op = "LayerNormalization" if self.spec.layer_norm else "SimplifiedLayerNormalization"
        (y,) = self.g.node(op, [x, *self.norm_weights(stem, onnx_name)], scope, axis=-1, epsilon=self.spec.eps,
                           stash_type=1)
        return y

    def skip_norm(self, x: str, residual: str, stem: str, onnx_name: str, scope: str) -> tuple[str, str]:
        """(norm of x + residual, x + residual) in one com.microsoft Skip(Simplified)LayerNormalization."""
        op = "SkipLayerNormalization" if self.spec.layer_norm else "SkipSimplifiedLayerNormalization"
        out = self.g.node(op, [x, residual, *self.norm_weights(stem, onnx_name)], scope, domain=MS_DOMAIN,
                          epsilon=self.spec.eps, outputs=[f"{scope}/output_0", "", "", f"{scope}/output_3"])
        return out[0], out[3]

    # ---- shared subgraphs ----

    def mask_inputs(self) -> tuple[str, str, str]:
        """GQA's seqlens_k = sum(mask, 1) - 1 and total length = mask width (int32), and the width (int64)."""
        g, scope = self.g, "/model/attn_mask_reformat/attn_mask_subgraph"
        (mask_sum,) = g.node("ReduceSum", ["attention_mask", g.const(f"{scope}/ReduceSum/Constant", [1])],
                             f"{scope}/ReduceSum", keepdims=0)
        (seqlens,) = g.node("Sub", [mask_sum, g.const(f"{scope}/Sub/Constant", 1)], f"{scope}/Sub")
        (seqlens_k,) = g.node("Cast", [seqlens], f"{scope}/Sub/Cast", to=TensorProto.INT32)
        (mask_shape,) = g.node("Shape", ["attention_mask"], f"{scope}/Shape")
        (width,) = g.node("Gather", [mask_shape, g.const(f"{scope}/Gather/Constant", 1)], f"{scope}/Gather", axis=0)
        (total_len,) = g.node("Cast", [width], f"{scope}/Gather/Cast", to=TensorProto.INT32)
        return seqlens_k, total_len, width

    def cache_pair(self, name: str, cos: np.ndarray, sin: np.ndarray) -> tuple[str, str]:
        return (self.g.weight(f"cos_cache{name}", cos.astype(self.dtype)),
                self.g.weight(f"sin_cache{name}", sin.astype(self.dtype)))

    def rotary_caches(self, width: str) -> list[tuple[str, str]]:
        """The (cos, sin) caches each layer's GQA rotates with."""
        spec, dim = self.spec, self.spec.rope_dim
        divisors = np.ones(dim // 2, np.float32)
        if self.has("rope_freqs.weight"):  # Llama 3.1+: llama.cpp divides each frequency by its factor
            divisors = divisors * self.load("rope_freqs.weight")
        if spec.rope_scaling == "linear":
            divisors = divisors * np.float32(spec.rope_factor)
        longrope = [self.has(f"rope_factors_{kind}.weight") for kind in ("short", "long")]
        if any(longrope) and not all(longrope):
            raise FormatError("ONNX export: LongRoPE needs both rope_factors_short.weight and rope_factors_long.weight")
        if all(longrope):
            glob = self.longrope_caches(width, divisors)
        else:
            glob = self.cache_pair("", *_rotary_caches(spec.context, dim, spec.rope_base, divisors))
        local = glob
        if spec.rope_base_swa is not None and any(w > 0 for w in spec.windows):
            # Gemma 3: sliding layers rotate with their own base and no scaling
            local = self.cache_pair("_local", *_rotary_caches(spec.context, dim, spec.rope_base_swa))
        return [local if w > 0 else glob for w in spec.windows]

    def longrope_caches(self, width: str, divisors: np.ndarray) -> tuple[str, str]:
        """Phi-3 LongRoPE: short-factor caches while the total length is at most the original context,
        long-factor caches beyond it, chosen per run by an ``If`` (transformers switches on the
        sequence length the same way; keys already cached keep the rotation they were stored with)."""
        spec, dim, g = self.spec, self.spec.rope_dim, self.g
        pairs = {}
        for kind, length in (("short", min(spec.original_context, spec.context)), ("long", spec.context)):
            factors = divisors * self.load(f"rope_factors_{kind}.weight")
            pairs[kind] = self.cache_pair(f"_{kind}", *_rotary_caches(length, dim, spec.rope_base, factors, spec.rope_attn_factor))
        if spec.context <= spec.original_context:
            return pairs["short"]
        scope = "/model/rotemb_caches_subgraph"
        (longer,) = g.node("Greater", [width, g.const(f"{scope}/Greater/Constant", spec.original_context)],
                           f"{scope}/Greater")

        def branch(kind: str) -> onnx.GraphProto:
            # the branches return the outer graph's (external) caches: no copy inside the subgraph
            outs = [f"{scope}/{kind}/{n}" for n in ("cos", "sin")]
            nodes = [helper.make_node("Identity", [src], [out], name=f"{out}/Identity") for src, out in zip(pairs[kind], outs)]
            infos = [helper.make_tensor_value_info(out, self.elem, [None, dim // 2]) for out in outs]
            return helper.make_graph(nodes, f"{kind}_rotary_caches", [], infos)

        cos, sin = g.node("If", [longer], f"{scope}/If", outputs=["cos_cache", "sin_cache"],
                          then_branch=branch("long"), else_branch=branch("short"))
        return cos, sin

    # ---- blocks ----

    def attention(self, i: int, x: str, cache: tuple[str, str], seqlens_k: str, total_len: str) -> str:
        spec, blk, layer, scope = self.spec, f"blk.{i}", f"model.layers.{i}", f"/model/layers.{i}/attn"
        heads, kv_heads = spec.heads[i], spec.kv_heads[i]
        q_norm = self.has(f"{blk}.attn_q_norm.weight")  # Qwen3, Gemma 3, OpenELM: RMS norm of each head before rotary
        if self.has(f"{blk}.attn_qkv.weight"):  # Phi-3, OpenELM: q, k, v rows in one matrix
            q = self.linear(x, f"{blk}.attn_qkv", f"{layer}.attn.qkv_proj", f"{scope}/qkv_proj")
            k = v = ""  # GQA takes it packed, unless the heads are normalized first
            if q_norm:
                sizes = self.g.const(f"{scope}/qkv_proj/split_sizes", [n * spec.head_dim for n in (heads, kv_heads, kv_heads)])
                q, k, v = self.g.node("Split", [q, sizes], f"{scope}/qkv_proj/Split", n_out=3, axis=-1)
        else:
            q = self.linear(x, f"{blk}.attn_q", f"{layer}.attn.q_proj", f"{scope}/q_proj")
            k = self.linear(x, f"{blk}.attn_k", f"{layer}.attn.k_proj", f"{scope}/k_proj")
            v = self.linear(x, f"{blk}.attn_v", f"{layer}.attn.v_proj", f"{scope}/v_proj")
        if q_norm:
            q = self.head_norm(q, f"{blk}.attn_q_norm", f"{layer}.attn.q_norm", f"{scope}/q_norm")
            k = self.head_norm(k, f"{blk}.attn_k_norm", f"{layer}.attn.k_norm", f"{scope}/k_norm")
        extra: dict[str, Any] = {}
        if spec.windows[i] > 0:
            extra["local_window_size"] = spec.windows[i]
        if spec.attn_softcap:
            extra["softcap"] = spec.attn_softcap
        gqa = f"{scope}/GroupQueryAttention"
        attn, _, _ = self.g.node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len, *cache],
            gqa, domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
            do_rotary=1, rotary_interleaved=spec.interleaved, scale=spec.attn_scale,
            outputs=[f"{gqa}/output_0", f"present.{i}.key", f"present.{i}.value"], **extra,
        )
        return self.linear(attn, f"{blk}.attn_output", f"{layer}.attn.o_proj", f"{scope}/o_proj")

    def head_norm(self, x: str, stem: str, onnx_name: str, scope: str) -> str:
        g = self.g
        (r,) = g.node("Reshape", [x, g.const(f"{scope}/per_head_shape", [0, 0, -1, self.spec.head_dim])], f"{scope}/Reshape_to_heads")
        w = g.weight(f"{onnx_name}.layernorm.weight", self.load(f"{stem}.weight").astype(self.dtype))
        (n,) = g.node("SimplifiedLayerNormalization", [r, w], f"{scope}/SimplifiedLayerNormalization", axis=-1,
                      epsilon=self.spec.eps, stash_type=1)
        (y,) = g.node("Reshape", [n, g.const(f"{scope}/flat_shape", [0, 0, -1])], f"{scope}/Reshape_to_hidden")
        return y

    def activation(self, x: str, scope: str) -> str:
        if self.spec.family.activation == "gelu_tanh":  # Gemma: GELU, tanh approximation (as llama.cpp)
            (y,) = self.g.node("Gelu", [x], f"{scope}/Gelu", approximate="tanh")
            return y
        (sig,) = self.g.node("Sigmoid", [x], f"{scope}/Sigmoid")  # SiLU = x * sigmoid(x)
        (y,) = self.g.node("Mul", [x, sig], f"{scope}/Mul")
        return y

    def mlp(self, i: int, x: str) -> str:
        """The gated MLP ``down(act(gate x) * up x)``, or a plain one ``down(act(up x))`` (Phi-2, StarCoder2)."""
        blk, layer, scope = f"blk.{i}", f"model.layers.{i}", f"/model/layers.{i}/mlp"
        up_rows = self.tensors[f"{blk}.ffn_up.weight"].shape[0] if self.has(f"{blk}.ffn_up.weight") else None
        if self.has(f"{blk}.ffn_gate.weight"):
            gate = self.linear(x, f"{blk}.ffn_gate", f"{layer}.mlp.gate_proj", f"{scope}/gate_proj")
            up = self.linear(x, f"{blk}.ffn_up", f"{layer}.mlp.up_proj", f"{scope}/up_proj")
        elif up_rows == 2 * self.spec.ffs[i]:  # Phi-3: ffn_up holds the gate rows, then the up rows
            fused = self.linear(x, f"{blk}.ffn_up", f"{layer}.mlp.gate_up_proj", f"{scope}/gate_up_proj")
            gate, up = self.g.node("Split", [fused], f"{scope}/gate_up_proj/Split", n_out=2, axis=-1, num_outputs=2)
        else:  # no gate: fc1 → activation → fc2, as the builder names them
            hidden = self.linear(x, f"{blk}.ffn_up", f"{layer}.mlp.fc1", f"{scope}/fc1")
            return self.linear(self.activation(hidden, f"{scope}/act_fn"), f"{blk}.ffn_down", f"{layer}.mlp.fc2", f"{scope}/fc2")
        (prod,) = self.g.node("Mul", [self.activation(gate, f"{scope}/act_fn"), up], f"{scope}/Mul")
        return self.linear(prod, f"{blk}.ffn_down", f"{layer}.mlp.down_proj", f"{scope}/down_proj")

    def moe(self, i: int, x: str) -> str:
        """Mixtral's sparse MLP: router logits → com.microsoft.MoE (softmax over the experts, top k,
        weights renormalized over the k; each expert down(silu(gate x) * up x))."""
        spec, g = self.spec, self.g
        blk, layer, scope = f"blk.{i}", f"model.layers.{i}", f"/model/layers.{i}/moe"
        router = self.linear(x, f"{blk}.ffn_gate_inp", f"{layer}.moe.gate", f"{scope}/gate", quantizable=False)
        (router_2d,) = g.node("Reshape", [router, g.const(f"{scope}/router_shape", [-1, spec.n_expert])], f"{scope}/Reshape")
        gate, up = self.load(f"{blk}.ffn_gate_exps.weight"), self.load(f"{blk}.ffn_up_exps.weight")
        if gate.shape != up.shape:
            raise FormatError(f"ONNX export: {blk}.ffn_gate_exps and ffn_up_exps differ in shape")

        def interleaved(gate: np.ndarray, up: np.ndarray) -> Iterable[np.ndarray]:
            # onnxruntime's CPU kernel takes SwiGLU rows interleaved (gate row, up row, ...); one expert
            # at a time, so the fused tensor is never whole in memory
            for e in range(gate.shape[0]):
                rows = np.empty((2 * gate.shape[1], gate.shape[2]), dtype=self.dtype)
                rows[0::2], rows[1::2] = gate[e], up[e]
                yield rows

        shape = (gate.shape[0], 2 * gate.shape[1], gate.shape[2])
        w1 = g.weight_parts(f"{layer}.moe.experts.gate_up_proj.weight", shape, self.dtype, interleaved(gate, up))
        del gate, up  # weight_parts consumed the rows: free both before the next experts load
        w2 = g.weight(f"{layer}.moe.experts.down_proj.weight", self.load(f"{blk}.ffn_down_exps.weight").astype(self.dtype))
        (y,) = g.node("MoE", [x, router_2d, w1, "", w2], f"{scope}/MoE", domain=MS_DOMAIN, k=spec.n_expert_used,
                      activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                      normalize_routing_weights=1)
        return y

    def branch_out(self, y: str, post_norm: str, onnx_name: str, scope: str) -> str:
        """A residual branch's output as added to the stream: Gemma 2/3's post norm, Granite's multiplier."""
        if self.has(f"{post_norm}.weight"):
            y = self.norm(y, post_norm, onnx_name, scope)
        if self.spec.residual_scale != 1.0:
            (y,) = self.g.node("Mul", [y, self.scalar(f"{scope}/residual_scale", self.spec.residual_scale)], f"{scope}/Mul")
        return y

    def lm_head(self, x: str) -> None:
        """Logits, then Granite's division and Gemma 2's final soft-capping; the last node writes ``logits``."""
        spec, g = self.spec, self.g
        steps: list[tuple[str, Optional[float]]] = []
        if spec.logit_scale != 1.0:
            steps.append(("Div", spec.logit_scale))
        if spec.final_softcap:
            steps += [("Div", spec.final_softcap), ("Tanh", None), ("Mul", spec.final_softcap)]
        head = "token_embd" if spec.tied else "output"
        y = self.linear(x, head, "lm_head", "/lm_head", output=None if steps else "logits")
        for n, (op, value) in enumerate(steps):
            name = f"/lm_head/{op}_{n}"
            inputs = [y] if value is None else [y, self.scalar(f"{name}/Constant", value)]
            (y,) = g.node(op, inputs, name, outputs=["logits"] if n == len(steps) - 1 else None)

    def build(self) -> None:
        spec, g = self.spec, self.g
        seqlens_k, total_len, width = self.mask_inputs()
        embed = g.weight("model.embed_tokens.weight", self.load("token_embd.weight").astype(self.dtype))
        (hidden,) = g.node("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
        if spec.embed_scale != 1.0:
            (hidden,) = g.node("Mul", [hidden, self.scalar("/model/embed_tokens/scale", spec.embed_scale)],
                               "/model/embed_tokens/Mul")
        caches = self.rotary_caches(width)

        residual, pending = hidden, ""
        for i in range(spec.n_layer):
            blk, layer, scope = f"blk.{i}", f"model.layers.{i}", f"/model/layers.{i}"
            if i == 0:
                x = self.norm(hidden, f"{blk}.attn_norm", f"{layer}.input_layernorm", f"{scope}/input_layernorm/LayerNorm")
            else:
                x, residual = self.skip_norm(pending, residual, f"{blk}.attn_norm", f"{layer}.input_layernorm",
                                             f"{scope}/input_layernorm/SkipLayerNorm")
            attn = self.attention(i, x, caches[i], seqlens_k, total_len)
            pending = self.branch_out(attn, f"{blk}.post_attention_norm", f"{layer}.post_attention_norm",
                                      f"{scope}/post_attention_norm")
            if not self.has(f"{blk}.ffn_norm.weight"):
                # Phi-2: no norm of its own, the MLP reads the attention's input; both branches join the stream at once
                (pending,) = g.node("Add", [pending, self.mlp(i, x)], f"{scope}/residual_add/Add")
                continue
            x, residual = self.skip_norm(pending, residual, f"{blk}.ffn_norm", f"{layer}.post_attention_layernorm",
                                         f"{scope}/post_attention_layernorm/SkipLayerNorm")
            out = self.moe(i, x) if spec.n_expert else self.mlp(i, x)
            pending = self.branch_out(out, f"{blk}.post_ffw_norm", f"{layer}.post_feedforward_norm",
                                      f"{scope}/post_feedforward_norm")
        x, _ = self.skip_norm(pending, residual, "output_norm", f"model.layers.{spec.n_layer}.final_norm_layernorm",
                              f"/model/layers.{spec.n_layer}/final_norm_layernorm/SkipLayerNorm")
        self.lm_head(x)


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
        "type": spec.genai_type,
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
    def kv(name: str, layer: int, seq: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, ["batch_size", spec.kv_heads[layer], seq, spec.head_dim])

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch_size", "sequence_length", spec.vocab])]
    for i in range(spec.n_layer):
        inputs += [kv(f"past_key_values.{i}.{part}", i, "past_sequence_length") for part in ("key", "value")]
        outputs += [kv(f"present.{i}.{part}", i, "total_sequence_length") for part in ("key", "value")]
    return inputs, outputs


def write(
    directory: PathLike,
    checkpoint: Checkpoint,
    precision: str = "f32",
    on_tensor: Callable[[LazyTensor], None] | None = None,
    linear_weights: LinearWeights = LinearWeights(),
    on_carry: "Callable[[Carry], None] | None" = None,
) -> list[Path]:
    """Write ``checkpoint`` (GGUF-named; architecture llama, qwen2, qwen3, phi3, phi2, starcoder2, openelm,
    gemma, gemma2, gemma3, granite, or llama with experts = Mixtral) as an onnxruntime-genai model directory:
    ``model.onnx``, ``model.onnx.data``, ``genai_config.json`` (returned in that order), then the
    checkpoint's sidecar files. A ``bert`` checkpoint is written by
    :func:`slmpkg.formats.onnx_encoder.write_encoder`.

    ``precision`` is ``"f32"`` or ``"f16"``: the type of the float weights, activations, KV cache and
    logits. ``linear_weights`` says which linears become ``MatMulNBits`` (default: none; stored tensors
    of any type are read as float32, quantized ones dequantized, and cast); ``on_carry`` receives the
    :class:`~slmpkg.formats.onnx_nbits.Carry` of each such weight (exact / within 1 ulp / re-quantized
    with its error). ``on_tensor`` is called after each checkpoint tensor is read (progress).

    Nothing partial appears at ``directory``: the files are built in a hidden sibling
    (``.NAME.*.partial``) renamed onto ``directory`` when complete, removed on any error.
    ``directory`` must not exist or be empty (else :class:`UsageError`); parents are created.
    Raises :class:`FormatError` for an unsupported architecture, rope scaling or missing tensor.
    """
    if checkpoint.architecture == "bert":
        from .onnx_encoder import write_encoder  # its own module: encoders share only Graph with decoders

        if linear_weights.bits is not None:  # quantized blocks are dequantized: exact in float32
            raise UsageError("ONNX encoders are written with float weights (f32 or f16), not int4/int8")
        return write_encoder(directory, checkpoint, precision=precision, on_tensor=on_tensor)
    if precision not in PRECISIONS:
        raise UsageError(f"ONNX precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    np_dtype, elem = PRECISIONS[precision]
    spec = _Spec(checkpoint)
    tensors = {t.name: t for t in checkpoint.tensors}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        with open(tmp / DATA_FILE, "wb") as data:
            g = Graph(data, DATA_FILE)
            _Builder(g, spec, tensors, np_dtype, on_tensor, linear_weights, on_carry).build()
            data.flush()
            os.fsync(data.fileno())
        inputs, outputs = _io(spec, elem)
        graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            ir_version=IR_VERSION, producer_name="slmpkg",
        )
        # what the graph cannot say exactly (Llama 3's and LongRoPE's rope parameters, the original
        # context) travels as config.json, for slmpkg's import
        helper.set_model_props(model, {CONFIG_PROPERTY: json.dumps(architectures.hf_config(checkpoint), sort_keys=True)})
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
