"""llama.cpp's multimodal projector GGUF ("mmproj") of a multimodal Hugging Face checkpoint.

llama.cpp runs a multimodal model from two files: the language model's GGUF (what
:func:`slmpkg.architectures.from_hf` makes of the checkpoint) and an ``mmproj`` GGUF of architecture
``clip`` holding the vision encoder and the projector into the language model's embedding space, which
its ``mtmd`` library loads beside the text model. :func:`from_hf` makes the second one: the same lazy
mapping as the language model's (HF names → llama.cpp's, stored types kept), with the ``clip.*`` keys
llama.cpp's loader reads.

Each supported wrapper class is data (:class:`VisionTower`): its tensors as ``(GGUF name, HF name)``
rows (``{i}`` for the encoder layer), the values llama.cpp wants changed (Gemma's RMS norm weight
stored as ``1 + w``) and the projector type. Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP
encoder (patch convolution, learned positions, LayerNorm blocks with biased attention and a GELU MLP,
a final LayerNorm), then average pooling to ``mm_tokens_per_image`` tokens, an RMS norm and a matrix
into the text model's hidden size. The patch convolution, the positions and the projection matrix
are written as F32 (exact for any float source), as llama.cpp's converter keeps them out of reduced
types.

Example:
    >>> from slmpkg.formats import gguf, safetensors
    >>> vision = from_hf(safetensors.read("gemma-3-4b-it"))                # doctest: +SKIP
    >>> gguf.write("mmproj-gemma-3-4b-it.gguf", vision)                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, cast

from gguf import GGUFValueType as V

from .architectures import Dims, Shift
from .checkpoint import Checkpoint, LazyTensor, MetaValue
from .errors import FormatError
from .quant import QuantType

__all__ = ["FLOAT_TYPES", "VisionTower", "TOWERS", "supported_classes", "from_hf"]

FLOAT_TYPES = (QuantType.F32, QuantType.F16, QuantType.BF16)
_PLUS_ONE = Shift(1.0)  # Gemma's RMS norms multiply by 1 + w; llama.cpp's by the stored weight


@dataclass(frozen=True)
class VisionTower:
    """The mmproj layout of one multimodal class: llama.cpp's projector type, the tensors (full names,
    ``{i}``: the encoder layer), which of them llama.cpp stores as ``1 + w`` and which as F32."""

    hf_class: str
    projector_type: str
    tensors: tuple[tuple[str, str], ...]
    layer_tensors: tuple[tuple[str, str], ...]
    plus_one: tuple[str, ...] = ()
    as_f32: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()  # HF name prefixes of tower tensors the model does not compute with
    activation: str = "gelu_pytorch_tanh"  # the encoder MLP's hidden_act: llama.cpp's GELU (tanh approximation)
    # preprocessor_config.json's normalization when the checkpoint has none (the image processor's defaults)
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)


_SIGLIP = "vision_tower"
TOWERS: tuple[VisionTower, ...] = (
    VisionTower(
        "Gemma3ForConditionalGeneration", "gemma3",
        tensors=(
            ("v.patch_embd.weight", f"{_SIGLIP}.embeddings.patch_embedding.weight"),
            ("v.patch_embd.bias", f"{_SIGLIP}.embeddings.patch_embedding.bias"),
            ("v.position_embd.weight", f"{_SIGLIP}.embeddings.position_embedding.weight"),
            ("v.post_ln.weight", f"{_SIGLIP}.post_layernorm.weight"),
            ("v.post_ln.bias", f"{_SIGLIP}.post_layernorm.bias"),
            ("mm.soft_emb_norm.weight", "multi_modal_projector.mm_soft_emb_norm.weight"),
            # a bare parameter (HF multiplies by it: [vision hidden, text hidden]), which clip's graph transposes
            ("mm.input_projection.weight", "multi_modal_projector.mm_input_projection_weight"),
        ),
        layer_tensors=tuple(
            (f"v.blk.{{i}}.{gguf}.{suffix}", f"{_SIGLIP}.encoder.layers.{{i}}.{hf}.{suffix}")
            for gguf, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                             ("attn_v", "self_attn.v_proj"), ("attn_out", "self_attn.out_proj"),
                             ("ln1", "layer_norm1"), ("ln2", "layer_norm2"),
                             ("ffn_up", "mlp.fc1"), ("ffn_down", "mlp.fc2"))
            for suffix in ("weight", "bias")
        ),
        plus_one=("mm.soft_emb_norm.weight",),
        as_f32=("v.patch_embd.weight", "v.position_embd.weight", "mm.input_projection.weight"),
        # SigLIP's pooling head, which Gemma 3 does not compute with (it reads the last hidden state)
        unused=(f"{_SIGLIP}.head.",),
    ),
)


def _hf_name(name: str) -> str:
    """A tower tensor's name in the tables' layout. Three are in use: the Hub's checkpoints
    (``vision_tower.vision_model.…``), transformers 5's original-format save (``vision_tower.…``) and its
    own (``model.vision_tower.…``, ``model.multi_modal_projector.…``)."""
    if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
        name = name[len("model."):]
    if name.startswith("vision_tower.vision_model."):
        name = "vision_tower." + name[len("vision_tower.vision_model."):]
    return name


def supported_classes() -> list[str]:
    return [t.hf_class for t in TOWERS]


def _tower(config: Mapping[str, Any]) -> VisionTower:
    classes = config.get("architectures") or []
    tower = next((t for t in TOWERS if t.hf_class in classes), None)
    if tower is None:
        raise FormatError(f"config.json: {', '.join(classes) or '(no architectures)'} has no vision tower slmpkg "
                          f"writes as an mmproj GGUF (supported: {', '.join(supported_classes())})")
    return tower


def _u32(v: int) -> MetaValue:
    return MetaValue(V.UINT32, int(v))


def _f32(v: float) -> MetaValue:
    return MetaValue(V.FLOAT32, float(v))


def _metadata(tower: VisionTower, config: Mapping[str, Any], sidecar: Mapping[str, bytes],
              name: Optional[str]) -> dict[str, MetaValue]:
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    missing = [f"vision_config.{k}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "image_size", "patch_size") if k not in vision]
    missing += [] if "hidden_size" in text else ["text_config.hidden_size"]
    if missing:
        raise FormatError(f"config.json: the vision tower needs {', '.join(missing)}")
    act = vision.get("hidden_act", tower.activation)
    if act != tower.activation:
        raise FormatError(f"config.json: vision_config.hidden_act={act!r}, but llama.cpp's {tower.projector_type} "
                          f"encoder computes {tower.activation}")
    side = vision["image_size"] // vision["patch_size"]
    tokens = config.get("mm_tokens_per_image", 256)
    per_side = math.isqrt(tokens)
    if per_side * per_side != tokens or side % per_side:
        raise FormatError(f"config.json: mm_tokens_per_image={tokens} does not pool {side}x{side} patches into a square")
    processor = json.loads(sidecar["preprocessor_config.json"]) if "preprocessor_config.json" in sidecar else {}
    mean = processor.get("image_mean", list(tower.image_mean))
    std = processor.get("image_std", list(tower.image_std))
    metadata = {
        "general.architecture": MetaValue(V.STRING, "clip"),
        "general.type": MetaValue(V.STRING, "mmproj"),
        "clip.has_vision_encoder": MetaValue(V.BOOL, True),
        "clip.projector_type": MetaValue(V.STRING, tower.projector_type),
        "clip.use_gelu": MetaValue(V.BOOL, True),
        "clip.vision.image_size": _u32(vision["image_size"]),
        "clip.vision.patch_size": _u32(vision["patch_size"]),
        "clip.vision.embedding_length": _u32(vision["hidden_size"]),
        "clip.vision.feed_forward_length": _u32(vision["intermediate_size"]),
        "clip.vision.block_count": _u32(vision["num_hidden_layers"]),
        "clip.vision.attention.head_count": _u32(vision["num_attention_heads"]),
        "clip.vision.attention.layer_norm_epsilon": _f32(vision.get("layer_norm_eps", 1e-6)),
        "clip.vision.projection_dim": _u32(text["hidden_size"]),
        # the pooling kernel (patches per side / tokens per side); llama.cpp assumes 4 without it
        "clip.vision.projector.scale_factor": _u32(side // per_side),
        "clip.vision.image_mean": MetaValue(V.ARRAY, [float(v) for v in mean], V.FLOAT32),
        "clip.vision.image_std": MetaValue(V.ARRAY, [float(v) for v in std], V.FLOAT32),
    }
    if name:
        metadata["general.name"] = MetaValue(V.STRING, name)
    return metadata


def from_hf(ckpt: Checkpoint, name: Optional[str] = None) -> Checkpoint:
    """The mmproj GGUF checkpoint (architecture ``clip``) of a multimodal Hugging Face checkpoint: its vision
    encoder and projector under llama.cpp's names; the language model's tensors are left to
    :func:`slmpkg.architectures.from_hf`. Lazy: nothing is read until a writer asks.

    Raises :class:`FormatError` for a class without a vision tower slmpkg knows, settings llama.cpp's
    encoder cannot compute, a missing, extra or misshapen tower tensor, or a non-float one.
    """
    if "config.json" not in ckpt.sidecar:
        raise FormatError("config.json is missing: not a Hugging Face model directory")
    try:
        config = json.loads(ckpt.sidecar["config.json"])
    except ValueError as e:
        raise FormatError(f"config.json: not valid JSON ({e})") from None
    tower = _tower(config)
    metadata = _metadata(tower, config, ckpt.sidecar, name)
    vision = config["vision_config"]
    n_layer = vision["num_hidden_layers"]
    plan = {hf: gguf for gguf, hf in tower.tensors}
    for i in range(n_layer):
        plan.update({hf.format(i=i): gguf.format(i=i) for gguf, hf in tower.layer_tensors})
    prefixes = tuple({hf.split(".")[0] + "." for hf in plan})  # the towers' top-level names
    found: dict[str, LazyTensor] = {}
    for t in ckpt.tensors:
        hf = _hf_name(t.name)
        if not hf.startswith(prefixes) or hf.startswith(tower.unused):
            continue  # the language model's, or unused
        target = plan.get(hf)
        if target is None:
            raise FormatError(f"tensor {t.name} has no place in llama.cpp's {tower.projector_type} mmproj")
        if t.qtype not in FLOAT_TYPES:
            raise FormatError(f"tensor {t.name}: type {t.qtype.name} is not a float type")
        mapped = t.renamed(target)
        if target in tower.plus_one:
            mapped = _PLUS_ONE.forward(mapped, cast(Dims, None))  # a shift needs no sizes
        elif target in tower.as_f32 or len(t.shape) == 1:
            mapped = mapped.converted(QuantType.F32)  # 1-D tensors in F32, as llama.cpp's converter writes them
        found[target] = mapped
    missing = [gguf for gguf in plan.values() if gguf not in found]
    if missing:
        raise FormatError(f"{tower.hf_class}: the checkpoint lacks the vision tensors {', '.join(missing[:4])}"
                          + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    _check_shapes(found, vision, config["text_config"]["hidden_size"])
    order = [gguf for gguf, _ in tower.tensors if not gguf.startswith("mm.")]
    order += [gguf.format(i=i) for i in range(n_layer) for gguf, _ in tower.layer_tensors]
    order += [gguf for gguf, _ in tower.tensors if gguf.startswith("mm.")]
    return Checkpoint(metadata, [found[n] for n in order], sidecar={})


def _check_shapes(tensors: Mapping[str, LazyTensor], vision: Mapping[str, Any], text_hidden: int) -> None:
    """The shapes the configuration implies for the tensors llama.cpp sizes its graph by."""
    h, ff, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    side = vision["image_size"] // patch
    want = {
        "v.patch_embd.weight": (h, vision.get("num_channels", 3), patch, patch),
        "v.position_embd.weight": (side * side, h),
        "mm.input_projection.weight": (h, text_hidden),
        "mm.soft_emb_norm.weight": (h,),
        "v.blk.0.ffn_up.weight": (ff, h),
        "v.blk.0.ffn_down.weight": (h, ff),
        "v.blk.0.attn_q.weight": (h, h),
    }
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise FormatError(f"tensor {name} has shape {list(tensors[name].shape)}, config.json implies {list(shape)}")
