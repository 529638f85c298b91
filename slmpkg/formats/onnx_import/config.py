"""The Hugging Face config.json of an ONNX decoder: the one beside it or embedded in it, completed from
genai_config.json and what the graph computes with (head counts, windows, soft-caps, multipliers, rope caches)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import FormatError
from ...quant import QuantType
from ..onnx_graph import CONFIG_PROPERTY
from .graph import _Graph, _attr, _layer_of, _parts, _scalar
from .rope import _llama3_rope, _longrope_factors, _nice, _rope_base
from .stored import _Stored, _as_f64, _as_stored_floats


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
    "phi": "PhiForCausalLM",
    "granite": "GraniteForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


# the HF model_type of each class this reads
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
                "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3", "GraniteForCausalLM": "granite",
                "MixtralForCausalLM": "mixtral", "PhiForCausalLM": "phi", "Starcoder2ForCausalLM": "starcoder2",
                "OpenELMForCausalLM": "openelm"}

# config.json entries of the LayerNorm and GELU families that the graph's ops imply (the epsilon's key, the
# activation the graph's Gelu(tanh) is in each family's own terms)
_FAMILY_KEYS = {
    "PhiForCausalLM": {"eps": "layer_norm_eps", "hidden_act": "gelu_new", "qk_layernorm": False},
    "Starcoder2ForCausalLM": {"eps": "norm_epsilon", "hidden_act": "gelu_pytorch_tanh", "use_bias": True},
}


_GEMMAS = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


SUPPORTED_CLASSES = tuple(_MODEL_TYPES)


_ROTARY_OPS = {"GroupQueryAttention", "RotaryEmbedding", "PagedAttention"}
# the decoder's norms (inside its layers: the epsilon and the kind of norm are read from them)
_NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization"}


def _json_file(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a JSON object")
    return data


def _genai_config(path: Path) -> Optional[dict[str, Any]]:
    """onnxruntime-genai's genai_config.json at ``path`` (None when absent), its ``model`` and
    ``model.decoder`` sections checked to be objects."""
    genai = _json_file(path)
    if genai is None:
        return None
    model = genai.get("model", {})
    if not isinstance(model, dict) or not isinstance(model.get("decoder", {}), dict):
        raise FormatError(f"{path}: model and model.decoder are not objects")
    return genai


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
        self.heads: dict[int, tuple[int, int]] = {}  # (query, key/value) heads by layer (OpenELM's differ)
        self.layer_norm = False  # LayerNorm (mean and variance) rather than RMS norm
        for node in g.nodes:
            if node.op_type == "GroupQueryAttention":
                layer = _layer_of(node.name)
                if layer is not None:
                    self.windows[layer] = int(_attr(node, "local_window_size", -1))
                    self.heads[layer] = (int(_attr(node, "num_heads")), int(_attr(node, "kv_num_heads")))
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
            if node.op_type in ("LayerNormalization", "SkipLayerNormalization") and _layer_of(node.name) is not None:
                self.layer_norm = True
            if node.op_type in _NORM_OPS and self.eps is None and _layer_of(node.name) is not None:
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


def _family_class(g: _Graph, facts: _Facts, kind: Any) -> str:
    """The HF class from genai_config.json's ``type`` and what the graph holds: slmpkg writes Mistral as
    ``llama`` (one GGUF architecture) and Mixtral, StarCoder2 and OpenELM as the generic ``decoder``;
    experts, windows, LayerNorms and per-head norms tell."""
    if facts.moe:
        return "MixtralForCausalLM"
    if kind == "llama" and any(w > 0 for w in facts.windows.values()):
        return "MistralForCausalLM"
    if kind == "decoder" and facts.layer_norm:
        return "Starcoder2ForCausalLM"
    if kind == "decoder" and any("q_norm" in _parts(name) for name in g.inits):
        return "OpenELMForCausalLM"
    if not isinstance(kind, str) or kind not in _GENAI_TYPES:
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
    model = (genai or {}).get("model", {})
    decoder = model.get("decoder", {})
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
    n_head = cfg["num_attention_heads"]
    if not isinstance(n_head, int) or isinstance(n_head, bool) or n_head < 1:
        raise FormatError(f"{g.file}: {n_head!r} attention heads (config.json, genai_config.json or the graph's "
                          "attention nodes) is not a positive number")
    fill("head_dim", decoder.get("head_size"), q_rows // n_head if q_rows else None, hidden // n_head)
    fill("intermediate_size", shapes.get("blk.0.ffn_gate.weight", (None,))[0],
         shapes.get("blk.0.ffn_gate_exps.weight", (None, None))[1], shapes.get("blk.0.ffn_up.weight", (None,))[0])
    if family == "MixtralForCausalLM":
        fill("num_local_experts", shapes.get("blk.0.ffn_gate_exps.weight", (None,))[0])
    own = _FAMILY_KEYS.get(family, {})
    fill(own.get("eps", "rms_norm_eps"), facts.eps)
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
        if family == "OpenELMForCausalLM":
            cfg = _openelm_config(g, facts, cfg, shapes, n_layer)
    cfg.setdefault("model_type", _MODEL_TYPES[family])
    for key, value in own.items():
        if key != "eps":
            cfg.setdefault(key, value)
    if family in _GEMMAS:
        cfg.setdefault("hidden_activation" if family != "GemmaForCausalLM" else "hidden_act", "gelu_pytorch_tanh")
    else:
        cfg.setdefault("hidden_act", "silu")
    return cfg


def _openelm_config(g: _Graph, facts: _Facts, generic: dict[str, Any], shapes: Mapping[str, tuple[int, ...]],
                    n_layer: int) -> dict[str, Any]:
    """OpenELM's own config.json from the graph: per-layer heads from each GroupQueryAttention, MLP widths
    from each gate projection, and sizing rules that give them (:func:`slmpkg.architectures.openelm_config`)."""
    from ... import architectures

    missing = [i for i in range(n_layer) if i not in facts.heads or f"blk.{i}.ffn_gate.weight" not in shapes]
    if missing:
        raise FormatError(f"{g.file}: OpenELM layers {missing} lack a GroupQueryAttention or a gate projection")
    rope = generic.get("rope_parameters") or {}
    base = rope.get("rope_theta", generic.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or "partial_rotary_factor" in generic:
        raise FormatError(f"{g.file}: OpenELM rotates whole heads with no rope scaling; the graph's caches do otherwise")
    sizes = architectures.openelm_config(
        generic["hidden_size"], int(generic["head_dim"]), [facts.heads[i][0] for i in range(n_layer)],
        [facts.heads[i][1] for i in range(n_layer)], [shapes[f"blk.{i}.ffn_gate.weight"][0] for i in range(n_layer)],
        int(generic["max_position_embeddings"]), float(base), source=str(g.file))
    kept = ("architectures", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "num_hidden_layers")
    return {**{k: generic[k] for k in kept if k in generic}, **sizes}


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
    elif family in ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM", "Starcoder2ForCausalLM"):
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
    try:
        base, factor, width = _fit(g, g.inits[cos_name], g.inits[sin_name])
    except FormatError:
        if family not in ("LlamaForCausalLM", "MistralForCausalLM") or local_names:
            raise
        # per-frequency factors: Llama 3.1+'s (a Llama 3.x graph written without its config)
        base, llama3 = _fit_llama3(g, g.inits[cos_name], g.inits[sin_name])
        cfg["rope_parameters"] = {**llama3, "rope_theta": base}
        return
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


def _cache_eps(cos: _Stored, positions: int) -> float:
    """How far recomputed caches may be from stored ones: the caches' own rounding, and a float32 writer's
    (the builder's) error growing with position."""
    return {QuantType.F16: 2e-3, QuantType.BF16: 1.6e-2}.get(cos.qtype, 1e-6) + positions * 2.5e-7


def _cache_pair(g: _Graph, cos: _Stored, sin: _Stored) -> tuple[np.ndarray, np.ndarray]:
    """A cos/sin cache pair as float64, checked: two finite [positions, dim/2] arrays of one shape."""
    if len(cos.shape) != 2 or cos.shape != sin.shape or 0 in cos.shape:
        raise FormatError(f"{g.file}: rotary caches {cos.name} {list(cos.shape)} and {sin.name} {list(sin.shape)} "
                          "are not two [positions, dim/2] arrays of one shape")
    c, s = _as_f64(cos), _as_f64(sin)
    if not (np.isfinite(c).all() and np.isfinite(s).all()):
        raise FormatError(f"{g.file}: rotary caches {cos.name}, {sin.name} hold values that are not finite")
    return c, s


def _fit(g: _Graph, cos: _Stored, sin: _Stored) -> tuple[float, float, int]:
    """(base, linear factor, cache width) of one cache pair, within what its stored type can say."""
    c, s = _cache_pair(g, cos, sin)
    base, factor = _rope_base(c, s, _cache_eps(cos, c.shape[0]), f"{g.file}: {cos.name}")
    return base, factor, c.shape[1]


def _fit_llama3(g: _Graph, cos: _Stored, sin: _Stored) -> tuple[float, dict[str, Any]]:
    """(base, Llama 3 rope parameters) of one cache pair."""
    c, s = _cache_pair(g, cos, sin)
    return _llama3_rope(c, s, _cache_eps(cos, c.shape[0]), f"{g.file}: {cos.name}")


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
        _cache_pair(g, cos, sin)
        stored_cos = _as_stored_floats(cos)
        factors, magnitudes[kind] = _longrope_factors(stored_cos, _as_stored_floats(sin), base, f"{g.file}: {cos.name}")
        stored_type = stored_cos.dtype.type
        rope[f"{kind}_factor"] = [float(f) for f in factors]
    width = caches["long"][0].shape[1]
    context = caches["long"][0].shape[0]
    if not original >= 2:  # its logarithm divides
        raise FormatError(f"{g.where(choice)}: LongRoPE's original context {original} is not a length above 1")
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
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{g.file}: model property {CONFIG_PROPERTY} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{g.file}: model property {CONFIG_PROPERTY} is not a JSON object")
    return data
