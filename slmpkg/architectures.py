"""Model families: how a Hugging Face checkpoint's config and tensor names map to llama.cpp's.

The canonical form of a :class:`~slmpkg.checkpoint.Checkpoint` inside slmpkg is llama.cpp's: GGUF
metadata keys and GGUF tensor names. :func:`from_hf` maps a checkpoint read from a Hugging Face
directory (HF names, ``config.json`` in the sidecar) to it; :func:`to_hf` maps back. Both are lazy:
they rename and wrap loaders, and data moves only when a writer asks for it.

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
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
from gguf import GGUFValueType as V

from .checkpoint import Checkpoint, LazyTensor, MetaValue
from .errors import FormatError
from .quant import QuantType

FLOAT_TYPES = (QuantType.F32, QuantType.F16, QuantType.BF16)


@dataclass(frozen=True)
class Family:
    """One decoder family: llama.cpp's architecture name, the HF classes it covers, its tensors."""

    gguf_arch: str
    hf_classes: tuple[str, ...]  # the first is what to_hf writes
    hf_model_type: str
    # llama.cpp's llama graph expects q/k rows of each head interleaved (rotary pairs adjacent);
    # HF's stores the two rotary halves apart, so those two weights are permuted on the way in
    permute_qk: bool
    # per-layer tensors: (GGUF name inside blk.N, HF name inside model.layers.N)
    layer_tensors: tuple[tuple[str, str], ...]


_LLAMA_LAYER = (
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), "llama", True, _LLAMA_LAYER),
    Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", False, _LLAMA_LAYER),
    Family(
        "qwen3", ("Qwen3ForCausalLM",), "qwen3", False,
        _LLAMA_LAYER + (("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")),
    ),
)
_GLOBAL_TENSORS = (
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
)


def supported_hf_classes() -> list[str]:
    return [c for f in FAMILIES for c in f.hf_classes]


def family_for_hf(config: Mapping[str, Any], source: str = "config.json") -> Family:
    classes = config.get("architectures") or []
    for family in FAMILIES:
        if any(c in family.hf_classes for c in classes):
            return family
    raise FormatError(
        f"{source}: unsupported architecture {', '.join(classes) or '(none given)'}; "
        f"supported: {', '.join(supported_hf_classes())}"
    )


def family_for_gguf(arch: Optional[str], source: str = "GGUF") -> Family:
    for family in FAMILIES:
        if family.gguf_arch == arch:
            return family
    raise FormatError(
        f"{source}: unsupported architecture {arch!r}; supported: {', '.join(f.gguf_arch for f in FAMILIES)}"
    )


# ---- tensor transforms ----------------------------------------------------------------------------


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


def _cast_loader(src: LazyTensor, target: QuantType) -> Callable[[], np.ndarray]:
    from . import quant

    def load() -> np.ndarray:
        return quant.quantize(src.float32().reshape(-1, src.shape[-1] if src.shape else 1), target).reshape(-1)

    return load


def _as_type(t: LazyTensor, target: QuantType) -> LazyTensor:
    if t.qtype is target:
        return t
    return LazyTensor(t.name, t.shape, target, _cast_loader(t, target))


# ---- HF → GGUF ----------------------------------------------------------------------------------


def _u32(v: int) -> MetaValue:
    return MetaValue(V.UINT32, int(v))


def _f32(v: float) -> MetaValue:
    return MetaValue(V.FLOAT32, float(v))


def _rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; older configs in ``rope_theta``/``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    if "rope_theta" not in params and "rope_theta" in config:
        params["rope_theta"] = config["rope_theta"]
    scaling = config.get("rope_scaling") or {}
    for k, v in scaling.items():
        params.setdefault("rope_type" if k == "type" else k, v)
    return params


def llama3_rope_factors(config: Mapping[str, Any], head_dim: int) -> Optional[np.ndarray]:
    """The ``rope_freqs`` factors llama.cpp applies for Llama 3.1+ rope scaling, or None."""
    rope = _rope_parameters(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
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


def _hparams_metadata(family: Family, config: Mapping[str, Any], n_vocab: int) -> dict[str, MetaValue]:
    a = family.gguf_arch
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = _rope_parameters(config)
    md = {
        f"{a}.block_count": _u32(config["num_hidden_layers"]),
        f"{a}.context_length": _u32(config.get("max_position_embeddings", 2048)),
        f"{a}.embedding_length": _u32(config["hidden_size"]),
        f"{a}.feed_forward_length": _u32(config["intermediate_size"]),
        f"{a}.attention.head_count": _u32(n_head),
        f"{a}.attention.head_count_kv": _u32(config.get("num_key_value_heads") or n_head),
        f"{a}.rope.freq_base": _f32(rope.get("rope_theta", 10000.0)),
        f"{a}.attention.layer_norm_rms_epsilon": _f32(config.get("rms_norm_eps", 1e-6)),
    }
    if config.get("head_dim"):
        md[f"{a}.attention.key_length"] = _u32(head_dim)
        md[f"{a}.attention.value_length"] = _u32(head_dim)
    if family.gguf_arch == "llama":
        md[f"{a}.vocab_size"] = _u32(n_vocab)
        md[f"{a}.rope.dimension_count"] = _u32(head_dim)
    rope_type = str(rope.get("rope_type", "default")).lower()
    if rope_type == "linear" and rope.get("factor"):
        md[f"{a}.rope.scaling.type"] = MetaValue(V.STRING, "linear")
        md[f"{a}.rope.scaling.factor"] = _f32(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor"):
        md[f"{a}.rope.scaling.type"] = MetaValue(V.STRING, "yarn")
        md[f"{a}.rope.scaling.factor"] = _f32(rope["factor"])
        md[f"{a}.rope.scaling.original_context_length"] = _u32(rope["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):
        raise FormatError(f"config.json: rope scaling type {rope_type!r} is not supported yet")
    return md


def from_hf(ckpt: Checkpoint, name: Optional[str] = None) -> Checkpoint:
    """A checkpoint read from a Hugging Face directory → llama.cpp's names, metadata and tokenizer.

    Tensors keep their stored float type (1-D tensors become F32, as llama.cpp's converter writes
    them); choose output types afterwards (:func:`cast_checkpoint`, quantization).
    """
    from .tokenizer import gguf_tokenizer_metadata

    if "config.json" not in ckpt.sidecar:
        raise FormatError("config.json is missing: not a Hugging Face model directory")
    try:
        config = json.loads(ckpt.sidecar["config.json"])
    except ValueError as e:
        raise FormatError(f"config.json: not valid JSON ({e})") from None
    if "text_config" in config:  # multimodal wrappers keep the language model's settings here
        config = {**config, **config["text_config"]}
    family = family_for_hf(config)
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    n_layer = config["num_hidden_layers"]

    tok = gguf_tokenizer_metadata(ckpt.sidecar, config)
    n_vocab = len(tok["tokenizer.ggml.tokens"].value) if "tokenizer.ggml.tokens" in tok else config["vocab_size"]
    metadata: dict[str, MetaValue] = {
        "general.architecture": MetaValue(V.STRING, family.gguf_arch),
        "general.type": MetaValue(V.STRING, "model"),
    }
    if name:
        metadata["general.name"] = MetaValue(V.STRING, name)
    metadata.update(_hparams_metadata(family, config, n_vocab))
    metadata.update(tok)

    hf_to_gguf: dict[str, str] = {}
    for gguf_name, hf_name in _GLOBAL_TENSORS:
        for suffix in (".weight", ".bias"):
            hf_to_gguf[hf_name + suffix] = gguf_name + suffix
    for i in range(n_layer):
        for gguf_name, hf_name in family.layer_tensors:
            for suffix in (".weight", ".bias"):
                hf_to_gguf[f"model.layers.{i}.{hf_name}{suffix}"] = f"blk.{i}.{gguf_name}{suffix}"

    tensors: list[LazyTensor] = []
    rope = llama3_rope_factors(config, config.get("head_dim") or config["hidden_size"] // n_head)
    if rope is not None:
        tensors.append(LazyTensor.from_array("rope_freqs.weight", rope))
    for t in ckpt.tensors:
        if t.name.endswith("rotary_emb.inv_freq") or t.name.endswith("position_ids"):
            continue  # buffers transformers recomputes
        target = hf_to_gguf.get(t.name)
        if target is None:
            raise FormatError(f"tensor {t.name} does not belong to a {family.hf_classes[0]} checkpoint")
        if t.qtype not in FLOAT_TYPES:
            raise FormatError(f"tensor {t.name}: type {t.qtype.name} is not a float type")
        _check_shape(t, target, config, family)
        loader = t.raw
        if family.permute_qk and (".attn_q." in target or ".attn_k." in target):
            heads = n_head if ".attn_q." in target else n_head_kv
            loader = _same_type_loader(t, lambda w, h=heads: permute_qk(w, h))
        mapped = LazyTensor(target, t.shape, t.qtype, loader)
        tensors.append(_as_type(mapped, QuantType.F32) if len(t.shape) == 1 else mapped)
    return Checkpoint(metadata, tensors, sidecar={})


def _check_shape(t: LazyTensor, target: str, config: Mapping[str, Any], family: Family) -> None:
    hidden = config["hidden_size"]
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // n_head
    kv = (config.get("num_key_value_heads") or n_head) * head_dim
    expected = {
        "attn_q.weight": (n_head * head_dim, hidden),
        "attn_k.weight": (kv, hidden),
        "attn_v.weight": (kv, hidden),
        "attn_output.weight": (hidden, n_head * head_dim),
        "ffn_gate.weight": (config["intermediate_size"], hidden),
        "ffn_up.weight": (config["intermediate_size"], hidden),
        "ffn_down.weight": (hidden, config["intermediate_size"]),
        "attn_norm.weight": (hidden,),
        "ffn_norm.weight": (hidden,),
        "output_norm.weight": (hidden,),
    }
    key = target.split(".", 2)[-1] if target.startswith("blk.") else target
    want = expected.get(key)
    if key in ("token_embd.weight", "output.weight"):
        want = (t.shape[0], hidden)
    if want is not None and tuple(t.shape) != want:
        raise FormatError(
            f"tensor {t.name} has shape {list(t.shape)} but config.json implies {list(want)}"
        )


def cast_checkpoint(ckpt: Checkpoint, dtype: QuantType) -> Checkpoint:
    """Every tensor of two or more dimensions to ``dtype`` (F32/F16/BF16); 1-D tensors stay F32."""
    tensors = [t if len(t.shape) < 2 else _as_type(t, dtype) for t in ckpt.tensors]
    return Checkpoint(dict(ckpt.metadata), tensors, dict(ckpt.sidecar))


# ---- GGUF → HF ----------------------------------------------------------------------------------


def to_hf(ckpt: Checkpoint, dtype: QuantType = QuantType.BF16) -> Checkpoint:
    """A llama.cpp-style checkpoint → HF names, ``config.json``, ``generation_config.json`` and tokenizer files.

    Quantized tensors are dequantized; every tensor is stored as ``dtype`` (norms included, as
    transformers saves them).
    """
    from .tokenizer import hf_tokenizer_files

    arch = ckpt.architecture
    family = family_for_gguf(arch)
    g = lambda key, default=None: ckpt.get(f"{arch}.{key}", default)  # noqa: E731
    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if g(k) is None]
    if missing:
        raise FormatError(f"GGUF lacks required metadata: {', '.join(missing)}")
    n_layer, hidden, n_head = g("block_count"), g("embedding_length"), g("attention.head_count")
    n_head_kv = g("attention.head_count_kv", n_head)
    names = {t.name for t in ckpt.tensors}
    head_dim = g("attention.key_length") or hidden // n_head
    token_embd = next((t for t in ckpt.tensors if t.name == "token_embd.weight"), None)
    if token_embd is None:
        raise FormatError("GGUF has no token_embd.weight")
    bos, eos = ckpt.get("tokenizer.ggml.bos_token_id"), ckpt.get("tokenizer.ggml.eos_token_id")
    config: dict[str, Any] = {
        "architectures": [family.hf_classes[0]],
        "model_type": family.hf_model_type,
        "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "max_position_embeddings": g("context_length", 2048),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": g("rope.freq_base", 10000.0),
        "vocab_size": token_embd.shape[0],
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": any(n.endswith("attn_q.bias") for n in names),
        "mlp_bias": False,
        "dtype": {QuantType.F32: "float32", QuantType.F16: "float16", QuantType.BF16: "bfloat16"}[dtype],
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if g("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    if "rope_freqs.weight" in names:
        raise FormatError("GGUF → HF: Llama 3 rope scaling (rope_freqs) cannot be recovered into config.json yet")

    gguf_to_hf = {g_name + s: hf_name + s for g_name, hf_name in _GLOBAL_TENSORS for s in (".weight", ".bias")}
    for i in range(n_layer):
        for g_name, hf_name in family.layer_tensors:
            for s in (".weight", ".bias"):
                gguf_to_hf[f"blk.{i}.{g_name}{s}"] = f"model.layers.{i}.{hf_name}{s}"
    tensors = []
    for t in ckpt.tensors:
        target = gguf_to_hf.get(t.name)
        if target is None:
            raise FormatError(f"tensor {t.name} has no place in a {family.hf_classes[0]} checkpoint")
        src = t if t.qtype in FLOAT_TYPES else _as_type(t, QuantType.F32)
        if family.permute_qk and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = n_head if ".attn_q." in t.name else n_head_kv
            src = LazyTensor(t.name, t.shape, src.qtype, _same_type_loader(src, lambda w, h=heads: unpermute_qk(w, h)))
        tensors.append(_as_type(LazyTensor(target, t.shape, src.qtype, src.raw), dtype))
    generation = {"bos_token_id": bos, "eos_token_id": eos}
    sidecar = {
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2).encode(),
    }
    sidecar.update(hf_tokenizer_files(ckpt.metadata))
    return Checkpoint({}, tensors, sidecar)
