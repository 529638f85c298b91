"""Model families: how a Hugging Face checkpoint's config and tensor names map to llama.cpp's.

The canonical form of a :class:`~slmpkg.checkpoint.Checkpoint` inside slmpkg is llama.cpp's: GGUF
metadata keys and GGUF tensor names. :func:`from_hf` maps a checkpoint read from a Hugging Face
directory (HF names, ``config.json`` in the sidecar) to it; :func:`to_hf` maps back. Both are lazy:
they rename and wrap loaders, and data moves only when a writer asks for it (stacking a MoE layer's
experts holds that layer's experts of one projection, nothing more).

Each family is data (:class:`Family`): its tensors as :class:`Rule` rows (GGUF name, HF name, expected
shape, an optional value transform such as the q/k head permutation or Gemma's norm offset, ``{x}``
in the HF name for experts stacked into one 3-D GGUF tensor), its hyperparameters as :class:`Param`
rows (GGUF key, config.json key), and :class:`Hook` pairs for the settings that are not one key to one
key (rope scaling, sliding-window layouts, soft-capping, attention scale, pooling). Both directions
read the same tables.

Example:
    >>> from slmpkg.formats import safetensors
    >>> hf = safetensors.read("Llama-3.2-1B")            # doctest: +SKIP
    >>> canonical = from_hf(hf)                          # doctest: +SKIP
    >>> canonical.get("general.architecture")            # doctest: +SKIP
    'llama'
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from gguf import GGUFValueType as V

from .checkpoint import Checkpoint, LazyTensor, MetaValue
from .errors import FormatError
from .quant import QuantType

__all__ = [
    "FLOAT_TYPES", "ROPE_SCALING_KEY", "HF_CONFIG_KEY", "Dims", "permute_qk", "unpermute_qk", "Transform",
    "PermuteHeads", "Shift", "Rule", "Fused", "Multimodal", "Param", "Hook", "Family",
    "llama3_rope_factors", "llama3_rope_parameters", "openelm_sizes", "openelm_config", "FAMILIES",
    "MULTIMODAL", "supported_hf_classes", "family_for_hf", "family_for_gguf", "hf_dims", "expected_shape",
    "hf_metadata", "from_hf", "cast_checkpoint", "hf_config", "to_hf",
]

FLOAT_TYPES = (QuantType.F32, QuantType.F16, QuantType.BF16)

# a GGUF key of our own, which llama.cpp ignores: the source's rope scaling when llama.cpp's keys
# cannot hold it (Llama 3 scaling becomes a rope_freqs tensor whose parameters are not recoverable)
ROPE_SCALING_KEY = "slmpkg.rope_scaling"
# another of ours: config.json entries of the source that llama.cpp's keys cannot hold and to_hf writes back
# (OpenELM's sizing rules, from which its own code recomputes the per-layer sizes), a JSON object
HF_CONFIG_KEY = "slmpkg.hf_config"

# llama.cpp's pooling types (llama.h) and sentence-transformers' Pooling modes
_POOLING = {"none": 0, "mean": 1, "cls": 2, "lasttoken": 3}


# ---- shapes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """The sizes a family's tensor shapes are written in (see :attr:`Rule.shape`)."""

    hidden: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    ff: int
    n_expert: int = 0
    ctx: int = 0
    n_types: int = 0

    def value(self, name: str) -> Optional[int]:
        derived = {
            "q": self.n_head * self.head_dim,
            "kv": self.n_head_kv * self.head_dim,
            "qkv": (self.n_head + 2 * self.n_head_kv) * self.head_dim,
            "ff2": 2 * self.ff,
        }
        if name in derived:
            return derived[name]
        return getattr(self, name, None)


# ---- tensor transforms --------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → GGUF row order of a q/k projection (or its bias) with ``n_head`` heads."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF → HF: the inverse of :func:`permute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _same_type_loader(src: LazyTensor, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[], np.ndarray]:
    """Apply a row permutation to the stored elements without changing their type (exact for any float type)."""
    itemsize = {QuantType.F32: 4, QuantType.F16: 2, QuantType.BF16: 2}[src.qtype]
    dtype = {4: np.uint32, 2: np.uint16}[itemsize]

    def load() -> np.ndarray:
        elements = np.asarray(src.raw()).view(dtype).reshape(src.shape)
        return np.ascontiguousarray(fn(elements)).reshape(-1).view(np.uint8)

    return load


def _as_type(t: LazyTensor, target: QuantType) -> LazyTensor:
    return t.converted(target)


def _as_float(t: LazyTensor) -> LazyTensor:
    """``t`` itself when stored as a float type, else dequantized to F32."""
    return t if t.qtype in FLOAT_TYPES else _as_type(t, QuantType.F32)


class Transform:
    """A value change between HF's and llama.cpp's convention for one tensor, exact both ways."""

    def forward(self, t: LazyTensor, dims: Dims) -> LazyTensor:  # HF → GGUF
        raise NotImplementedError

    def backward(self, t: LazyTensor, dims: Dims) -> LazyTensor:  # GGUF → HF
        raise NotImplementedError


@dataclass(frozen=True)
class PermuteHeads(Transform):
    """llama.cpp's ``llama`` graph rotates adjacent pairs; HF keeps each head's two rotary halves apart.

    ``heads`` names the :class:`Dims` field with the head count (``n_head`` for q, ``n_head_kv`` for k).
    """

    heads: str

    def forward(self, t: LazyTensor, dims: Dims) -> LazyTensor:
        n = getattr(dims, self.heads)
        return LazyTensor(t.name, t.shape, t.qtype, _same_type_loader(t, lambda w: permute_qk(w, n)))

    def backward(self, t: LazyTensor, dims: Dims) -> LazyTensor:
        src = _as_float(t)
        n = getattr(dims, self.heads)
        return LazyTensor(t.name, t.shape, src.qtype, _same_type_loader(src, lambda w: unpermute_qk(w, n)))


@dataclass(frozen=True)
class Shift(Transform):
    """llama.cpp multiplies by the stored norm weight; Gemma's HF norms multiply by ``1 + weight``."""

    offset: float

    def _shifted(self, t: LazyTensor, offset: float) -> LazyTensor:
        def load() -> np.ndarray:
            return (t.float32() + np.float32(offset)).astype(np.float32).reshape(-1).view(np.uint8)

        return LazyTensor(t.name, t.shape, QuantType.F32, load)

    def forward(self, t: LazyTensor, dims: Dims) -> LazyTensor:
        return self._shifted(t, self.offset)

    def backward(self, t: LazyTensor, dims: Dims) -> LazyTensor:
        return self._shifted(t, -self.offset)


_Q = PermuteHeads("n_head")
_K = PermuteHeads("n_head_kv")
_PLUS_ONE = Shift(1.0)


@dataclass(frozen=True)
class Rule:
    """One tensor (``.weight`` and ``.bias``) of a family.

    ``gguf`` and ``hf`` are names without the suffix; a layer rule's names are inside ``blk.N`` and
    the family's layer prefix. ``{x}`` in ``hf`` marks experts: the HF tensors of experts 0..n-1 are
    stacked along a new leading axis into the one GGUF tensor. ``shape`` names the weight's
    dimensions (:class:`Dims` fields, ``q``, ``kv``, ``qkv``, ``ff2``, or ``*`` for any); for experts it
    is the stacked shape.
    """

    gguf: str
    hf: str
    shape: tuple[str, ...] = ()
    transform: Optional[Transform] = None

    @property
    def experts(self) -> bool:
        return "{x}" in self.hf


@dataclass(frozen=True)
class Fused:
    """One tensor of another layout that holds several of the family's own (inside a layer).

    transformers 5 saves MoE experts fused (``save_pretrained(save_original_format=False)``):
    ``mlp.experts.gate_up_proj`` [experts, 2·ff, hidden] holds every expert's gate rows then up rows.
    ``parts`` are the family's own names (with suffix) in row order; with ``{x}`` the leading axis is
    the expert and each expert's rows are split equally among the parts.

    Example:
        >>> Fused("mlp.experts.down_proj", ("block_sparse_moe.experts.{x}.w2.weight",)).parts[0]
        'block_sparse_moe.experts.{x}.w2.weight'
    """

    hf: str
    parts: tuple[str, ...]

    def split(self, t: LazyTensor, prefix: str) -> list[LazyTensor]:
        """``t`` (named ``prefix + hf``) as lazy views of its parts, each a byte range of ``t``."""
        per_expert = "{x}" in self.parts[0]
        experts = t.shape[0] if per_expert else 1
        rows = t.shape[1] if per_expert else t.shape[0]
        tail = tuple(t.shape[2:] if per_expert else t.shape[1:])
        if rows % len(self.parts):
            raise FormatError(f"tensor {t.name}: {rows} rows do not split into {len(self.parts)} equal parts")
        part_rows = rows // len(self.parts)
        row_bytes = t.nbytes // (experts * rows)
        out = []
        for x in range(experts):
            for i, name in enumerate(self.parts):
                offset = (x * rows + i * part_rows) * row_bytes
                size = part_rows * row_bytes
                out.append(LazyTensor(prefix + name.format(x=x), (part_rows, *tail), t.qtype,
                                      lambda o=offset, n=size: np.asarray(t.byte_range(o, n)).reshape(-1).view(np.uint8).copy()))
        return out


@dataclass(frozen=True)
class Multimodal:
    """A multimodal checkpoint whose language model is a supported family: the HF name prefixes of its
    language model (mapped to the text class's) and of the other towers (left out, with a warning)."""

    hf_class: str
    text_class: str
    prefixes: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]
    note: str


# ---- hyperparameters ----------------------------------------------------------------------------


_META = {
    V.UINT32: lambda v: MetaValue(V.UINT32, int(v)),
    V.FLOAT32: lambda v: MetaValue(V.FLOAT32, float(v)),
    V.BOOL: lambda v: MetaValue(V.BOOL, bool(v)),
    V.STRING: lambda v: MetaValue(V.STRING, str(v)),
}


def _u32(v: int) -> MetaValue:
    return MetaValue(V.UINT32, int(v))


def _f32(v: float) -> MetaValue:
    return MetaValue(V.FLOAT32, float(v))


@dataclass(frozen=True)
class Param:
    """One GGUF key (after ``{arch}.``) that is one config.json key.

    HF → GGUF takes ``hf`` (or the ``fallback`` key, or ``default``); ``default`` None means the key is
    required. GGUF → HF writes ``hf`` from the key, or ``default`` when the GGUF lacks it.
    """

    key: str
    hf: str
    type: V = V.UINT32
    default: Any = None
    fallback: Optional[str] = None


@dataclass
class _Forward:
    """What HF → GGUF hooks read and add to."""

    config: Mapping[str, Any]
    dims: Dims
    arch: str
    sidecar: Mapping[str, bytes]
    n_vocab: int
    metadata: dict[str, MetaValue]
    tensors: list[LazyTensor]

    def put(self, key: str, value: MetaValue) -> None:
        self.metadata[f"{self.arch}.{key}"] = value


@dataclass
class _Backward:
    """What GGUF → HF hooks read and add to."""

    ckpt: Checkpoint
    dims: Dims
    arch: str
    config: dict[str, Any]
    sidecar: dict[str, bytes]
    skip: set[str]  # GGUF tensors with no HF counterpart (their content lives in config.json)
    names: set[str]  # the GGUF's tensor names

    def get(self, key: str, default: Any = None) -> Any:
        return self.ckpt.get(f"{self.arch}.{key}", default)


@dataclass(frozen=True)
class Hook:
    """A setting that is not one key to one key: ``forward`` writes GGUF metadata (and extra tensors)
    from config.json, ``backward`` writes config.json entries (and sidecar files) from the GGUF."""

    name: str
    forward: Callable[[_Forward], None]
    backward: Callable[[_Backward], None]


@dataclass(frozen=True)
class Family:
    """One model family: llama.cpp's architecture, the HF classes it covers, its tables."""

    gguf_arch: str
    hf_classes: tuple[str, ...]  # the first is what to_hf writes
    hf_model_type: str
    layer_tensors: tuple[Rule, ...]
    global_tensors: tuple[Rule, ...]
    params: tuple[Param, ...]
    hooks: tuple[Hook, ...] = ()
    hf_config: Mapping[str, Any] = field(default_factory=dict)  # constant config.json entries to_hf writes
    layer_prefix: str = "model.layers"
    activations: tuple[str, ...] = ("silu",)  # hidden_act values llama.cpp's graph computes
    # llama.cpp's output matrix: "optional" (absent = tied to token_embd), "tied" (the graph always
    # reads token_embd: an untied lm_head cannot be expressed), "required" (a tied one cannot be
    # expressed), "none" (no output matrix: encoders)
    output: str = "optional"
    dropped: tuple[str, ...] = ()  # HF tensors with no place in llama.cpp's graph, left out
    # among families sharing gguf_arch, this one is chosen when {arch}.<selector> is non-zero
    gguf_selector: Optional[str] = None
    encoder: bool = False
    # other layouts transformers saves the same tensors in (read by from_hf; to_hf writes the family's own)
    saved_as: tuple["Fused", ...] = ()
    # tensors the family's HF layout keeps fused where llama.cpp's are apart (OpenELM's gate/up): from_hf
    # splits them, to_hf fuses them again
    hf_fused: tuple["Fused", ...] = ()
    # config.json in the keys the tables read, for families that name their settings otherwise (OpenELM)
    config_view: Optional[Callable[[Mapping[str, Any]], dict[str, Any]]] = None

    @property
    def name(self) -> str:
        return self.hf_classes[0]


# ---- hooks ----------------------------------------------------------------------------------------


def _rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; older configs in ``rope_theta``/``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    if "full_attention" in params or "sliding_attention" in params:
        return params
    if "rope_theta" not in params and "rope_theta" in config:
        params["rope_theta"] = config["rope_theta"]
    scaling = config.get("rope_scaling") or {}
    for k, v in scaling.items():
        params.setdefault("rope_type" if k == "type" else k, v)
    if "partial_rotary_factor" not in params and "partial_rotary_factor" in config:
        params["partial_rotary_factor"] = config["partial_rotary_factor"]
    return params


def _full_and_sliding_rope(config: Mapping[str, Any]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """(global layers' rope, sliding layers' rope or None) in transformers 5's form."""
    params = _rope_parameters(config)
    if "full_attention" in params or "sliding_attention" in params:
        return dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    sliding = None
    if config.get("rope_local_base_freq") is not None:  # Gemma 3 before transformers 5
        sliding = {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
    return params, sliding


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_rope_factors(config: Mapping[str, Any], head_dim: int) -> Optional[np.ndarray]:
    """The ``rope_freqs`` factors llama.cpp applies for Llama 3.1+ rope scaling, or None."""
    rope = _rope_parameters(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    return _llama3_factors(rope, rope.get("rope_theta", 10000.0), head_dim)


def _llama3_factors(rope: Mapping[str, Any], base: float, head_dim: int) -> np.ndarray:
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def llama3_rope_parameters(factors: np.ndarray, base: float, head_dim: int, source: str = "GGUF → HF",
                           check: bool = True) -> dict[str, Any]:
    """Llama 3 rope parameters that reproduce ``factors`` (a GGUF's ``rope_freqs`` made elsewhere,
    without our key; or the divisors an ONNX graph's rotary caches hold).

    Between the two wavelength bounds, ``smooth = (1/f - 1/factor) / (1 - 1/factor)`` is linear in
    ``1/wavelength``: ``a / wavelength + b`` with ``a = original_ctx / (high - low)`` and
    ``b = -low / (high - low)``. Scaling all three leaves the factors unchanged, so the convention
    ``low_freq_factor = 1`` (every Llama 3.x release) fixes the rest. ``check``: recompute the factors
    and refuse parameters that do not give them (off for a caller that checks another way).

    Example:
        >>> rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        ...         "original_max_position_embeddings": 8192}
        >>> llama3_rope_parameters(_llama3_factors(rope, 500000.0, 64), 500000.0, 64) == rope
        True
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float64)
    inv_wavelen = freqs / (2 * math.pi)
    between = [i for i, f in enumerate(factors)
               if not (math.isclose(f, 1.0, rel_tol=1e-6) or math.isclose(f, factor, rel_tol=1e-6))]
    if factor <= 1.0 or len(between) < 2:
        raise FormatError(
            f"{source}: the rope factors do not determine the Llama 3 rope scaling (fewer than two between 1 "
            f"and the maximum) and nothing records it ({ROPE_SCALING_KEY})"
        )
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(inv_wavelen[between], smooth, 1)
    low = 1.0
    high = low - low / b
    rope = {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
        "high_freq_factor": float(round(high, 4)), "original_max_position_embeddings": int(round(-a / b * low)),
    }
    if check and not np.allclose(_llama3_factors(rope, base, head_dim), factors, rtol=1e-4, atol=0):
        raise FormatError(f"{source}: the rope factors are not a Llama 3 rope scaling that config.json can describe")
    return rope


def _rope_forward(ctx: _Forward, *, dimension_count: bool, original_context: bool) -> None:
    config, dims = ctx.config, ctx.dims
    full, sliding = _full_and_sliding_rope(config)
    ctx.put("rope.freq_base", _f32(full.get("rope_theta", 10000.0)))
    if sliding:
        if str(sliding.get("rope_type", "default")).lower() != "default":
            raise FormatError("config.json: llama.cpp applies no rope scaling to sliding-window layers; "
                              f"sliding_attention has rope_type {sliding.get('rope_type')!r}")
        ctx.put("rope.freq_base_swa", _f32(sliding.get("rope_theta", 10000.0)))
    partial = full.get("partial_rotary_factor", 1.0)
    if dimension_count or partial != 1.0:
        # the rotary width transformers computes; llama.cpp rotates the first n_rot values of each head
        ctx.put("rope.dimension_count", _u32(int(dims.head_dim * partial)))
    if original_context and config.get("original_max_position_embeddings"):
        ctx.put("rope.scaling.original_context_length", _u32(config["original_max_position_embeddings"]))
    rope_type = str(full.get("rope_type", "default")).lower()
    if rope_type == "linear" and full.get("factor"):
        ctx.put("rope.scaling.type", MetaValue(V.STRING, "linear"))
        ctx.put("rope.scaling.factor", _f32(full["factor"]))
    elif rope_type == "yarn" and full.get("factor"):
        ctx.put("rope.scaling.type", MetaValue(V.STRING, "yarn"))
        ctx.put("rope.scaling.factor", _f32(full["factor"]))
        ctx.put("rope.scaling.original_context_length", _u32(full["original_max_position_embeddings"]))
    elif rope_type == "llama3":
        params = {k: full[k] for k in _LLAMA3_KEYS if k in full}
        ctx.metadata[ROPE_SCALING_KEY] = MetaValue(V.STRING, json.dumps({"rope_type": "llama3", **params}, sort_keys=True))
        factors = _llama3_factors(full, full.get("rope_theta", 10000.0), dims.head_dim)
        ctx.tensors.append(LazyTensor.from_array("rope_freqs.weight", factors))
    elif rope_type in ("longrope", "su"):
        _longrope_forward(ctx, full)
    elif rope_type != "default":
        raise FormatError(f"config.json: rope scaling type {rope_type!r} is not supported yet")


def _longrope_forward(ctx: _Forward, rope: Mapping[str, Any]) -> None:
    """Phi-3's LongRoPE: per-frequency divisors for short and long contexts and a cos/sin scale.

    transformers picks the long factors when the sequence is longer than
    ``original_max_position_embeddings``; llama.cpp when the context it is given is (``n_ctx``), so
    the two agree when both are on the same side of that length.
    """
    orig = rope.get("original_max_position_embeddings") or ctx.config.get("original_max_position_embeddings")
    if not orig:
        raise FormatError("config.json: longrope scaling without original_max_position_embeddings")
    n_rot = int(ctx.dims.head_dim * rope.get("partial_rotary_factor", 1.0))
    factors = {}
    for kind in ("short", "long"):
        values = rope.get(f"{kind}_factor")
        if values is None or len(values) != n_rot // 2:
            raise FormatError(f"config.json: longrope {kind}_factor must have {n_rot // 2} values (rotary width {n_rot})")
        factors[kind] = np.asarray(values, dtype=np.float32)
    factor = rope.get("factor") or ctx.dims.ctx / orig
    attn = rope.get("attention_factor")
    if attn is None:  # transformers' default (the LongRoPE paper's)
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ctx.put("rope.scaling.attn_factor", _f32(attn))
    ctx.put("rope.scaling.original_context_length", _u32(orig))
    given = {k: rope[k] for k in ("factor", "attention_factor") if rope.get(k) is not None}
    ctx.metadata[ROPE_SCALING_KEY] = MetaValue(V.STRING, json.dumps({"rope_type": "longrope", **given}, sort_keys=True))
    for kind in ("long", "short"):
        ctx.tensors.append(LazyTensor.from_array(f"rope_factors_{kind}.weight", factors[kind]))


def _rope_backward(ctx: _Backward, *, per_layer_type: bool, original_context: bool) -> None:
    dims = ctx.dims
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": ctx.get("rope.freq_base", 10000.0)}
    scaling = ctx.get("rope.scaling.type")
    if scaling == "linear":
        full.update(rope_type="linear", factor=ctx.get("rope.scaling.factor"))
    elif scaling == "yarn":
        full.update(rope_type="yarn", factor=ctx.get("rope.scaling.factor"),
                    original_max_position_embeddings=ctx.get("rope.scaling.original_context_length"))
    elif scaling not in (None, "none"):
        raise FormatError(f"GGUF → HF: rope scaling type {scaling!r} is not supported yet")
    stored = json.loads(ctx.ckpt.get(ROPE_SCALING_KEY) or "{}")
    tensor = lambda name: next(t for t in ctx.ckpt.tensors if t.name == name).float32()  # noqa: E731
    if "rope_freqs.weight" in ctx.names:
        ctx.skip.add("rope_freqs.weight")
        if stored.get("rope_type") == "llama3":
            full.update(stored)
        else:
            full.update(llama3_rope_parameters(tensor("rope_freqs.weight"), full["rope_theta"], dims.head_dim))
    if "rope_factors_long.weight" in ctx.names and "rope_factors_short.weight" in ctx.names:
        ctx.skip.update(("rope_factors_long.weight", "rope_factors_short.weight"))
        full.update(
            rope_type="longrope",
            long_factor=[float(x) for x in tensor("rope_factors_long.weight")],
            short_factor=[float(x) for x in tensor("rope_factors_short.weight")],
            original_max_position_embeddings=ctx.get("rope.scaling.original_context_length", ctx.get("context_length")),
        )
        if stored.get("rope_type") == "longrope":
            full.update(stored)
        elif ctx.get("rope.scaling.attn_factor") is not None:
            full["attention_factor"] = ctx.get("rope.scaling.attn_factor")
    n_rot = ctx.get("rope.dimension_count")
    if n_rot is not None and n_rot != dims.head_dim:
        full["partial_rotary_factor"] = n_rot / dims.head_dim
    if original_context:
        orig = ctx.get("rope.scaling.original_context_length")
        if orig is not None:
            ctx.config["original_max_position_embeddings"] = orig
    if per_layer_type:
        sliding = {"rope_type": "default", "rope_theta": ctx.get("rope.freq_base_swa", 10000.0)}
        ctx.config["rope_parameters"] = {"full_attention": full, "sliding_attention": sliding}
    else:
        ctx.config["rope_parameters"] = full


def _rope(*, dimension_count: bool = False, original_context: bool = False, per_layer_type: bool = False) -> Hook:
    return Hook(
        "rope",
        lambda c: _rope_forward(c, dimension_count=dimension_count, original_context=original_context),
        lambda c: _rope_backward(c, per_layer_type=per_layer_type, original_context=original_context),
    )


def _head_dim_forward(ctx: _Forward) -> None:
    if ctx.config.get("head_dim"):
        ctx.put("attention.key_length", _u32(ctx.dims.head_dim))
        ctx.put("attention.value_length", _u32(ctx.dims.head_dim))


def _head_dim_backward(ctx: _Backward) -> None:
    if ctx.get("attention.key_length") is not None:
        ctx.config["head_dim"] = ctx.dims.head_dim


_HEAD_DIM = Hook("head_dim", _head_dim_forward, _head_dim_backward)


def _vocab_size_forward(ctx: _Forward) -> None:
    ctx.put("vocab_size", _u32(ctx.n_vocab))


_VOCAB_SIZE = Hook("vocab_size", _vocab_size_forward, lambda ctx: None)  # llama.cpp's llama converter writes it


def _biases_backward(ctx: _Backward) -> None:
    ctx.config["attention_bias"] = any(n.endswith(".attn_q.bias") for n in ctx.names)
    ctx.config["mlp_bias"] = any(n.endswith(".ffn_up.bias") for n in ctx.names)


_BIASES = Hook("biases", lambda ctx: None, _biases_backward)


def _layer_types(config: Mapping[str, Any], n_layer: int, every: int) -> list[str]:
    """transformers' per-layer attention kinds; ``every``: the default period of a full-attention layer."""
    types = config.get("layer_types")
    if types is not None:
        if len(types) != n_layer:
            raise FormatError(f"config.json: layer_types has {len(types)} entries for {n_layer} layers")
        return list(types)
    period = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or every
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layer)]


def _swa_pattern_forward(ctx: _Forward, every: int) -> None:
    window = ctx.config.get("sliding_window")
    types = _layer_types(ctx.config, ctx.dims.n_layer, every)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise FormatError(f"config.json: layer_types {unknown} have no llama.cpp counterpart")
    if not window or "sliding_attention" not in types:
        return
    ctx.put("attention.sliding_window", _u32(window))
    # llama.cpp reads this key as one flag per layer (or as a period); the flags say exactly what HF does
    ctx.put("attention.sliding_window_pattern",
            MetaValue(V.ARRAY, [t == "sliding_attention" for t in types], V.BOOL))


def _swa_pattern_backward(ctx: _Backward, every: int) -> None:
    window = ctx.get("attention.sliding_window")
    n = ctx.dims.n_layer
    pattern = ctx.get("attention.sliding_window_pattern")
    if window is None:
        ctx.config["sliding_window"] = None
        ctx.config["layer_types"] = ["full_attention"] * n
        return
    if pattern is None:
        flags = [(i + 1) % every != 0 for i in range(n)]
    elif isinstance(pattern, int):
        flags = [(i + 1) % pattern != 0 for i in range(n)]
    else:
        flags = [bool(x) for x in pattern]
    ctx.config["sliding_window"] = int(window)
    ctx.config["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]


def _swa_pattern(every: int) -> Hook:
    return Hook("sliding_window", lambda c: _swa_pattern_forward(c, every), lambda c: _swa_pattern_backward(c, every))


def _ignored_window_forward(ctx: _Forward, record: bool) -> None:
    """Families whose llama.cpp graph has no sliding window: warn when it matters; ``record`` keeps the
    value in the GGUF (the HF class written back has the setting)."""
    window = ctx.config.get("sliding_window")
    if window is None:
        return
    if record:
        ctx.put("attention.sliding_window", _u32(window))
    if window < ctx.dims.ctx:
        warnings.warn(
            f"config.json: sliding_window={window} is smaller than the context ({ctx.dims.ctx}); llama.cpp's "
            f"{ctx.arch} graph attends to the whole context, so outputs differ past {window} tokens",
            stacklevel=4,
        )


def _ignored_window_backward(ctx: _Backward) -> None:
    window = ctx.get("attention.sliding_window")
    ctx.config["sliding_window"] = int(window) if window else None


def _recorded_window_backward(ctx: _Backward) -> None:
    """The window a GGUF records for runtimes that honour it, kept in config.json only when there is one."""
    window = ctx.get("attention.sliding_window")
    if window:
        ctx.config["sliding_window"] = int(window)


_IGNORED_WINDOW = Hook("sliding_window", lambda c: _ignored_window_forward(c, True), _ignored_window_backward)
# Mistral's window: recorded for runtimes that honour it (ONNX's GroupQueryAttention); to_hf writes
# LlamaForCausalLM, which has no such setting
_WARN_WINDOW = Hook("sliding_window", lambda c: _ignored_window_forward(c, True), _recorded_window_backward)


def _softcap_forward(ctx: _Forward, attn: bool, final_required: bool) -> None:
    a, f = ctx.config.get("attn_logit_softcapping"), ctx.config.get("final_logit_softcapping")
    if attn:
        if a is None:
            raise FormatError(f"config.json: llama.cpp's {ctx.arch} always soft-caps attention logits; attn_logit_softcapping is null")
        ctx.put("attn_logit_softcapping", _f32(a))
    elif a is not None:
        raise FormatError(f"config.json: llama.cpp's {ctx.arch} has no attention soft-capping (attn_logit_softcapping={a})")
    if f is None and final_required:
        raise FormatError(f"config.json: llama.cpp's {ctx.arch} always soft-caps the final logits; final_logit_softcapping is null")
    if f is not None:
        ctx.put("final_logit_softcapping", _f32(f))


def _softcap_backward(ctx: _Backward, attn: bool, final_required: bool) -> None:
    ctx.config["attn_logit_softcapping"] = ctx.get("attn_logit_softcapping", 50.0) if attn else None
    ctx.config["final_logit_softcapping"] = ctx.get("final_logit_softcapping", 30.0 if final_required else None)


def _softcap(attn: bool, final_required: bool) -> Hook:
    return Hook("softcap", lambda c: _softcap_forward(c, attn, final_required), lambda c: _softcap_backward(c, attn, final_required))


def _gemma_query_scalar(dims: Dims, wide_layers: int) -> int:
    """What llama.cpp's Gemma 2/3 graph divides queries by (squared): the head size, except for the
    layer count of the 27B model, where it is hidden size / heads (integer division, as in C)."""
    return dims.hidden // dims.n_head if dims.n_layer == wide_layers else dims.head_dim


def _query_scale_forward(ctx: _Forward, wide_layers: int) -> None:
    want = _gemma_query_scalar(ctx.dims, wide_layers)
    have = ctx.config.get("query_pre_attn_scalar", want)
    if have != want:
        raise FormatError(
            f"config.json: query_pre_attn_scalar={have}, but llama.cpp's {ctx.arch} scales queries by 1/sqrt({want}) "
            f"for a {ctx.dims.n_layer}-layer model (it reads no key for it); the GGUF would compute different attention"
        )


def _query_scale(wide_layers: int) -> Hook:
    def backward(ctx: _Backward) -> None:
        ctx.config["query_pre_attn_scalar"] = _gemma_query_scalar(ctx.dims, wide_layers)

    return Hook("query_pre_attn_scalar", lambda c: _query_scale_forward(c, wide_layers), backward)


def _pooling_forward(ctx: _Forward) -> None:
    ctx.put("attention.causal", MetaValue(V.BOOL, False))
    raw = ctx.sidecar.get("modules.json")
    if raw is None:
        return
    try:
        modules = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"modules.json: not valid JSON ({e})") from None
    pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pooling is None:
        return
    path = str(pooling.get("path") or "").strip("/")
    conf_name = f"{path}/config.json" if path else "config.json"
    if conf_name not in ctx.sidecar:
        warnings.warn(
            f"modules.json names a Pooling module but {conf_name} is not among the files read; "
            "using sentence-transformers' default, mean pooling", stacklevel=4,
        )
        mode = "mean"
    else:
        conf = json.loads(ctx.sidecar[conf_name])
        flags = [("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"), ("lasttoken", "pooling_mode_lasttoken")]
        mode = next((m for m, key in flags if conf.get(key)), conf.get("pooling_mode"))
        if mode not in _POOLING:
            raise FormatError(f"{conf_name}: pooling {mode!r} has no llama.cpp counterpart (mean, cls, lasttoken)")
    ctx.put("pooling_type", _u32(_POOLING[mode]))


def _pooling_backward(ctx: _Backward) -> None:
    pooling = ctx.get("pooling_type")
    mode = {v: k for k, v in _POOLING.items()}.get(pooling)
    if mode is None or mode == "none":
        return
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    conf = {
        "word_embedding_dimension": ctx.dims.hidden,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": mode == "lasttoken",
    }
    ctx.sidecar["modules.json"] = json.dumps(modules, indent=2).encode()
    ctx.sidecar["1_Pooling/config.json"] = json.dumps(conf, indent=2).encode()


_POOLING_HOOK = Hook("pooling", _pooling_forward, _pooling_backward)


def _bert_backward(ctx: _Backward) -> None:
    types = next((t for t in ctx.ckpt.tensors if t.name == "token_types.weight"), None)
    count = types.shape[0] if types is not None else ctx.ckpt.get("tokenizer.ggml.token_type_count", 2)
    ctx.config["type_vocab_size"] = int(count)
    pad = ctx.ckpt.get("tokenizer.ggml.padding_token_id")
    ctx.config["pad_token_id"] = int(pad) if pad is not None else 0


_BERT = Hook("bert", lambda ctx: None, _bert_backward)


def _refuse_forward(key: str, why: str) -> Callable[[_Forward], None]:
    def forward(ctx: _Forward) -> None:
        if ctx.config.get(key):
            raise FormatError(f"config.json: {key}={ctx.config[key]!r}, but llama.cpp's {ctx.arch} graph {why}")
    return forward


def _require_forward(key: str, why: str) -> Callable[[_Forward], None]:
    def forward(ctx: _Forward) -> None:
        if ctx.config.get(key, True) is False:
            raise FormatError(f"config.json: {key}=false, but llama.cpp's {ctx.arch} graph {why}")
    return forward


# Phi-1/2 optionally normalize q and k per head (LayerNorm); llama.cpp's phi2 graph does not
_NO_QK_LAYERNORM = Hook("qk_layernorm", _refuse_forward("qk_layernorm", "has no q/k LayerNorm"), lambda ctx: None)
# StarCoder2 without biases: llama.cpp's starcoder2 loader requires the output and down-projection biases
_USE_BIAS = Hook("use_bias", _require_forward("use_bias", "requires the attention output and MLP biases"), lambda ctx: None)


def _make_divisible(value: float, divisor: int) -> int:
    """OpenELM's rounding of its layer widths (its configuration's ``make_divisible``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _openelm_multipliers(value: Any, n_layer: int, key: str) -> list[float]:
    """OpenELM's per-layer multipliers: one for all layers, two ends of a linear ramp (rounded to two
    decimals, as its configuration does), or one per layer."""
    if isinstance(value, (int, float)):
        return [float(value)] * n_layer
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return [round(float(v), 2) for v in np.linspace(value[0], value[1], num=n_layer, dtype=float)]
    if isinstance(value, (list, tuple)) and len(value) == n_layer:
        return [float(v) for v in value]
    raise FormatError(f"config.json: OpenELM's {key} is neither a number, two ends nor {n_layer} values")


def openelm_sizes(config: Mapping[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """(query heads, key/value heads, MLP widths) per layer as OpenELM's own configuration class computes
    them from its sizing rules (``qkv_multipliers``, ``num_gqa_groups``, ``ffn_multipliers``,
    ``ffn_dim_divisor``) when it loads a config.json: the lists a config.json also holds are recomputed.

    Example:
        >>> openelm_sizes({"num_transformer_layers": 2, "model_dim": 128, "head_dim": 32, "num_gqa_groups": 2,
        ...                "qkv_multipliers": 0.5, "ffn_multipliers": [1.0, 2.0], "ffn_dim_divisor": 64})
        ([2, 2], [1, 1], [128, 256])
    """
    n, dim, head_dim = config["num_transformer_layers"], config["model_dim"], config["head_dim"]
    groups = config.get("num_gqa_groups") or 1
    qkv = _openelm_multipliers(config.get("qkv_multipliers", 1.0), n, "qkv_multipliers")
    heads = [_make_divisible(dim * m, head_dim * groups) // head_dim for m in qkv]
    ffn = _openelm_multipliers(config.get("ffn_multipliers", 4.0), n, "ffn_multipliers")
    ffs = [_make_divisible(m * dim, config.get("ffn_dim_divisor", 256)) for m in ffn]
    return heads, [h // groups for h in heads], ffs


# OpenELM's sizing rules (its own code recomputes the per-layer lists from them) and its rotary cache size
_OPENELM_RULES = ("qkv_multipliers", "num_gqa_groups", "ffn_multipliers", "ffn_dim_divisor", "rope_max_length")


def _openelm_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """OpenELM's config.json (per-layer head counts and MLP widths) in the keys the tables read; the
    per-layer lists stay under ``_per_layer`` and the sizing rules under ``_rules`` for the hook that
    writes llama.cpp's arrays and keeps the rules."""
    missing = [k for k in ("model_dim", "num_transformer_layers", "head_dim", "num_query_heads", "num_kv_heads",
                           "ffn_multipliers") if k not in config]
    if missing:
        raise FormatError(f"config.json: OpenELM without {', '.join(missing)}")
    n = config["num_transformer_layers"]
    multipliers = config["ffn_multipliers"]
    if not isinstance(multipliers, list):
        multipliers = [multipliers] * n
    ff = [_make_divisible(m * config["model_dim"], config.get("ffn_dim_divisor", 256)) for m in multipliers]
    heads, kv = list(config["num_query_heads"]), list(config["num_kv_heads"])
    if not len(heads) == len(kv) == len(ff) == n:
        raise FormatError(f"config.json: OpenELM's per-layer lists do not have {n} entries")
    if not config.get("normalize_qk_projections", True) or not config.get("share_input_output_layers", True) \
            or not config.get("ffn_with_glu", True):
        raise FormatError("config.json: llama.cpp's openelm graph needs normalize_qk_projections, "
                          "share_input_output_layers and ffn_with_glu")
    return {
        **config,
        "hidden_size": config["model_dim"], "num_hidden_layers": n, "num_attention_heads": max(heads),
        "num_key_value_heads": max(kv), "intermediate_size": max(ff),
        "max_position_embeddings": config.get("max_context_length", 2048),
        "rope_parameters": {"rope_type": "default", "rope_theta": config.get("rope_freq_constant", 10000)},
        "rms_norm_eps": 1e-6,  # fixed in OpenELM's code
        "tie_word_embeddings": True, "hidden_act": "silu",
        "_per_layer": {"attention.head_count": heads, "attention.head_count_kv": kv, "feed_forward_length": ff},
        "_rules": {k: config[k] for k in _OPENELM_RULES if k in config},
    }


def _openelm_rules(hidden: int, head_dim: int, heads: Sequence[int], kv: Sequence[int], ffs: Sequence[int],
                   source: str) -> dict[str, Any]:
    """Sizing rules from which OpenELM's configuration recomputes these per-layer sizes (a GGUF that does not
    keep the source's): one GQA group count; one query multiplier, or the two-decimal ends of a ramp; the MLP
    widths as multipliers of the hidden size with a divisor they all share."""
    groups = {h // k for h, k in zip(heads, kv) if k and h % k == 0}
    if len(groups) != 1 or not all(k and h % k == 0 for h, k in zip(heads, kv)):
        raise FormatError(f"{source}: OpenELM's configuration gives every layer query heads / num_gqa_groups key/value "
                          f"heads; heads {list(heads)} with {list(kv)} have no common group count")
    (group,) = groups
    step = head_dim * group
    divisor = min([256] + [f & -f for f in ffs])  # the largest power of two dividing every width, at most 256
    rules: dict[str, Any] = {"num_gqa_groups": group, "ffn_multipliers": [f / hidden for f in ffs],
                             "ffn_dim_divisor": divisor, "rope_max_length": 4096}

    def candidates(h: int) -> list[float]:  # two-decimal multipliers that round to h heads
        low, high = int((h * head_dim - step) / hidden * 100), int((h * head_dim + step) / hidden * 100) + 2
        return [c / 100 for c in range(max(low, 1), high) if _make_divisible(hidden * (c / 100), step) == h * head_dim]

    if len(set(heads)) == 1:
        rules["qkv_multipliers"] = heads[0] * head_dim / hidden
        return rules
    for a in candidates(heads[0]):
        for b in candidates(heads[-1]):
            ramp = _openelm_multipliers([a, b], len(heads), "qkv_multipliers")
            if [_make_divisible(hidden * m, step) // head_dim for m in ramp] == list(heads):
                rules["qkv_multipliers"] = [a, b]
                return rules
    raise FormatError(f"{source}: no OpenELM qkv_multipliers ramp gives the query heads {list(heads)}")


def _openelm_forward(ctx: _Forward) -> None:
    for key, values in ctx.config["_per_layer"].items():
        ctx.put(key, MetaValue(V.ARRAY, [int(v) for v in values], V.UINT32))
    if ctx.config["_rules"]:
        ctx.metadata[HF_CONFIG_KEY] = MetaValue(V.STRING, json.dumps(ctx.config["_rules"], sort_keys=True))


def openelm_config(hidden: int, head_dim: int, heads: Sequence[int], kv: Sequence[int], ffs: Sequence[int],
                   context: int, rope_base: float, kept: Optional[Mapping[str, Any]] = None,
                   source: str = "GGUF → HF") -> dict[str, Any]:
    """OpenELM's own config.json sizes for these per-layer sizes: the lists, and sizing rules that recompute
    them (``kept``, the source's, when they do; else rules found for these sizes).

    Example:
        >>> openelm_config(128, 32, [2, 2], [1, 1], [128, 256], 2048, 10000.0)["qkv_multipliers"]
        0.5
    """
    config = {
        "model_dim": hidden, "num_transformer_layers": len(heads), "head_dim": head_dim,
        "num_query_heads": list(heads), "num_kv_heads": list(kv), "max_context_length": int(context),
        "rope_freq_constant": int(rope_base) if float(rope_base).is_integer() else float(rope_base),
    }
    sizes = (list(heads), list(kv), list(ffs))
    rules = {k: kept[k] for k in _OPENELM_RULES if k in kept} if kept else {}
    if not rules or openelm_sizes({**config, **rules}) != sizes:
        rules = _openelm_rules(hidden, head_dim, heads, kv, ffs, source)
        if openelm_sizes({**config, **rules}) != sizes:
            raise FormatError(f"{source}: no OpenELM sizing rules give these per-layer sizes")
    return {**config, **rules}


def _openelm_backward(ctx: _Backward) -> None:
    """OpenELM's own config.json keys in place of the tables' (its code reads no others)."""
    n = ctx.dims.n_layer
    sizes = []
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        value = ctx.get(key)
        sizes.append([int(v) for v in value] if np.ndim(value) else [int(value)] * n)
    config = openelm_config(ctx.dims.hidden, ctx.dims.head_dim, *sizes, ctx.get("context_length", 2048),
                            float(ctx.get("rope.freq_base", 10000.0)), json.loads(ctx.ckpt.get(HF_CONFIG_KEY) or "{}"))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings"):
        ctx.config.pop(key, None)
    ctx.config.update(config)


_OPENELM = Hook("openelm", _openelm_forward, _openelm_backward)


# ---- the families -------------------------------------------------------------------------------


_DECODER_PARAMS = (
    Param("block_count", "num_hidden_layers"),
    Param("context_length", "max_position_embeddings", default=2048),
    Param("embedding_length", "hidden_size"),
    Param("feed_forward_length", "intermediate_size"),
    Param("attention.head_count", "num_attention_heads"),
    Param("attention.head_count_kv", "num_key_value_heads", fallback="num_attention_heads"),
    Param("attention.layer_norm_rms_epsilon", "rms_norm_eps", V.FLOAT32, default=1e-6),
)

# decoders with LayerNorm (weight and bias) instead of RMS norm: Phi-2, StarCoder2
_LAYERNORM_PARAMS = _DECODER_PARAMS[:-1] + (
    Param("attention.layer_norm_epsilon", "layer_norm_eps", V.FLOAT32, default=1e-5),
)

_ATTENTION = (
    Rule("attn_norm", "input_layernorm", ("hidden",)),
    Rule("attn_q", "self_attn.q_proj", ("q", "hidden")),
    Rule("attn_k", "self_attn.k_proj", ("kv", "hidden")),
    Rule("attn_v", "self_attn.v_proj", ("kv", "hidden")),
    Rule("attn_output", "self_attn.o_proj", ("hidden", "q")),
)
_MLP = (
    Rule("ffn_norm", "post_attention_layernorm", ("hidden",)),
    Rule("ffn_gate", "mlp.gate_proj", ("ff", "hidden")),
    Rule("ffn_up", "mlp.up_proj", ("ff", "hidden")),
    Rule("ffn_down", "mlp.down_proj", ("hidden", "ff")),
)
_DECODER_GLOBALS = (
    Rule("token_embd", "model.embed_tokens", ("*", "hidden")),
    Rule("output_norm", "model.norm", ("hidden",)),
    Rule("output", "lm_head", ("*", "hidden")),
)


def _permuted(rules: Sequence[Rule]) -> tuple[Rule, ...]:
    """The llama graph's layout: q and k rows interleaved per head."""
    out = []
    for r in rules:
        if r.gguf == "attn_q":
            r = Rule(r.gguf, r.hf, r.shape, _Q)
        elif r.gguf == "attn_k":
            r = Rule(r.gguf, r.hf, r.shape, _K)
        out.append(r)
    return tuple(out)


def _gemma_norms(rules: Sequence[Rule]) -> tuple[Rule, ...]:
    """Gemma's norms store ``weight`` where llama.cpp wants ``1 + weight``."""
    return tuple(Rule(r.gguf, r.hf, r.shape, _PLUS_ONE) if "norm" in r.gguf else r for r in rules)


_GEMMA_ACT = ("gelu_pytorch_tanh", "gelu")  # llama.cpp's GELU is the tanh approximation
_GEMMA_LAYER = _gemma_norms(_ATTENTION + _MLP)
_GEMMA2_LAYER = _gemma_norms(_ATTENTION + (
    Rule("post_attention_norm", "post_attention_layernorm", ("hidden",)),
    Rule("ffn_norm", "pre_feedforward_layernorm", ("hidden",)),
    Rule("ffn_gate", "mlp.gate_proj", ("ff", "hidden")),
    Rule("ffn_up", "mlp.up_proj", ("ff", "hidden")),
    Rule("ffn_down", "mlp.down_proj", ("hidden", "ff")),
    Rule("post_ffw_norm", "post_feedforward_layernorm", ("hidden",)),
))
_GEMMA3_LAYER = _GEMMA2_LAYER + _gemma_norms((
    Rule("attn_q_norm", "self_attn.q_norm", ("head_dim",)),
    Rule("attn_k_norm", "self_attn.k_norm", ("head_dim",)),
))

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama", ("MixtralForCausalLM",), "mixtral",
        layer_tensors=_permuted(_ATTENTION) + (
            Rule("ffn_norm", "post_attention_layernorm", ("hidden",)),
            Rule("ffn_gate_inp", "block_sparse_moe.gate", ("n_expert", "hidden")),
            Rule("ffn_gate_exps", "block_sparse_moe.experts.{x}.w1", ("n_expert", "ff", "hidden")),
            Rule("ffn_down_exps", "block_sparse_moe.experts.{x}.w2", ("n_expert", "hidden", "ff")),
            Rule("ffn_up_exps", "block_sparse_moe.experts.{x}.w3", ("n_expert", "ff", "hidden")),
        ),
        global_tensors=_DECODER_GLOBALS,
        params=_DECODER_PARAMS + (
            Param("expert_count", "num_local_experts"),
            Param("expert_used_count", "num_experts_per_tok"),
        ),
        hooks=(_VOCAB_SIZE, _HEAD_DIM, _rope(dimension_count=True), _IGNORED_WINDOW),
        hf_config={"hidden_act": "silu"},
        gguf_selector="expert_count",
        saved_as=(  # transformers 5's own layout
            Fused("mlp.gate.weight", ("block_sparse_moe.gate.weight",)),
            Fused("mlp.experts.gate_up_proj", ("block_sparse_moe.experts.{x}.w1.weight", "block_sparse_moe.experts.{x}.w3.weight")),
            Fused("mlp.experts.down_proj", ("block_sparse_moe.experts.{x}.w2.weight",)),
        ),
    ),
    Family(
        "llama", ("LlamaForCausalLM", "MistralForCausalLM"), "llama",
        layer_tensors=_permuted(_ATTENTION) + _MLP,
        global_tensors=_DECODER_GLOBALS,
        params=_DECODER_PARAMS,
        hooks=(_VOCAB_SIZE, _HEAD_DIM, _rope(dimension_count=True), _BIASES, _WARN_WINDOW),
        hf_config={"hidden_act": "silu"},
    ),
    Family(
        "qwen2", ("Qwen2ForCausalLM",), "qwen2",
        layer_tensors=_ATTENTION + _MLP, global_tensors=_DECODER_GLOBALS, params=_DECODER_PARAMS,
        hooks=(_HEAD_DIM, _rope()), hf_config={"hidden_act": "silu"},
    ),
    Family(
        "qwen3", ("Qwen3ForCausalLM",), "qwen3",
        layer_tensors=_ATTENTION + _MLP + (
            Rule("attn_q_norm", "self_attn.q_norm", ("head_dim",)),
            Rule("attn_k_norm", "self_attn.k_norm", ("head_dim",)),
        ),
        global_tensors=_DECODER_GLOBALS, params=_DECODER_PARAMS,
        hooks=(_HEAD_DIM, _rope(), _BIASES), hf_config={"hidden_act": "silu"},
    ),
    Family(
        # llama.cpp's phi3 graph keeps the fused projections: attn_qkv (q, k, v rows in that order)
        # and ffn_up holding gate then up, split by its SwiGLU
        "phi3", ("Phi3ForCausalLM",), "phi3",
        layer_tensors=(
            Rule("attn_norm", "input_layernorm", ("hidden",)),
            Rule("attn_qkv", "self_attn.qkv_proj", ("qkv", "hidden")),
            Rule("attn_output", "self_attn.o_proj", ("hidden", "q")),
            Rule("ffn_norm", "post_attention_layernorm", ("hidden",)),
            Rule("ffn_up", "mlp.gate_up_proj", ("ff2", "hidden")),
            Rule("ffn_down", "mlp.down_proj", ("hidden", "ff")),
        ),
        global_tensors=_DECODER_GLOBALS, params=_DECODER_PARAMS,
        hooks=(_rope(dimension_count=True, original_context=True), _IGNORED_WINDOW),
        hf_config={"hidden_act": "silu"},
    ),
    Family(
        # Phi-1/1.5/2: one LayerNorm feeds attention and the MLP in parallel; partial rotary (NeoX
        # halves, as HF keeps them); a plain GELU MLP; biases everywhere, the output matrix's too
        "phi2", ("PhiForCausalLM",), "phi",
        layer_tensors=(
            Rule("attn_norm", "input_layernorm", ("hidden",)),
            Rule("attn_q", "self_attn.q_proj", ("q", "hidden")),
            Rule("attn_k", "self_attn.k_proj", ("kv", "hidden")),
            Rule("attn_v", "self_attn.v_proj", ("kv", "hidden")),
            Rule("attn_output", "self_attn.dense", ("hidden", "q")),
            Rule("ffn_up", "mlp.fc1", ("ff", "hidden")),
            Rule("ffn_down", "mlp.fc2", ("hidden", "ff")),
        ),
        global_tensors=(
            Rule("token_embd", "model.embed_tokens", ("*", "hidden")),
            Rule("output_norm", "model.final_layernorm", ("hidden",)),
            Rule("output", "lm_head", ("*", "hidden")),
        ),
        params=_LAYERNORM_PARAMS,
        hooks=(_rope(dimension_count=True), _NO_QK_LAYERNORM),
        hf_config={"hidden_act": "gelu_new", "qk_layernorm": False},
        activations=("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),  # llama.cpp's GELU is the tanh approximation
        output="required",
    ),
    Family(
        # StarCoder2: LayerNorms with biases, biased projections, a plain GELU MLP (c_fc, c_proj)
        "starcoder2", ("Starcoder2ForCausalLM",), "starcoder2",
        layer_tensors=(
            Rule("attn_norm", "input_layernorm", ("hidden",)),
            Rule("attn_q", "self_attn.q_proj", ("q", "hidden")),
            Rule("attn_k", "self_attn.k_proj", ("kv", "hidden")),
            Rule("attn_v", "self_attn.v_proj", ("kv", "hidden")),
            Rule("attn_output", "self_attn.o_proj", ("hidden", "q")),
            Rule("ffn_norm", "post_attention_layernorm", ("hidden",)),
            Rule("ffn_up", "mlp.c_fc", ("ff", "hidden")),
            Rule("ffn_down", "mlp.c_proj", ("hidden", "ff")),
        ),
        global_tensors=_DECODER_GLOBALS,
        params=_DECODER_PARAMS[:-1] + (Param("attention.layer_norm_epsilon", "norm_epsilon", V.FLOAT32, default=1e-5),),
        hooks=(_rope(), _IGNORED_WINDOW, _USE_BIAS),
        hf_config={"hidden_act": "gelu_pytorch_tanh", "use_bias": True},
        activations=("gelu_pytorch_tanh", "gelu_new"),
    ),
    Family(
        # Apple's OpenELM (no transformers class: its own code, trust_remote_code): per-layer head counts
        # and MLP widths (llama.cpp reads them as arrays), fused q/k/v with per-head q/k RMS norms, a
        # fused gate/up (gate rows first) that llama.cpp's converter splits, the embedding as the head
        "openelm", ("OpenELMForCausalLM",), "openelm",
        layer_tensors=(
            Rule("attn_norm", "attn_norm", ("hidden",)),
            Rule("attn_qkv", "attn.qkv_proj", ("*", "hidden")),
            Rule("attn_q_norm", "attn.q_norm", ("head_dim",)),
            Rule("attn_k_norm", "attn.k_norm", ("head_dim",)),
            Rule("attn_output", "attn.out_proj", ("hidden", "*")),
            Rule("ffn_norm", "ffn_norm", ("hidden",)),
            Rule("ffn_gate", "ffn.proj_1.gate", ("*", "hidden")),
            Rule("ffn_up", "ffn.proj_1.up", ("*", "hidden")),
            Rule("ffn_down", "ffn.proj_2", ("hidden", "*")),
        ),
        global_tensors=(
            Rule("token_embd", "transformer.token_embeddings", ("*", "hidden")),
            Rule("output_norm", "transformer.norm", ("hidden",)),
        ),
        params=_DECODER_PARAMS,
        hooks=(_HEAD_DIM, _rope(dimension_count=True), _OPENELM),
        hf_config={"activation_fn_name": "swish", "normalization_layer_name": "rms_norm", "ffn_with_glu": True,
                   "normalize_qk_projections": True, "share_input_output_layers": True},
        layer_prefix="transformer.layers",
        output="tied",
        hf_fused=(Fused("ffn.proj_1.weight", ("ffn.proj_1.gate.weight", "ffn.proj_1.up.weight")),),
        config_view=_openelm_view,
    ),
    Family(
        "gemma", ("GemmaForCausalLM",), "gemma",
        layer_tensors=_GEMMA_LAYER, global_tensors=_gemma_norms(_DECODER_GLOBALS), params=_DECODER_PARAMS,
        hooks=(_HEAD_DIM, _rope(), _BIASES),
        hf_config={"hidden_act": "gelu_pytorch_tanh"}, activations=_GEMMA_ACT, output="tied",
    ),
    Family(
        "gemma2", ("Gemma2ForCausalLM",), "gemma2",
        layer_tensors=_GEMMA2_LAYER, global_tensors=_gemma_norms(_DECODER_GLOBALS), params=_DECODER_PARAMS,
        hooks=(_HEAD_DIM, _rope(), _swa_pattern(2), _softcap(attn=True, final_required=True), _query_scale(46)),
        hf_config={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
        activations=_GEMMA_ACT, output="tied",
    ),
    Family(
        "gemma3", ("Gemma3ForCausalLM",), "gemma3_text",
        layer_tensors=_GEMMA3_LAYER, global_tensors=_gemma_norms(_DECODER_GLOBALS), params=_DECODER_PARAMS,
        hooks=(_HEAD_DIM, _rope(per_layer_type=True), _swa_pattern(6), _softcap(attn=False, final_required=False),
               _query_scale(62)),
        hf_config={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
        activations=_GEMMA_ACT,
    ),
    Family(
        "granite", ("GraniteForCausalLM",), "granite",
        layer_tensors=_permuted(_ATTENTION) + _MLP, global_tensors=_DECODER_GLOBALS,
        params=_DECODER_PARAMS + (
            # llama.cpp reads logit_scale as required; HF's defaults are 1.0 for all four
            Param("logit_scale", "logits_scaling", V.FLOAT32, default=1.0),
            Param("residual_scale", "residual_multiplier", V.FLOAT32, default=1.0),
            Param("embedding_scale", "embedding_multiplier", V.FLOAT32, default=1.0),
            Param("attention.scale", "attention_multiplier", V.FLOAT32, default=1.0),
        ),
        hooks=(_VOCAB_SIZE, _rope(dimension_count=True), _BIASES),
        hf_config={"hidden_act": "silu"},
    ),
    Family(
        "bert", ("BertModel",), "bert",
        layer_tensors=(
            Rule("attn_q", "attention.self.query", ("q", "hidden")),
            Rule("attn_k", "attention.self.key", ("kv", "hidden")),
            Rule("attn_v", "attention.self.value", ("kv", "hidden")),
            Rule("attn_output", "attention.output.dense", ("hidden", "q")),
            Rule("attn_output_norm", "attention.output.LayerNorm", ("hidden",)),
            Rule("ffn_up", "intermediate.dense", ("ff", "hidden")),
            Rule("ffn_down", "output.dense", ("hidden", "ff")),
            Rule("layer_output_norm", "output.LayerNorm", ("hidden",)),
        ),
        global_tensors=(
            Rule("token_embd", "embeddings.word_embeddings", ("*", "hidden")),
            Rule("token_types", "embeddings.token_type_embeddings", ("n_types", "hidden")),
            Rule("position_embd", "embeddings.position_embeddings", ("ctx", "hidden")),
            Rule("token_embd_norm", "embeddings.LayerNorm", ("hidden",)),
        ),
        params=(
            Param("block_count", "num_hidden_layers"),
            Param("context_length", "max_position_embeddings", default=512),
            Param("embedding_length", "hidden_size"),
            Param("feed_forward_length", "intermediate_size"),
            Param("attention.head_count", "num_attention_heads"),
            Param("attention.layer_norm_epsilon", "layer_norm_eps", V.FLOAT32, default=1e-12),
        ),
        hooks=(_POOLING_HOOK, _BERT),
        hf_config={"hidden_act": "gelu", "position_embedding_type": "absolute"},
        layer_prefix="encoder.layer",
        activations=("gelu", "gelu_new", "gelu_pytorch_tanh"),
        output="none",
        # BertModel's pooler (dense + tanh over [CLS]) feeds no llama.cpp pooling type
        dropped=("pooler.dense.weight", "pooler.dense.bias"),
        encoder=True,
    ),
)

# buffers transformers recomputes and some checkpoints still carry
_BUFFERS = ("rotary_emb.inv_freq", "position_ids")

MULTIMODAL: tuple[Multimodal, ...] = (
    Multimodal(
        "Gemma3ForConditionalGeneration", "Gemma3ForCausalLM",
        # transformers' original layout (save_pretrained's default), then its own (save_original_format=False)
        prefixes=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model.")),
        dropped=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
        note="llama.cpp reads the vision tower from a separate mmproj GGUF: convert with --mmproj FILE to write it",
    ),
)


def supported_hf_classes() -> list[str]:
    return [c for f in FAMILIES for c in f.hf_classes] + [m.hf_class for m in MULTIMODAL]


def _multimodal(config: Mapping[str, Any]) -> Optional[Multimodal]:
    classes = config.get("architectures") or []
    return next((m for m in MULTIMODAL if m.hf_class in classes), None)


def _language_model(tensors: Sequence[LazyTensor], wrapper: Multimodal) -> list[LazyTensor]:
    """The language model's tensors of a multimodal checkpoint under the text class's names; the other
    towers are left out with one warning."""
    kept, dropped = [], 0
    for t in tensors:
        new = next((to + t.name[len(frm):] for frm, to in wrapper.prefixes if t.name.startswith(frm)), None)
        if new is not None:
            kept.append(t.renamed(new))
        elif t.name.startswith(wrapper.dropped):
            dropped += 1
        else:
            raise FormatError(f"tensor {t.name} belongs to neither the language model nor a known tower of {wrapper.hf_class}")
    if dropped:
        warnings.warn(f"{wrapper.hf_class}: converting the language model only; the vision tower and projector "
                      f"({dropped} tensors) are left out: {wrapper.note}", stacklevel=3)
    return kept


def _own_layout(family: Family, tensors: Sequence[LazyTensor]) -> list[LazyTensor]:
    """Fused tensors (:attr:`Family.saved_as`, :attr:`Family.hf_fused`) as lazy views in the family's own names."""
    layouts = family.saved_as + family.hf_fused
    if not layouts:
        return list(tensors)
    out = []
    for t in tensors:
        head, _, rest = t.name.partition(f"{family.layer_prefix}.")
        layer, _, inner = rest.partition(".")
        fused = next((f for f in layouts if f.hf == inner), None) if not head and layer.isdigit() else None
        if fused is None:
            out.append(t)
        else:
            out += fused.split(t, f"{family.layer_prefix}.{layer}.")
    return out


def family_for_hf(config: Mapping[str, Any], source: str = "config.json") -> Family:
    classes = config.get("architectures") or []
    for family in FAMILIES:
        if any(c in family.hf_classes for c in classes):
            return family
    raise FormatError(
        f"{source}: unsupported architecture {', '.join(classes) or '(none given)'}; "
        f"supported: {', '.join(supported_hf_classes())}"
    )


def family_for_gguf(arch: Optional[str], source: str = "GGUF", metadata: Optional[Mapping[str, MetaValue]] = None) -> Family:
    """The family of a GGUF architecture; ``metadata`` tells apart families sharing one (Mixtral in ``llama``)."""
    for family in FAMILIES:
        if family.gguf_arch != arch:
            continue
        if family.gguf_selector is not None:
            item = (metadata or {}).get(f"{arch}.{family.gguf_selector}")
            if item is None or not item.value:
                continue
        return family
    supported = sorted({f.gguf_arch for f in FAMILIES})
    raise FormatError(f"{source}: unsupported architecture {arch!r}; supported: {', '.join(supported)}")


# ---- HF → GGUF ----------------------------------------------------------------------------------


def _dims_from_config(config: Mapping[str, Any], family: Family) -> Dims:
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in config]
    if missing:
        raise FormatError(f"config.json: missing {', '.join(missing)}")
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    # families without the head_dim hook derive it, as llama.cpp does (its Granite converter drops head_dim)
    head_dim = config.get("head_dim") if any(h.name == "head_dim" for h in family.hooks) else None
    return Dims(
        hidden=hidden,
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        head_dim=head_dim or hidden // n_head,
        ff=config["intermediate_size"],
        n_expert=config.get("num_local_experts") or 0,
        ctx=config.get("max_position_embeddings") or 0,
        n_types=config.get("type_vocab_size") or 0,
    )


def _param_forward(p: Param, config: Mapping[str, Any]) -> MetaValue:
    value = config.get(p.hf)
    if value is None and p.fallback is not None:
        value = config.get(p.fallback)
    if value is None:
        value = p.default
    if value is None:
        raise FormatError(f"config.json: {p.hf} is missing")
    return _META[p.type](value)


def _check_activation(family: Family, config: Mapping[str, Any]) -> None:
    act = config.get("hidden_activation") or config.get("hidden_act")
    if act is not None and act not in family.activations:
        raise FormatError(
            f"config.json: activation {act!r}, but llama.cpp's {family.gguf_arch} graph computes "
            f"{' / '.join(family.activations)}"
        )


def _hf_layer_name(family: Family, i: int, hf: str) -> str:
    return f"{family.layer_prefix}.{i}.{hf}"


def _hf_plan(family: Family, dims: Dims) -> dict[str, tuple[Rule, str, Optional[int]]]:
    """HF tensor name → (rule, GGUF name, expert index)."""
    plan: dict[str, tuple[Rule, str, Optional[int]]] = {}
    for rule in family.global_tensors:
        for s in (".weight", ".bias"):
            plan[rule.hf + s] = (rule, rule.gguf + s, None)
    for i in range(dims.n_layer):
        for rule in family.layer_tensors:
            for s in (".weight", ".bias"):
                target = f"blk.{i}.{rule.gguf}{s}"
                if rule.experts:
                    for x in range(dims.n_expert):
                        plan[_hf_layer_name(family, i, rule.hf.format(x=x)) + s] = (rule, target, x)
                else:
                    plan[_hf_layer_name(family, i, rule.hf) + s] = (rule, target, None)
    return plan


def _expected_shape(rule: Rule, dims: Dims, bias: bool) -> Optional[tuple[int, ...]]:
    if not rule.shape:
        return None
    shape = rule.shape[:-1] if bias and len(rule.shape) > 1 else rule.shape
    values = []
    for name in shape:
        if name == "*":
            return None
        v = dims.value(name)
        if v is None:
            return None
        values.append(v)
    return tuple(values)


def _check_shape(t: LazyTensor, rule: Rule, dims: Dims, expert: bool) -> None:
    want = _expected_shape(rule, dims, t.name.endswith(".bias"))
    if want is None:
        return
    if expert:
        want = want[1:]
    if tuple(t.shape) != want:
        raise FormatError(f"tensor {t.name} has shape {list(t.shape)} but config.json implies {list(want)}")


def _stacked(name: str, parts: list[LazyTensor]) -> LazyTensor:
    """Experts stacked along a new leading axis; loading holds this one tensor (all experts of it)."""
    qtype = parts[0].qtype
    parts = [p if p.qtype is qtype else _as_type(p, qtype) for p in parts]

    def load() -> np.ndarray:
        out = np.empty(sum(p.nbytes for p in parts), dtype=np.uint8)
        at = 0
        for p in parts:
            data = np.asarray(p.raw()).reshape(-1).view(np.uint8)
            out[at : at + data.size] = data
            at += data.size
        return out

    return LazyTensor(name, (len(parts), *parts[0].shape), qtype, load)


def hf_dims(config: Mapping[str, Any]) -> tuple[Family, Dims]:
    """The family of a config.json (``architectures``) and the dimensions llama.cpp's graph takes from it.

    Example:
        >>> family, dims = hf_dims({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
        ...     "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512})
        >>> family.gguf_arch, dims.head_dim
        ('llama', 64)
    """
    family = family_for_hf(config)
    if family.config_view is not None:
        config = family.config_view(config)
    return family, _dims_from_config(config, family)


def expected_shape(rule: Rule, dims: Dims) -> Optional[tuple[int, ...]]:
    """The shape of a weight (not a bias) of ``rule`` that ``dims`` imply, or None when they do not fix it.

    Example:
        >>> family, dims = hf_dims({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
        ...     "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512})
        >>> expected_shape(family.layer_tensors[-1], dims)
        (256, 512)
    """
    return _expected_shape(rule, dims, False)


def hf_metadata(
    config: Mapping[str, Any], sidecar: Mapping[str, bytes], name: Optional[str] = None, *,
    tokenizer_required: bool = False,
) -> tuple[dict[str, MetaValue], list[LazyTensor]]:
    """GGUF metadata of a config.json and the tensors its settings add (``rope_freqs``, LongRoPE factors).

    ``sidecar`` holds the tokenizer files (``tokenizer.json`` or ``tokenizer.model`` and their
    configs); without them, and unless ``tokenizer_required`` (what :func:`from_hf` asks), the
    ``tokenizer.*`` keys are left out except the special token ids config.json names, so a model that
    travelled without its tokenizer (an ONNX export) still gets the ids llama.cpp and to_hf need.

    Example:
        >>> config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_hidden_layers": 2,
        ...           "num_attention_heads": 4, "intermediate_size": 512, "eos_token_id": 2}
        >>> metadata, extra = hf_metadata(config, {})
        >>> metadata["llama.block_count"].value, metadata["tokenizer.ggml.eos_token_id"].value, extra
        (2, 2, [])
    """
    from .tokenizer import gguf_tokenizer_metadata

    family = family_for_hf(config)
    if family.config_view is not None:
        config = family.config_view(config)
    _check_activation(family, config)
    dims = _dims_from_config(config, family)
    arch = family.gguf_arch
    has_tokenizer = "tokenizer.json" in sidecar or "tokenizer.model" in sidecar
    tok = gguf_tokenizer_metadata(sidecar, config) if has_tokenizer or tokenizer_required else {}
    metadata: dict[str, MetaValue] = {
        "general.architecture": MetaValue(V.STRING, arch),
        "general.type": MetaValue(V.STRING, "model"),
    }
    if name:
        metadata["general.name"] = MetaValue(V.STRING, name)
    for p in family.params:
        metadata[f"{arch}.{p.key}"] = _param_forward(p, config)
    n_vocab = len(tok["tokenizer.ggml.tokens"].value) if "tokenizer.ggml.tokens" in tok else config.get("vocab_size", 0)
    forward = _Forward(config, dims, arch, sidecar, n_vocab, metadata, [])
    for hook in family.hooks:
        hook.forward(forward)
    if not tok:  # the special ids config.json names (the GGUF, and to_hf's config, keep them)
        for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                              ("pad_token_id", "padding_token_id")):
            if isinstance(config.get(key), int):
                metadata[f"tokenizer.ggml.{gguf_key}"] = _u32(config[key])
    metadata.update(tok)
    return metadata, list(forward.tensors)


def from_hf(ckpt: Checkpoint, name: Optional[str] = None) -> Checkpoint:
    """A checkpoint read from a Hugging Face directory → llama.cpp's names, metadata and tokenizer.

    Tensors keep their stored float type (1-D tensors become F32, as llama.cpp's converter writes
    them); choose output types afterwards (:func:`cast_checkpoint`, quantization).
    """
    if "config.json" not in ckpt.sidecar:
        raise FormatError("config.json is missing: not a Hugging Face model directory")
    try:
        config = json.loads(ckpt.sidecar["config.json"])
    except ValueError as e:
        raise FormatError(f"config.json: not valid JSON ({e})") from None
    wrapper = _multimodal(config)
    source = list(ckpt.tensors)
    if "text_config" in config:  # multimodal wrappers keep the language model's settings here
        config = {**config, **config["text_config"]}
    if wrapper is not None:
        config["architectures"] = [wrapper.text_class]
        source = _language_model(source, wrapper)
    metadata, extra = hf_metadata(config, ckpt.sidecar, name, tokenizer_required=True)
    family, dims = hf_dims(config)
    if family.config_view is not None:
        config = family.config_view(config)
    arch = family.gguf_arch
    source = _own_layout(family, source)

    plan = _hf_plan(family, dims)
    tensors: list[LazyTensor] = list(extra)
    groups: dict[str, list[Optional[LazyTensor]]] = {}
    tied = config.get("tie_word_embeddings", True)
    for t in source:
        if t.name.endswith(_BUFFERS) or t.name in family.dropped:
            continue
        entry = plan.get(t.name)
        if entry is None:
            raise FormatError(f"tensor {t.name} does not belong to a {family.name} checkpoint")
        rule, target, expert = entry
        if family.output in ("tied", "none") and rule.gguf == "output":
            if family.output == "tied" and tied:
                continue  # the same matrix as the embedding; llama.cpp reads token_embd
            raise FormatError(f"tensor {t.name}: llama.cpp's {arch} has no separate output matrix (untied lm_head)")
        if t.qtype not in FLOAT_TYPES:
            raise FormatError(f"tensor {t.name}: type {t.qtype.name} is not a float type")
        _check_shape(t, rule, dims, expert is not None)
        if expert is not None:
            group = groups.setdefault(target, [None] * dims.n_expert)
            group[expert] = t
            if all(p is not None for p in group):
                tensors.append(_stacked(target, group))  # type: ignore[arg-type]
                del groups[target]
            continue
        mapped = t.renamed(target)
        if rule.transform is not None:
            mapped = rule.transform.forward(mapped, dims)
        tensors.append(_as_type(mapped, QuantType.F32) if len(t.shape) == 1 else mapped)
    if family.output == "required" and not any(t.name == "output.weight" for t in tensors):
        raise FormatError(f"llama.cpp's {arch} graph needs its own output matrix; the checkpoint ties lm_head to the embedding")
    if groups:
        target, group = next(iter(groups.items()))
        missing = [i for i, p in enumerate(group) if p is None]
        raise FormatError(f"{target}: the checkpoint lacks experts {missing} of {dims.n_expert}")
    return Checkpoint(metadata, tensors, sidecar={})


def cast_checkpoint(ckpt: Checkpoint, dtype: QuantType) -> Checkpoint:
    """Every tensor of two or more dimensions to ``dtype`` (F32/F16/BF16); 1-D tensors stay F32."""
    tensors = [t if len(t.shape) < 2 else _as_type(t, dtype) for t in ckpt.tensors]
    return Checkpoint(dict(ckpt.metadata), tensors, dict(ckpt.sidecar))


# ---- GGUF → HF ----------------------------------------------------------------------------------


def _dims_from_gguf(ckpt: Checkpoint, arch: str) -> Dims:
    g = lambda key, default=None: ckpt.get(f"{arch}.{key}", default)  # noqa: E731
    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if g(k) is None]
    if missing:
        raise FormatError(f"GGUF lacks required metadata: {', '.join(missing)}")
    # per-layer sizes (OpenELM's arrays) as their largest, as a config_view gives them
    widest = lambda value: int(max(value)) if np.ndim(value) else value  # noqa: E731
    hidden, n_head = g("embedding_length"), widest(g("attention.head_count"))
    types = next((t for t in ckpt.tensors if t.name == "token_types.weight"), None)
    return Dims(
        hidden=hidden,
        n_layer=g("block_count"),
        n_head=n_head,
        n_head_kv=widest(g("attention.head_count_kv", n_head)),
        head_dim=g("attention.key_length") or hidden // n_head,
        ff=widest(g("feed_forward_length")),
        n_expert=g("expert_count", 0),
        ctx=g("context_length", 0),
        n_types=types.shape[0] if types is not None else 0,
    )


def _split_expert(t: LazyTensor, name: str, x: int) -> LazyTensor:
    """Expert ``x`` of a stacked tensor: a slice of its bytes (rows are whole blocks in any type)."""
    per = t.nbytes // t.shape[0]
    shape = tuple(t.shape[1:])
    return LazyTensor(name, shape, t.qtype, lambda: np.asarray(t.raw()).reshape(-1)[x * per : (x + 1) * per])


def _backward(ckpt: Checkpoint, dtype: Optional[QuantType]) -> tuple[Family, _Backward]:
    """The family of a llama.cpp-style checkpoint and its config.json, built by the family's hooks
    (which also name the GGUF tensors config.json holds and the extra sidecar files)."""
    arch = ckpt.architecture
    family = family_for_gguf(arch, metadata=ckpt.metadata)
    dims = _dims_from_gguf(ckpt, arch)
    names = {t.name for t in ckpt.tensors}
    token_embd = next((t for t in ckpt.tensors if t.name == "token_embd.weight"), None)
    if token_embd is None:
        raise FormatError("GGUF has no token_embd.weight")
    bos, eos = ckpt.get("tokenizer.ggml.bos_token_id"), ckpt.get("tokenizer.ggml.eos_token_id")
    config: dict[str, Any] = {"architectures": [family.hf_classes[0]], "model_type": family.hf_model_type}
    for p in family.params:
        value = ckpt.get(f"{arch}.{p.key}", p.default)
        if value is None and p.fallback is not None:
            value = config.get(p.fallback)
        config[p.hf] = value
    config["vocab_size"] = token_embd.shape[0]
    if family.output != "none":
        config["tie_word_embeddings"] = "output.weight" not in names
    config.update(family.hf_config)
    if dtype is not None:
        config["dtype"] = {QuantType.F32: "float32", QuantType.F16: "float16", QuantType.BF16: "bfloat16"}[dtype]
    if not family.encoder:
        config["bos_token_id"] = bos
        config["eos_token_id"] = eos
        # explicit even when absent: some config classes default to ids of the real vocabulary (Phi-3: 32000)
        config["pad_token_id"] = ckpt.get("tokenizer.ggml.padding_token_id")
    backward = _Backward(ckpt, dims, arch, config, {}, set(), names)
    for hook in family.hooks:
        hook.backward(backward)
    return family, backward


def _concatenated_rows(name: str, parts: Sequence[LazyTensor]) -> LazyTensor:
    """One tensor holding ``parts`` (same type and width) row block after row block; loading holds it alone."""
    def load() -> np.ndarray:
        return np.concatenate([np.asarray(p.raw()).reshape(-1).view(np.uint8) for p in parts])

    rows = sum(p.shape[0] for p in parts)
    return LazyTensor(name, (rows, *parts[0].shape[1:]), parts[0].qtype, load)


def _hf_fused(family: Family, tensors: list[LazyTensor]) -> list[LazyTensor]:
    """The tensors the family's HF layout keeps fused (:attr:`Family.hf_fused`), in place of their parts."""
    if not family.hf_fused:
        return tensors
    by_name = {t.name: t for t in tensors}
    replaced: dict[str, Optional[LazyTensor]] = {}  # a part's name → the fused tensor at the first part, None after
    for t in tensors:
        head, _, rest = t.name.partition(f"{family.layer_prefix}.")
        layer, _, inner = rest.partition(".")
        fused = next((f for f in family.hf_fused if f.parts[0] == inner), None) if not head and layer.isdigit() else None
        if fused is None:
            continue
        prefix = f"{family.layer_prefix}.{layer}."
        missing = [prefix + p for p in fused.parts if prefix + p not in by_name]
        if missing:
            raise FormatError(f"GGUF → HF: {', '.join(missing)} missing to fuse {prefix + fused.hf}")
        parts = [by_name[prefix + p] for p in fused.parts]
        replaced[t.name] = _concatenated_rows(prefix + fused.hf, parts)
        replaced.update({p.name: None for p in parts[1:]})
    out = []
    for t in tensors:
        kept = replaced.get(t.name, t)
        if kept is not None:
            out.append(kept)
    return out


def hf_config(ckpt: Checkpoint) -> dict[str, Any]:
    """The Hugging Face config.json of a llama.cpp-style checkpoint (what :func:`to_hf` writes, without
    ``dtype``); it needs no tokenizer, so a writer can store it beside weights of any format.

    Example:
        >>> hf_config(canonical)["architectures"]        # doctest: +SKIP
        ['LlamaForCausalLM']
    """
    return _backward(ckpt, None)[1].config


def to_hf(ckpt: Checkpoint, dtype: QuantType = QuantType.BF16) -> Checkpoint:
    """A llama.cpp-style checkpoint → HF names, ``config.json``, ``generation_config.json`` and tokenizer files.

    Quantized tensors are dequantized; every tensor is stored as ``dtype`` (norms included, as
    transformers saves them).
    """
    from .tokenizer import hf_tokenizer_files

    family, backward = _backward(ckpt, dtype)
    dims, config = backward.dims, backward.config
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")

    plan: dict[str, tuple[Rule, str]] = {}
    for rule in family.global_tensors:
        for s in (".weight", ".bias"):
            plan[rule.gguf + s] = (rule, rule.hf + s)
    for i in range(dims.n_layer):
        for rule in family.layer_tensors:
            for s in (".weight", ".bias"):
                plan[f"blk.{i}.{rule.gguf}{s}"] = (rule, _hf_layer_name(family, i, rule.hf) + s)
    tensors = []
    for t in ckpt.tensors:
        if t.name in backward.skip:
            continue
        entry = plan.get(t.name)
        if entry is None:
            raise FormatError(f"tensor {t.name} has no place in a {family.name} checkpoint")
        rule, target = entry
        if rule.experts:
            if len(t.shape) != 3 or t.shape[0] != dims.n_expert:
                raise FormatError(f"tensor {t.name} has shape {list(t.shape)}, expected {dims.n_expert} stacked experts")
            for x in range(dims.n_expert):
                part = _split_expert(t, target.format(x=x), x)
                tensors.append(_as_type(_as_float(part), dtype))
            continue
        src = _as_float(t)
        if rule.transform is not None:
            src = rule.transform.backward(src, dims)
        tensors.append(_as_type(src.renamed(target), dtype))
    tensors = _hf_fused(family, tensors)
    sidecar = {"config.json": json.dumps(config, indent=2).encode()}
    if not family.encoder:
        generation = {"bos_token_id": bos, "eos_token_id": eos}
        sidecar["generation_config.json"] = json.dumps(
            {k: v for k, v in generation.items() if v is not None}, indent=2
        ).encode()
    sidecar.update(backward.sidecar)
    sidecar.update(hf_tokenizer_files(ckpt.metadata))
    return Checkpoint({}, tensors, sidecar)
