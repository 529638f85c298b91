"""Quantization presets ("file types") and the per-tensor type choice of llama.cpp's quantizer.

For a given model and set of options, :func:`plan_tensor_types` picks, for every tensor, the same
ggml type that ``llama_model_quantize`` (llama.cpp ``src/llama-quant.cpp``, the version vendored by
llama-cpp-python 0.3.36) picks, and :func:`file_type_for` gives the value it writes to
``general.file_type``.

Shapes are in ggml order throughout: ``TensorInfo.ne[0]`` is the number of elements in one row (the
last axis of the numpy array). ``gguf.GGUFReader`` tensors already use that order
(``ReaderTensor.shape``); use :meth:`TensorInfo.from_numpy_shape` for a numpy shape.

Example:
    >>> from gguf import GGMLQuantizationType as T
    >>> opts = QuantOptions("q4_k_m")
    >>> meta = {"general.architecture": "llama", "llama.block_count": 1,
    ...         "llama.attention.head_count": 8, "llama.attention.head_count_kv": 8}
    >>> tensors = [TensorInfo("token_embd.weight", (256, 1000), T.F16),
    ...            TensorInfo("output_norm.weight", (256,), T.F32),
    ...            TensorInfo("blk.0.attn_q.weight", (256, 256), T.F16)]
    >>> {k: v.name for k, v in plan_tensor_types(tensors, meta, opts).items()}
    {'output_norm.weight': 'F32', 'token_embd.weight': 'Q6_K', 'blk.0.attn_q.weight': 'Q4_K'}
    >>> file_type_for(opts)
    15
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from gguf import GGMLQuantizationType as QuantType
from gguf import LlamaFileType as FType
from gguf.constants import GGML_QUANT_SIZES

from .errors import FormatError, UsageError

__all__ = [
    "QuantType",
    "Preset",
    "PRESETS",
    "PRESET_ALIASES",
    "get_preset",
    "parse_ggml_type",
    "parse_tensor_type_override",
    "QuantOptions",
    "TensorInfo",
    "ModelInfo",
    "plan_tensor_types",
    "llama_sort_key",
    "llama_tensor_order",
    "tensor_allows_quantization",
    "file_type_for",
    "QUANTIZATION_VERSION",
    "KEY_FILE_TYPE",
    "KEY_QUANTIZATION_VERSION",
]

# llama.cpp sets these two keys on every quantized file (GGML_QNT_VERSION is 2).
QUANTIZATION_VERSION = 2
KEY_FILE_TYPE = "general.file_type"
KEY_QUANTIZATION_VERSION = "general.quantization_version"


# --------------------------------------------------------------------------------------------------
# ggml type helpers
# --------------------------------------------------------------------------------------------------


def _block_size(t: QuantType) -> int:
    return GGML_QUANT_SIZES[t][0]


def _is_quantized(t: QuantType) -> bool:
    # every ggml type with a block of more than one element is a quantized type; the float and
    # integer types (F32, F16, BF16, I8..I64, F64) all have block size 1
    return _block_size(t) > 1


def parse_ggml_type(value: Union[str, int, QuantType], what: str = "ggml type") -> QuantType:
    """A ggml type from its name (any case, as ``ggml_type_name``), its number, or the enum itself.

    >>> parse_ggml_type("q8_0").name, parse_ggml_type(14).name
    ('Q8_0', 'Q6_K')
    """
    if isinstance(value, QuantType):
        return value
    if isinstance(value, int):
        try:
            return QuantType(value)
        except ValueError:
            raise UsageError(f"invalid {what} {value}") from None
    text = str(value).strip()
    try:
        return QuantType[text.upper()]
    except KeyError:
        names = ", ".join(t.name.lower() for t in QuantType)
        raise UsageError(f"invalid {what} '{text}'; valid types: {names}") from None


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One llama.cpp quantization preset.

    ``ftype`` is the ``llama_ftype`` id (what ``general.file_type`` gets); ``default_type`` is the ggml
    type every quantizable tensor starts from before the per-tensor rules adjust it.

    >>> p = get_preset("Q5_K_M")
    >>> p.ftype, p.default_type.name, p.bits_per_weight
    (17, 'Q5_K', 5.5)
    """

    name: str
    ftype: int
    default_type: QuantType
    description: str

    @property
    def bits_per_weight(self) -> float:
        """Nominal bits per weight of the default type (the mixes add a little on top)."""
        block, nbytes = GGML_QUANT_SIZES[self.default_type]
        return nbytes * 8 / block

    @property
    def is_quantized(self) -> bool:
        """False for F32/F16/BF16: then no per-tensor rule, override or fallback runs in llama.cpp."""
        return _is_quantized(self.default_type)


def _p(name: str, ftype: FType, default: QuantType, description: str) -> Preset:
    return Preset(name, int(ftype), default, description)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _p("F32", FType.ALL_F32, QuantType.F32, "32-bit float, no quantization"),
        _p("F16", FType.MOSTLY_F16, QuantType.F16, "16-bit IEEE half float"),
        _p("BF16", FType.MOSTLY_BF16, QuantType.BF16, "16-bit bfloat"),
        _p("Q8_0", FType.MOSTLY_Q8_0, QuantType.Q8_0, "8-bit, blocks of 32, one scale"),
        _p("Q4_0", FType.MOSTLY_Q4_0, QuantType.Q4_0, "4-bit, blocks of 32, one scale"),
        _p("Q4_1", FType.MOSTLY_Q4_1, QuantType.Q4_1, "4-bit, blocks of 32, scale and minimum"),
        _p("Q5_0", FType.MOSTLY_Q5_0, QuantType.Q5_0, "5-bit, blocks of 32, one scale"),
        _p("Q5_1", FType.MOSTLY_Q5_1, QuantType.Q5_1, "5-bit, blocks of 32, scale and minimum"),
        _p("Q2_K", FType.MOSTLY_Q2_K, QuantType.Q2_K, "2-bit K-quant mix (attn_v/ffn_down get more bits)"),
        _p("Q3_K_S", FType.MOSTLY_Q3_K_S, QuantType.Q3_K, "3-bit K-quant, small: almost all Q3_K"),
        _p("Q3_K_M", FType.MOSTLY_Q3_K_M, QuantType.Q3_K, "3-bit K-quant mix, medium"),
        _p("Q3_K_L", FType.MOSTLY_Q3_K_L, QuantType.Q3_K, "3-bit K-quant mix, large"),
        _p("Q4_K_S", FType.MOSTLY_Q4_K_S, QuantType.Q4_K, "4-bit K-quant mix, small"),
        _p("Q4_K_M", FType.MOSTLY_Q4_K_M, QuantType.Q4_K, "4-bit K-quant mix, medium (a common default)"),
        _p("Q5_K_S", FType.MOSTLY_Q5_K_S, QuantType.Q5_K, "5-bit K-quant, small"),
        _p("Q5_K_M", FType.MOSTLY_Q5_K_M, QuantType.Q5_K, "5-bit K-quant mix, medium"),
        _p("Q6_K", FType.MOSTLY_Q6_K, QuantType.Q6_K, "6-bit K-quant"),
        _p("IQ4_NL", FType.MOSTLY_IQ4_NL, QuantType.IQ4_NL, "4-bit non-linear, blocks of 32"),
        _p("IQ4_XS", FType.MOSTLY_IQ4_XS, QuantType.IQ4_XS, "4-bit non-linear, super-blocks of 256"),
    )
}

# the llama-quantize CLI also accepts these shorter names
PRESET_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def get_preset(name: Union[str, int, Preset]) -> Preset:
    """The preset called ``name`` (any case; the CLI aliases Q3_K/Q4_K/Q5_K and ftype numbers work too).

    >>> get_preset("q4_k").name, get_preset("7").name
    ('Q4_K_M', 'Q8_0')
    """
    if isinstance(name, Preset):
        return name
    key = str(name).strip().upper()
    key = PRESET_ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    if key.lstrip("+-").isdigit():
        for preset in PRESETS.values():
            if preset.ftype == int(key):
                return preset
    raise UsageError(f"unknown quantization preset '{name}'; valid presets: {', '.join(PRESETS)}")


# --------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------

Override = tuple[re.Pattern, QuantType]


def parse_tensor_type_override(text: str, lowercase: bool = True) -> Override:
    """Parse ``--tensor-type REGEX=TYPE`` the way llama-quantize does.

    The split is at the first ``=``; the CLI lower-cases the pattern before compiling it (pass
    ``lowercase=False`` to keep it verbatim, as the C API does with ``tt_overrides``). The pattern is
    searched anywhere in the tensor name (``std::regex_search``).

    >>> pat, t = parse_tensor_type_override(r"ATTN_V=Q8_0")
    >>> pat.pattern, t.name
    ('attn_v', 'Q8_0')
    """
    name, sep, type_name = text.partition("=")
    if not sep:
        raise UsageError(f"malformed tensor type override '{text}' (expected REGEX=TYPE)")
    if not name:
        raise UsageError(f"tensor type override '{text}' has no tensor name")
    if not type_name:
        raise UsageError(f"tensor type override '{text}' has no type")
    if lowercase:
        name = name.lower()
    try:
        pattern = re.compile(name)
    except re.error as e:
        raise UsageError(f"invalid regex in tensor type override '{text}': {e}") from None
    return pattern, parse_ggml_type(type_name, "type in tensor type override")


def _normalize_override(item: Any) -> Override:
    if isinstance(item, str):
        return parse_tensor_type_override(item)
    pattern, qtype = item
    if not isinstance(pattern, re.Pattern):
        try:
            pattern = re.compile(pattern)
        except re.error as e:
            raise UsageError(f"invalid regex in tensor type override '{pattern}': {e}") from None
    return pattern, parse_ggml_type(qtype, "type in tensor type override")


@dataclass(frozen=True)
class QuantOptions:
    """The knobs of ``llama_model_quantize_params`` that change which type a tensor gets.

    Strings are accepted and normalized: ``preset`` by :func:`get_preset`, the two type options by
    :func:`parse_ggml_type`, and each override either as ``"REGEX=TYPE"`` (CLI syntax, pattern
    lower-cased) or as a ``(pattern, type)`` pair (used verbatim). Overrides are tried in order; the
    first whose pattern is found in the tensor name wins.

    - ``pure``: skip the preset's per-tensor mix (``--pure``); overrides and the explicit output /
      token-embedding types still apply.
    - ``leave_output_tensor``: keep ``output.weight`` as it is (``--leave-output-tensor``).
    - ``has_imatrix``: an importance matrix is supplied (changes a few IQ4_*/Q4_0/Q5_0 choices).

    >>> o = QuantOptions("Q4_K_M", tensor_type_overrides=["attn_q=q8_0"], output_tensor_type="f16")
    >>> o.preset.name, o.output_tensor_type.name, o.tensor_type_overrides[0][1].name
    ('Q4_K_M', 'F16', 'Q8_0')
    """

    preset: Preset
    pure: bool = False
    leave_output_tensor: bool = False
    output_tensor_type: Optional[QuantType] = None
    token_embedding_type: Optional[QuantType] = None
    tensor_type_overrides: tuple[Override, ...] = field(default=())
    allow_requantize: bool = False
    has_imatrix: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "preset", get_preset(self.preset))
        if self.output_tensor_type is not None:
            object.__setattr__(
                self, "output_tensor_type", parse_ggml_type(self.output_tensor_type, "output tensor type")
            )
        if self.token_embedding_type is not None:
            object.__setattr__(
                self, "token_embedding_type", parse_ggml_type(self.token_embedding_type, "token embedding type")
            )
        overrides = self.tensor_type_overrides
        if isinstance(overrides, str):
            overrides = (overrides,)
        object.__setattr__(self, "tensor_type_overrides", tuple(_normalize_override(o) for o in overrides))

    @property
    def quantize_output_tensor(self) -> bool:
        """The C field's sense of ``leave_output_tensor``."""
        return not self.leave_output_tensor


def file_type_for(options: QuantOptions) -> int:
    """The value llama.cpp writes to ``general.file_type`` (a u32).

    It is always the requested preset's ftype id: ``--pure``, ``--tensor-type``, the output and
    token-embedding types and any fallbacks do not change it. (llama.cpp removes the key and appends it
    after ``general.quantization_version``, both at the end of the copied metadata.)

    >>> file_type_for(QuantOptions("Q4_K_M", pure=True))
    15
    """
    return options.preset.ftype


# --------------------------------------------------------------------------------------------------
# tensors and model facts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the planner sees it: name, ggml-order shape ``ne`` (``ne[0]`` = row length) and type.

    >>> t = TensorInfo.from_numpy_shape("blk.0.ffn_down.weight", (4096, 14336), "f16")
    >>> t.ne, t.n_dims
    ((14336, 4096), 2)
    """

    name: str
    ne: tuple[int, ...]
    type: QuantType

    def __post_init__(self) -> None:
        object.__setattr__(self, "ne", tuple(int(n) for n in self.ne) or (1,))
        object.__setattr__(self, "type", parse_ggml_type(self.type, "tensor type"))

    @classmethod
    def from_numpy_shape(cls, name: str, shape: Sequence[int], type: Union[str, int, QuantType]) -> "TensorInfo":
        """Build from a numpy (row-major) shape, i.e. ggml order reversed."""
        return cls(name, tuple(int(n) for n in reversed(tuple(shape))), type)

    @classmethod
    def from_reader(cls, tensor: Any) -> "TensorInfo":
        """Build from a ``gguf.ReaderTensor`` (whose ``shape`` is already in ggml order)."""
        return cls(str(tensor.name), tuple(int(n) for n in tensor.shape), tensor.tensor_type)

    def dim(self, i: int) -> int:
        """``ne[i]``, with the implicit trailing 1s ggml gives every tensor."""
        return self.ne[i] if i < len(self.ne) else 1

    @property
    def n_dims(self) -> int:
        """``ggml_n_dims``: trailing dimensions of size 1 do not count (a [4096, 1] tensor is 1-D)."""
        for i in range(len(self.ne) - 1, 0, -1):
            if self.ne[i] > 1:
                return i + 1
        return 1


def _meta(metadata: Mapping[str, Any], key: str) -> Any:
    value = metadata.get(key)
    if value is not None and hasattr(value, "contents"):  # a gguf.ReaderField
        value = value.contents()
    return value


def _first_int(value: Any, key: str) -> int:
    # llama.cpp's per-layer keys may hold one number or an array with one entry per layer; the
    # quantizer only ever reads layer 0
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise FormatError(f"metadata key {key} is an empty array")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FormatError(f"metadata key {key} is not an integer: {value!r}") from None


# archs whose hparams loader sets LLM_TYPE_70B, and the layer count it does that at; "llama" (and
# "llama-embed", which reuses its loader) also needs GQA and a non-8-expert model
_ARCH_70B_LAYERS = {"llama": 80, "llama-embed": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


@dataclass(frozen=True)
class ModelInfo:
    """The hyperparameters ``llama_tensor_get_type`` consults, read from GGUF metadata.

    ``n_layer`` is ``{arch}.block_count`` (including any next-token-prediction layers), ``n_head`` /
    ``n_head_kv`` are layer 0's, ``n_expert`` is ``{arch}.expert_count`` (0 when absent).

    >>> m = ModelInfo.from_metadata({"general.architecture": "llama", "llama.block_count": 32,
    ...     "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8})
    >>> m.n_gqa, m.is_70b
    (4, False)
    """

    arch: str
    n_layer: int
    n_head: int = 0
    n_head_kv: int = 0
    n_expert: int = 0
    n_layer_nextn: int = 0

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "ModelInfo":
        arch = _meta(metadata, "general.architecture")
        if not arch:
            raise FormatError("metadata has no general.architecture")
        arch = str(arch)
        if arch == "clip":
            # llama.cpp reads no hyperparameters for vision encoders; they all stay 0
            return cls(arch, 0)

        def get(key: str, default: Optional[int]) -> Optional[int]:
            full = f"{arch}.{key}"
            value = _meta(metadata, full)
            return default if value is None else _first_int(value, full)

        n_layer = get("block_count", None)
        if n_layer is None:
            raise FormatError(f"metadata has no {arch}.block_count")
        n_head = get("attention.head_count", 0)
        n_head_kv = get("attention.head_count_kv", n_head)
        n_expert = get("expert_count", 0)
        if arch in ("hunyuan-vl", "hunyuan-dense") and n_expert <= 1:
            n_expert = 0
        return cls(arch, n_layer, n_head, n_head_kv, n_expert, get("nextn_predict_layers", 0))

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head in layer 0 (0 when there are no KV heads)."""
        return 0 if self.n_head_kv == 0 else self.n_head // self.n_head_kv

    @property
    def is_70b(self) -> bool:
        """Whether llama.cpp classifies the model as LLM_TYPE_70B (it gives attn_v more bits)."""
        layers = _ARCH_70B_LAYERS.get(self.arch)
        if layers is None or self.n_layer - self.n_layer_nextn != layers:
            return False
        if self.arch in ("llama", "llama-embed"):
            return self.n_expert != 8 and self.n_head != self.n_head_kv
        return True


# --------------------------------------------------------------------------------------------------
# ordering: llama.cpp walks tensors sorted by (layer, name), and its counters depend on that order
# --------------------------------------------------------------------------------------------------

_BLK_RE = re.compile(r"blk\.[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _blk_layer(name: str) -> Optional[int]:
    # sscanf(name, "blk.%d.", &il): the literal prefix must match, %d skips C whitespace
    m = _BLK_RE.match(name)
    return int(m.group(1)) if m else None


def llama_sort_key(name: str) -> tuple[int, bytes]:
    """The order of llama.cpp's tensor map: block number (-1 outside blocks), then bytewise name.

    It is also the order of tensors in the file llama-quantize writes.
    """
    layer = _blk_layer(name)
    return (-1 if layer is None else layer, name.encode("utf-8"))


def llama_tensor_order(names: Iterable[str]) -> list[str]:
    """``names`` sorted as llama.cpp processes (and writes) them.

    >>> llama_tensor_order(["blk.10.attn_q.weight", "output.weight", "blk.2.attn_q.weight", "blk.2.attn_k.weight"])
    ['output.weight', 'blk.2.attn_k.weight', 'blk.2.attn_q.weight', 'blk.10.attn_q.weight']
    """
    return sorted(names, key=llama_sort_key)


# --------------------------------------------------------------------------------------------------
# which tensors may change type at all
# --------------------------------------------------------------------------------------------------

_NEVER_QUANTIZED_PARTS = (
    "_norm.weight",
    "ffn_gate_inp.weight",  # MoE router
    "ffn_gate_tid2eid.weight",  # integer routing table
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)

_NEVER_QUANTIZED_GLM5_NEXT = (
    "hc_",
    "indexer.attn_q_b",
    "indexer.attn_k",
    "indexer.proj",
    "indexer_compressor_gate",
    "indexer_compressor_ape",
    "ssm_f_a.weight",
    "ssm_f_b.weight",
    "ssm_g_a.weight",
    "ssm_g_b.weight",
    "ssm_beta.weight",
    "attn_kv_a_mqa.weight",
    "attn_k_b.weight",
    "attn_v_b.weight",
)


def tensor_allows_quantization(tensor: TensorInfo, options: QuantOptions, arch: str = "") -> bool:
    """Whether llama.cpp lets this tensor's type change; when False it is copied through unchanged.

    Only tensors with at least 2 (non-trivial) dimensions whose name ends in ``weight`` qualify, minus
    norms, MoE routers, position / token-type embeddings, small conv and RWKV tensors and a list of
    multimodal ones, and minus ``output.weight`` under ``leave_output_tensor``.

    >>> o = QuantOptions("Q8_0")
    >>> tensor_allows_quantization(TensorInfo("blk.0.attn_norm.weight", (64, 64), "f32"), o)
    False
    """
    if tensor.n_dims < 2:
        return False
    name = tensor.name
    # llama.cpp tests `rfind("weight") == size - 6` in size_t arithmetic, which also holds for any
    # 5-character name (both sides are npos)
    if not (name.endswith("weight") or len(name) == 5):
        return False
    if name == "output.weight" and options.leave_output_tensor:
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    if any(part in name for part in _NEVER_QUANTIZED_PARTS):
        return False
    if arch == "glm5-next" and any(part in name for part in _NEVER_QUANTIZED_GLM5_NEXT):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# categories
# --------------------------------------------------------------------------------------------------

_TOKEN_EMBD = "token_embd"
_ATTN_Q = "attn_q"
_ATTN_V = "attn_v"
_ATTN_K = "attn_k"
_ATTN_QKV = "attn_qkv"
_ATTN_KV_B = "attn_kv_b"
_ATTN_OUTPUT = "attn_output"
_FFN_UP = "ffn_up"
_FFN_GATE = "ffn_gate"
_FFN_DOWN = "ffn_down"
_OUTPUT = "output"
_OTHER = "other"

# first substring found decides; the order matters (e.g. "attn_qkv.weight" before "attn_v.weight")
_CATEGORY_PARTS = (
    ("attn_qkv.weight", _ATTN_QKV),
    ("attn_kv_b.weight", _ATTN_KV_B),
    ("attn_v.weight", _ATTN_V),
    ("attn_k.weight", _ATTN_K),
    ("attn_q.weight", _ATTN_Q),
    ("attn_output.weight", _ATTN_OUTPUT),
    ("ffn_up", _FFN_UP),
    ("ffn_gate", _FFN_GATE),
    ("ffn_down", _FFN_DOWN),
)

_ATTN_V_LIKE = (_ATTN_V, _ATTN_QKV, _ATTN_KV_B)


def _is_token_embd_name(name: str) -> bool:
    return name in ("token_embd.weight", "per_layer_token_embd.weight")


def _category(name: str) -> str:
    if name == "output.weight":
        return _OUTPUT
    if _is_token_embd_name(name):
        return _TOKEN_EMBD
    for part, category in _CATEGORY_PARTS:
        if part in name:
            return category
    return _OTHER


# --------------------------------------------------------------------------------------------------
# the per-tensor rules
# --------------------------------------------------------------------------------------------------

_IQ_LOW_FTYPES = frozenset(
    {
        FType.MOSTLY_IQ2_XXS,
        FType.MOSTLY_IQ2_XS,
        FType.MOSTLY_IQ1_S,
        FType.MOSTLY_IQ2_S,
        FType.MOSTLY_IQ2_M,
        FType.MOSTLY_IQ1_M,
    }
)
_OUTPUT_Q5_K_FTYPES = _IQ_LOW_FTYPES | {FType.MOSTLY_IQ3_XXS}
_MOE8_ATTN_OUTPUT_Q5_K_FTYPES = frozenset(
    {
        FType.MOSTLY_Q2_K,
        FType.MOSTLY_IQ3_XS,
        FType.MOSTLY_IQ3_XXS,
        FType.MOSTLY_Q3_K_S,
        FType.MOSTLY_Q3_K_M,
        FType.MOSTLY_IQ4_NL,
        FType.MOSTLY_Q4_K_S,
        FType.MOSTLY_Q4_K_M,
        FType.MOSTLY_IQ3_S,
        FType.MOSTLY_IQ3_M,
        FType.MOSTLY_IQ4_XS,
    }
)
_IMATRIX_REQUIRED_TYPES = frozenset(
    {QuantType.IQ3_XXS, QuantType.IQ2_XXS, QuantType.IQ2_XS, QuantType.IQ2_S, QuantType.IQ1_M, QuantType.IQ1_S}
)
# a 256-block type whose block does not divide the row length falls back to this 32-block type
_FALLBACK = {
    QuantType.IQ1_S: QuantType.IQ4_NL,
    QuantType.IQ1_M: QuantType.IQ4_NL,
    QuantType.IQ2_XXS: QuantType.IQ4_NL,
    QuantType.IQ2_XS: QuantType.IQ4_NL,
    QuantType.IQ2_S: QuantType.IQ4_NL,
    QuantType.IQ3_XXS: QuantType.IQ4_NL,
    QuantType.IQ3_S: QuantType.IQ4_NL,
    QuantType.IQ4_XS: QuantType.IQ4_NL,
    QuantType.Q2_K: QuantType.Q4_0,
    QuantType.Q3_K: QuantType.Q4_0,
    QuantType.TQ1_0: QuantType.Q4_0,
    QuantType.TQ2_0: QuantType.Q4_0,
    QuantType.Q4_K: QuantType.Q5_0,
    QuantType.Q5_K: QuantType.Q5_1,
    QuantType.Q6_K: QuantType.Q8_0,
}


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # the first and last eighth of the layers, and every third layer in between
    d = i_layer - n_layers // 8
    c_mod = d - 3 * int(d / 3)  # C's truncating %, in case d < 0
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or c_mod == 2


def _fallback(tensor: TensorInfo, target: QuantType) -> QuantType:
    ncols = tensor.ne[0]
    block = _block_size(target)
    if ncols % block == 0:
        return target
    if target in _FALLBACK:
        result = _FALLBACK[target]
    elif block <= 32:
        result = target  # already a 32-block type: only F16 is left
    else:
        raise UsageError(
            f"tensor {tensor.name}: row length {ncols} is not a multiple of {block} and llama.cpp has no "
            f"fallback for {target.name}"
        )
    if ncols % _block_size(result) != 0:
        result = QuantType.F16
    return result


class _Planner:
    """One pass over the model in llama.cpp order, carrying its running counters."""

    def __init__(self, tensors: Sequence[TensorInfo], model: ModelInfo, options: QuantOptions) -> None:
        self.model = model
        self.options = options
        self.ftype = options.preset.ftype
        self.n_attention_wv = sum(1 for t in tensors if _category(t.name) in _ATTN_V_LIKE)
        # the ffn counters are compared with the block count, not with a count of tensors
        self.n_ffn = model.n_layer
        self.has_tied_embeddings = not any(t.name == "output.weight" for t in tensors)
        self.i_attention_wv = 0
        self.i_ffn_down = 0
        self.i_ffn_gate = 0
        self.i_ffn_up = 0

    def layer_info(self, counter: int, name: str) -> tuple[int, int]:
        # with experts, tensors of one kind need not be one per layer, so the layer comes from the name
        if max(1, self.model.n_expert) > 1:
            layer = _blk_layer(name)
            if layer is None:
                raise FormatError(f"cannot tell the layer of tensor {name}")
            if not 0 <= layer < self.n_ffn:
                raise FormatError(f"tensor {name} is in layer {layer}, outside [0, {self.n_ffn})")
            return layer, self.n_ffn
        return counter, self.n_ffn

    def target_type(self, tensor: TensorInfo) -> QuantType:
        """``llama_tensor_get_type`` for a tensor that allows quantization."""
        opts = self.options
        category = _category(tensor.name)
        if opts.token_embedding_type is not None and category == _TOKEN_EMBD:
            # per_layer_token_embd is a big table of its own: an override naming it takes precedence
            named = tensor.name == "per_layer_token_embd.weight" and any(
                p.search(tensor.name) for p, _ in opts.tensor_type_overrides
            )
            if not named:
                return opts.token_embedding_type
        if opts.output_tensor_type is not None and category == _OUTPUT:
            return opts.output_tensor_type

        new_type = opts.preset.default_type
        if not _is_quantized(new_type):
            # F32/F16/BF16 files: no mixes, overrides or fallbacks
            return new_type

        manual = False
        for pattern, qtype in opts.tensor_type_overrides:
            if pattern.search(tensor.name):
                new_type = qtype
                manual = True
                break
        if not manual and not opts.pure:
            new_type = self.mix_type(new_type, tensor, category)
        return _fallback(tensor, new_type)

    def mix_type(self, new_type: QuantType, tensor: TensorInfo, category: str) -> QuantType:
        """The preset's per-tensor adjustments (``llama_tensor_get_type_impl``)."""
        ft = self.ftype
        model = self.model
        arch = model.arch
        name = tensor.name
        n_expert = model.n_expert
        n_gqa = model.n_gqa
        T = QuantType

        if arch == "glm5-next" and ("attn_q_a" in name or "attn_q_b" in name or "nextn.eh_proj" in name):
            if new_type not in (T.F32, T.BF16, T.F16):
                return T.Q8_0

        if category == _OUTPUT or (self.has_tied_embeddings and category == _TOKEN_EMBD):
            # with tied embeddings token_embd doubles as the output projection and is treated as such
            if self.options.output_tensor_type is not None:
                new_type = self.options.output_tensor_type
            elif ft == FType.MOSTLY_MXFP4_MOE:
                new_type = T.Q8_0
            elif arch == "falcon" or tensor.ne[0] % _block_size(new_type) != 0:
                new_type = T.Q8_0
            elif ft in _IQ_LOW_FTYPES:
                new_type = T.Q5_K
            elif new_type != T.Q8_0:
                new_type = T.Q6_K
        elif ft == FType.MOSTLY_MXFP4_MOE:
            is_expert_role = category in (_FFN_UP, _FFN_GATE, _FFN_DOWN)
            if tensor.dim(2) > 1 and (arch != "bailingmoe3" or is_expert_role):
                new_type = T.MXFP4
            else:
                new_type = T.Q8_0
        elif category == _TOKEN_EMBD:
            if self.options.token_embedding_type is not None:
                new_type = self.options.token_embedding_type
            elif ft in (FType.MOSTLY_IQ2_XXS, FType.MOSTLY_IQ2_XS, FType.MOSTLY_IQ1_S, FType.MOSTLY_IQ1_M):
                new_type = T.Q2_K
            elif ft in (FType.MOSTLY_IQ2_S, FType.MOSTLY_IQ2_M, FType.MOSTLY_IQ3_XXS):
                new_type = T.IQ3_S
            elif ft in (FType.MOSTLY_TQ1_0, FType.MOSTLY_TQ2_0) or ft == 41:  # 41: Q2_0
                new_type = T.Q4_K
        elif ft in _IQ_LOW_FTYPES:
            iq2_s_or_m = ft in (FType.MOSTLY_IQ2_S, FType.MOSTLY_IQ2_M)
            if category in _ATTN_V_LIKE:
                if n_gqa >= 4 or n_expert >= 4:
                    new_type = T.Q4_K
                else:
                    new_type = T.IQ3_S if iq2_s_or_m else T.Q2_K
                self.i_attention_wv += 1
            elif n_expert == 8 and category == _ATTN_K:
                new_type = T.Q4_K
            elif category == _FFN_DOWN:
                if self.i_ffn_down < self.n_ffn // 8:
                    new_type = T.IQ3_S if iq2_s_or_m else T.Q2_K
                self.i_ffn_down += 1
            elif category == _ATTN_OUTPUT:
                if n_expert == 8:
                    new_type = T.Q5_K
                elif ft in (FType.MOSTLY_IQ1_S, FType.MOSTLY_IQ1_M):
                    new_type = T.IQ2_XXS
                elif iq2_s_or_m:
                    new_type = T.IQ3_S
        elif category in _ATTN_V_LIKE:
            # attn_qkv and attn_kv_b take this branch too (and count as attn_v layers)
            i_wv, n_wv = self.i_attention_wv, self.n_attention_wv
            if ft == FType.MOSTLY_Q2_K:
                new_type = T.Q4_K if n_gqa >= 4 else T.Q3_K
            elif ft == FType.MOSTLY_Q2_K_S and n_gqa >= 4:
                new_type = T.Q4_K
            elif ft == FType.MOSTLY_IQ3_XXS:
                new_type = T.Q4_K if n_gqa >= 4 else (T.IQ3_S if not self.options.has_imatrix else T.IQ3_XXS)
            elif ft in (FType.MOSTLY_IQ3_XS, FType.MOSTLY_IQ3_S) and n_gqa >= 4:
                new_type = T.Q4_K
            elif ft == FType.MOSTLY_IQ3_M:
                new_type = T.Q4_K
            elif ft == FType.MOSTLY_Q3_K_M:
                new_type = T.Q5_K if i_wv < 2 else T.Q4_K
            elif ft == FType.MOSTLY_Q3_K_L:
                new_type = T.Q5_K
            elif ft in (FType.MOSTLY_IQ4_NL, FType.MOSTLY_IQ4_XS) and n_gqa >= 4:
                new_type = T.Q5_K
            elif ft in (FType.MOSTLY_Q4_K_M, FType.MOSTLY_Q5_K_M) and _use_more_bits(i_wv, n_wv):
                new_type = T.Q6_K
            elif ft == FType.MOSTLY_Q4_K_S and i_wv < 4:
                new_type = T.Q5_K
            if model.is_70b and new_type in (T.Q3_K, T.Q4_K):
                # 70B shares each attn_v among 8 query heads, so it is small and worth more bits
                new_type = T.Q5_K
            if n_expert == 8:
                new_type = T.Q8_0
            self.i_attention_wv += 1
        elif category == _ATTN_K:
            if n_expert == 8:
                new_type = T.Q8_0
            elif ft == FType.MOSTLY_IQ3_XS:
                new_type = T.IQ3_XXS
            elif ft == FType.MOSTLY_IQ3_XXS:
                new_type = T.IQ2_S
        elif category == _ATTN_Q:
            if ft == FType.MOSTLY_IQ3_XS:
                new_type = T.IQ3_XXS
            elif ft == FType.MOSTLY_IQ3_XXS:
                new_type = T.IQ2_S
        elif category == _FFN_DOWN:
            i_layer, n_layer = self.layer_info(self.i_ffn_down, name)
            falcon = arch == "falcon"
            has_imatrix = self.options.has_imatrix
            if ft == FType.MOSTLY_Q2_K:
                new_type = T.Q3_K
            elif ft == FType.MOSTLY_Q2_K_S:
                if i_layer < n_layer // 8:
                    new_type = T.Q4_K
            elif ft == FType.MOSTLY_IQ3_XXS and not has_imatrix:
                new_type = T.Q4_K if i_layer < n_layer // 8 else T.Q3_K
            elif ft == FType.MOSTLY_Q3_K_M:
                if i_layer < n_layer // 16:
                    new_type = T.Q5_K
                elif not falcon or _use_more_bits(i_layer, n_layer):
                    new_type = T.Q4_K
                else:
                    new_type = T.Q3_K
            elif ft == FType.MOSTLY_IQ3_M and (
                i_layer < n_layer // 8 or (n_expert == 8 and _use_more_bits(i_layer, n_layer))
            ):
                new_type = T.Q4_K
            elif ft == FType.MOSTLY_Q3_K_L:
                new_type = T.Q4_K if falcon else T.Q5_K
            elif ft == FType.MOSTLY_Q4_K_M:
                if falcon:
                    if i_layer < n_layer // 16:
                        new_type = T.Q6_K
                    elif _use_more_bits(i_layer, n_layer):
                        new_type = T.Q5_K
                    else:
                        new_type = T.Q4_K
                elif _use_more_bits(i_layer, n_layer):
                    new_type = T.Q6_K
            elif (
                i_layer < n_layer // 8
                and ft in (FType.MOSTLY_IQ4_NL, FType.MOSTLY_IQ4_XS)
                and not has_imatrix
            ):
                new_type = T.Q5_K
            elif ft == FType.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
                new_type = T.Q6_K
            elif ft == FType.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
                new_type = T.Q5_K
            elif ft in (FType.MOSTLY_Q4_0, FType.MOSTLY_Q5_0) and has_imatrix and i_layer < n_layer // 8:
                # only with an imatrix, so that quantizing without one stays as it always was
                new_type = T.Q4_1 if ft == FType.MOSTLY_Q4_0 else T.Q5_1
            self.i_ffn_down += 1
        elif category == _ATTN_OUTPUT:
            if arch != "falcon":
                if n_expert == 8:
                    if ft in _MOE8_ATTN_OUTPUT_Q5_K_FTYPES:
                        new_type = T.Q5_K
                elif ft == FType.MOSTLY_Q2_K:
                    new_type = T.Q3_K
                elif ft == FType.MOSTLY_IQ3_XXS:
                    new_type = T.IQ3_S
                elif ft == FType.MOSTLY_Q3_K_M:
                    new_type = T.Q4_K
                elif ft == FType.MOSTLY_Q3_K_L:
                    new_type = T.Q5_K
                elif ft == FType.MOSTLY_IQ3_M:
                    new_type = T.Q4_K
            elif ft == FType.MOSTLY_Q3_K_L:
                new_type = T.Q4_K
        # (llama.cpp also has an attn_qkv branch here, but attn_qkv never reaches it: the attn_v
        # branch above catches it first)
        elif category == _FFN_GATE:
            i_layer, n_layer = self.layer_info(self.i_ffn_gate, name)
            if ft == FType.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
                new_type = T.IQ3_XXS
            self.i_ffn_gate += 1
        elif category == _FFN_UP:
            i_layer, n_layer = self.layer_info(self.i_ffn_up, name)
            if ft == FType.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
                new_type = T.IQ3_XXS
            self.i_ffn_up += 1
        return new_type


def _requires_imatrix(name: str, target: QuantType, ftype: int) -> bool:
    if _is_token_embd_name(name) or name == "output.weight":
        return False
    if target in _IMATRIX_REQUIRED_TYPES:
        return True
    return target == QuantType.Q2_K and ftype == FType.MOSTLY_Q2_K_S


def plan_tensor_types(
    tensors: Sequence[TensorInfo], metadata: Mapping[str, Any], options: QuantOptions
) -> dict[str, QuantType]:
    """The ggml type llama-quantize gives each tensor, keyed by name in llama.cpp's processing order.

    The dict's order (:func:`llama_tensor_order`) is also the tensor order of llama.cpp's output file.
    Tensors whose type does not change are copied verbatim by llama.cpp. ``metadata`` maps GGUF keys
    to plain values (``gguf.ReaderField`` values are accepted too); the planner needs
    ``general.architecture`` and ``{arch}.block_count`` and reads head and expert counts.

    Raises :class:`UsageError` where llama.cpp would refuse or abort: a tensor that is already
    quantized would change type without ``allow_requantize``; an integer tensor would be converted; a
    very-low-bit IQ type is chosen without an imatrix; an explicit output / token-embedding type does
    not divide the row length; a row length has no fallback.

    >>> from gguf import GGMLQuantizationType as T
    >>> meta = {"general.architecture": "llama", "llama.block_count": 1}
    >>> plan = plan_tensor_types([TensorInfo("blk.0.ffn_up.weight", (100, 64), T.F32)], meta, QuantOptions("Q4_K_S"))
    >>> plan["blk.0.ffn_up.weight"].name  # 100 is no multiple of 256 or 32
    'F16'
    """
    model = ModelInfo.from_metadata(metadata)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FormatError(f"duplicate tensor name {dup}")
    ordered = sorted(tensors, key=lambda t: llama_sort_key(t.name))
    planner = _Planner(ordered, model, options)
    ftype = options.preset.ftype
    plan: dict[str, QuantType] = {}
    for tensor in ordered:
        if not tensor_allows_quantization(tensor, options, model.arch):
            plan[tensor.name] = tensor.type
            continue
        target = planner.target_type(tensor)
        if not options.has_imatrix and _requires_imatrix(tensor.name, target, ftype):
            raise UsageError(f"tensor {tensor.name}: type {target.name} needs an importance matrix (imatrix)")
        if target != tensor.type:
            if _is_quantized(target) and tensor.ne[0] % _block_size(target) != 0:
                # only reachable through --output-tensor-type / --token-embedding-type, which skip
                # the fallback; llama.cpp aborts in the quantizer
                raise UsageError(
                    f"tensor {tensor.name}: row length {tensor.ne[0]} is not a multiple of {_block_size(target)} "
                    f"as {target.name} requires"
                )
            if _is_quantized(tensor.type) and not options.allow_requantize:
                raise UsageError(
                    f"tensor {tensor.name} is already {tensor.type.name}; converting it to {target.name} "
                    "needs --allow-requantize (it loses quality)"
                )
            if not _is_quantized(tensor.type) and tensor.type not in (QuantType.F32, QuantType.F16, QuantType.BF16):
                raise UsageError(f"tensor {tensor.name}: cannot convert type {tensor.type.name} to {target.name}")
        plan[tensor.name] = target
    return plan
