"""Per-tensor type choice of slmpkg.presets against llama.cpp's quantizer.

Every expected type below was worked out by hand from llama.cpp ``src/llama-quant.cpp`` (the copy
vendored by llama-cpp-python 0.3.36); comments give the rule each case exercises. The last test, when
llama-cpp-python is installed, also asks llama.cpp itself.
"""

from __future__ import annotations

import random
import re

import pytest
from gguf import GGMLQuantizationType as T

from slmpkg.errors import FormatError, UsageError
from slmpkg.presets import (
    PRESETS,
    ModelInfo,
    QuantOptions,
    TensorInfo,
    file_type_for,
    get_preset,
    llama_tensor_order,
    parse_tensor_type_override,
    plan_tensor_types,
    tensor_allows_quantization,
)

F16, F32 = T.F16, T.F32

# use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
# use_more_bits(i, 8): i < 1, i >= 7, or (i - 1) % 3 == 2
MORE_BITS_8 = {0, 3, 6, 7}

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# --------------------------------------------------------------------------------------------------
# model builders
# --------------------------------------------------------------------------------------------------


def llama_tensors(
    n_layer: int,
    n_embd: int,
    n_ff: int,
    n_vocab: int,
    n_embd_kv: int,
    *,
    tied: bool = False,
    src: T = F16,
    seed: int = 0,
) -> list[TensorInfo]:
    """A llama-style model's tensors, shapes in ggml order, shuffled as a file might list them."""
    ts = [
        TensorInfo("token_embd.weight", (n_embd, n_vocab), src),
        TensorInfo("output_norm.weight", (n_embd,), F32),
        TensorInfo("rope_freqs.weight", (64,), F32),
    ]
    if not tied:
        ts.append(TensorInfo("output.weight", (n_embd, n_vocab), src))
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [
            TensorInfo(p + "attn_norm.weight", (n_embd,), F32),
            TensorInfo(p + "attn_q.weight", (n_embd, n_embd), src),
            TensorInfo(p + "attn_k.weight", (n_embd, n_embd_kv), src),
            TensorInfo(p + "attn_v.weight", (n_embd, n_embd_kv), src),
            TensorInfo(p + "attn_output.weight", (n_embd, n_embd), src),
            TensorInfo(p + "ffn_norm.weight", (n_embd,), F32),
            TensorInfo(p + "ffn_gate.weight", (n_embd, n_ff), src),
            TensorInfo(p + "ffn_up.weight", (n_embd, n_ff), src),
            TensorInfo(p + "ffn_down.weight", (n_ff, n_embd), src),
        ]
    random.Random(seed).shuffle(ts)
    return ts


def meta(arch: str, n_layer: int, n_head: int, n_head_kv: int, **extra) -> dict:
    m = {
        "general.architecture": arch,
        f"{arch}.block_count": n_layer,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
    }
    m.update({f"{arch}.{k}": v for k, v in extra.items()})
    return m


def expected_llama(n_layer: int, *, embd, out=None, **roles) -> dict[str, T]:
    """Expected plan for llama_tensors(); each role is a type or a function of the layer index."""
    exp = {"token_embd.weight": embd, "output_norm.weight": F32, "rope_freqs.weight": F32}
    if out is not None:
        exp["output.weight"] = out
    for i in range(n_layer):
        exp[f"blk.{i}.attn_norm.weight"] = F32
        exp[f"blk.{i}.ffn_norm.weight"] = F32
        for role in ROLES:
            t = roles[role]
            exp[f"blk.{i}.{role}.weight"] = t(i) if callable(t) else t
    return exp


def more_bits(hi: T, lo: T, layers=MORE_BITS_32):
    return lambda i: hi if i in layers else lo


def plan_names(plan: dict[str, T]) -> dict[str, str]:
    return {k: v.name for k, v in plan.items()}


def assert_plan(plan: dict[str, T], exp: dict[str, T]) -> None:
    assert set(plan) == set(exp)
    diff = {k: (plan[k].name, exp[k].name) for k in exp if plan[k] != exp[k]}
    assert not diff, f"(got, expected): {diff}"


# Llama-3-8B shapes: 32 layers, 32 query heads over 8 KV heads (n_gqa 4), every row length a
# multiple of 256
L8B = dict(n_layer=32, n_embd=4096, n_ff=14336, n_vocab=128256, n_embd_kv=1024)
L8B_META = meta("llama", 32, 32, 8)


def plan_8b(preset: str, **opts) -> dict[str, T]:
    return plan_tensor_types(llama_tensors(**L8B), L8B_META, QuantOptions(preset, **opts))


# --------------------------------------------------------------------------------------------------
# presets and file type
# --------------------------------------------------------------------------------------------------

FTYPES = {
    "F32": (0, F32), "F16": (1, F16), "BF16": (32, T.BF16), "Q8_0": (7, T.Q8_0),
    "Q4_0": (2, T.Q4_0), "Q4_1": (3, T.Q4_1), "Q5_0": (8, T.Q5_0), "Q5_1": (9, T.Q5_1),
    "Q2_K": (10, T.Q2_K), "Q3_K_S": (11, T.Q3_K), "Q3_K_M": (12, T.Q3_K), "Q3_K_L": (13, T.Q3_K),
    "Q4_K_S": (14, T.Q4_K), "Q4_K_M": (15, T.Q4_K), "Q5_K_S": (16, T.Q5_K), "Q5_K_M": (17, T.Q5_K),
    "Q6_K": (18, T.Q6_K), "IQ4_NL": (25, T.IQ4_NL), "IQ4_XS": (30, T.IQ4_XS),
}  # fmt: skip


def test_preset_table_matches_llama_h():
    assert set(PRESETS) == set(FTYPES)
    for name, (ftype, default) in FTYPES.items():
        p = get_preset(name)
        assert (p.name, p.ftype, p.default_type) == (name, ftype, default)


@pytest.mark.parametrize("name", list(FTYPES))
def test_file_type_is_the_preset_id_whatever_the_options(name):
    ftype = FTYPES[name][0]
    assert file_type_for(QuantOptions(name)) == ftype
    # llama.cpp writes params->ftype; --pure, overrides and explicit types do not change it
    odd = QuantOptions(name, pure=True, tensor_type_overrides=["attn=q8_0"], output_tensor_type="f32",
                       token_embedding_type="q8_0", leave_output_tensor=True)  # fmt: skip
    assert file_type_for(odd) == ftype


def test_get_preset_is_case_insensitive_with_cli_aliases_and_numbers():
    assert get_preset("q4_k_m") is PRESETS["Q4_K_M"]
    assert get_preset(" iq4_xs ") is PRESETS["IQ4_XS"]
    assert get_preset("Q4_K").name == "Q4_K_M"
    assert get_preset("q3_k").name == "Q3_K_M"
    assert get_preset("Q5_K").name == "Q5_K_M"
    assert get_preset("15").name == "Q4_K_M"
    assert get_preset(0).name == "F32"


def test_unknown_preset_is_a_one_line_usage_error_listing_names():
    with pytest.raises(UsageError) as e:
        get_preset("Q9_K")
    msg = str(e.value)
    assert "\n" not in msg and "Q9_K" in msg
    for name in FTYPES:
        assert name in msg
    with pytest.raises(UsageError):
        get_preset("Q2_K_S")  # a llama.cpp preset we do not offer
    with pytest.raises(UsageError):
        QuantOptions("nope")


def test_bits_per_weight():
    assert get_preset("Q4_K_M").bits_per_weight == 4.5
    assert get_preset("Q8_0").bits_per_weight == 8.5
    assert get_preset("F16").bits_per_weight == 16
    assert get_preset("IQ4_XS").bits_per_weight == 4.25
    assert not get_preset("BF16").is_quantized and get_preset("Q6_K").is_quantized


# --------------------------------------------------------------------------------------------------
# option parsing
# --------------------------------------------------------------------------------------------------


def test_override_parsing_like_the_cli():
    pat, t = parse_tensor_type_override(r"BLK\.1\.ATTN_V=Q8_0")
    assert pat.pattern == r"blk\.1\.attn_v" and t == T.Q8_0  # the CLI lower-cases the name
    pat, t = parse_tensor_type_override("ffn_(up|gate)=Iq4_Nl")
    assert pat.search("blk.3.ffn_gate.weight") and t == T.IQ4_NL
    for bad in ("attn_q", "=q8_0", "attn_q=", "attn_q=q9_9", "(=q8_0"):
        with pytest.raises(UsageError):
            parse_tensor_type_override(bad)


def test_override_split_is_at_first_equals_sign():
    with pytest.raises(UsageError):
        # "b=q4_k" is not a type name
        parse_tensor_type_override("a=b=q4_k")


def test_options_normalize_strings_and_pairs():
    o = QuantOptions("q4_k_m", output_tensor_type="Q8_0", token_embedding_type=14,
                     tensor_type_overrides=["attn_v=q6_k", (re.compile("FFN"), "q5_k"), ("ATTN_K", T.Q8_0)])  # fmt: skip
    assert o.preset.name == "Q4_K_M"
    assert o.output_tensor_type == T.Q8_0 and o.token_embedding_type == T.Q6_K
    pats = [(p.pattern, t) for p, t in o.tensor_type_overrides]
    # pairs keep their case, as the C API's tt_overrides does
    assert pats == [("attn_v", T.Q6_K), ("FFN", T.Q5_K), ("ATTN_K", T.Q8_0)]
    assert o.quantize_output_tensor and not QuantOptions("Q8_0", leave_output_tensor=True).quantize_output_tensor
    with pytest.raises(UsageError):
        QuantOptions("Q8_0", output_tensor_type="q7_0")


def test_tensor_info_shapes():
    t = TensorInfo.from_numpy_shape("blk.0.ffn_down_exps.weight", (8, 4096, 14336), "bf16")
    assert t.ne == (14336, 4096, 8) and t.n_dims == 3 and t.type == T.BF16
    assert TensorInfo("x", (4096, 1), F16).n_dims == 1  # ggml_n_dims ignores trailing 1s
    assert TensorInfo("x", (1, 4096), F16).n_dims == 2
    assert TensorInfo("x", (256, 128, 1, 1), F16).n_dims == 2


def test_model_info_from_metadata():
    m = ModelInfo.from_metadata(meta("llama", 32, 32, 8))
    assert (m.n_layer, m.n_gqa, m.n_expert, m.is_70b) == (32, 4, 0, False)
    # head_count_kv defaults to head_count; per-layer arrays are read at layer 0
    m = ModelInfo.from_metadata({"general.architecture": "x", "x.block_count": 2, "x.attention.head_count": [16, 4]})
    assert (m.n_head, m.n_head_kv, m.n_gqa) == (16, 16, 1)
    m = ModelInfo.from_metadata({"general.architecture": "x", "x.block_count": 2})
    assert m.n_gqa == 0
    with pytest.raises(FormatError):
        ModelInfo.from_metadata({"general.architecture": "llama"})
    with pytest.raises(FormatError):
        ModelInfo.from_metadata({"llama.block_count": 3})


@pytest.mark.parametrize(
    "arch, n_layer, n_head, n_kv, extra, is_70b",
    [
        ("llama", 80, 64, 8, {}, True),
        ("llama", 80, 64, 64, {}, False),  # no GQA: LLM_TYPE_65B
        ("llama", 80, 64, 8, {"expert_count": 8}, False),  # 8 experts: a Mixtral size class
        ("llama", 81, 64, 8, {"nextn_predict_layers": 1}, True),  # the MTP layer does not count
        ("qwen2", 80, 64, 64, {}, True),
        ("olmo", 80, 64, 64, {}, True),
        ("deci", 80, 64, 8, {}, True),
        ("jais2", 68, 64, 8, {}, True),
        ("jais2", 80, 64, 8, {}, False),
        ("mistral3", 80, 64, 8, {}, False),
    ],
)
def test_70b_classification(arch, n_layer, n_head, n_kv, extra, is_70b):
    assert ModelInfo.from_metadata(meta(arch, n_layer, n_head, n_kv, **extra)).is_70b is is_70b


def test_llama_tensor_order_is_layer_number_then_bytes():
    names = ["blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight", "blk.2.attn_v.weight",
             "token_embd.weight", "blk.1.attn_q.weight", "output_norm.weight", "blkx.weight"]  # fmt: skip
    assert llama_tensor_order(names) == [
        "blkx.weight", "output.weight", "output_norm.weight", "token_embd.weight",
        "blk.1.attn_q.weight", "blk.2.attn_v.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight",
    ]  # fmt: skip


def test_plan_is_in_llama_order():
    plan = plan_8b("Q8_0")
    assert list(plan) == llama_tensor_order(plan)
    assert list(plan)[:4] == ["output.weight", "output_norm.weight", "rope_freqs.weight", "token_embd.weight"]


# --------------------------------------------------------------------------------------------------
# the presets on a Llama-3-8B-shaped model
# --------------------------------------------------------------------------------------------------

Q4K, Q5K, Q6K, Q3K, Q2K = T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K

EXPECTED_8B = {
    # untied token_embd keeps the default type; output.weight becomes Q6_K unless it is Q8_0
    "F32": dict(embd=F32, out=F32, attn_q=F32, attn_k=F32, attn_v=F32, attn_output=F32, ffn_gate=F32, ffn_up=F32, ffn_down=F32),
    "F16": dict(embd=F16, out=F16, attn_q=F16, attn_k=F16, attn_v=F16, attn_output=F16, ffn_gate=F16, ffn_up=F16, ffn_down=F16),
    "BF16": dict(embd=T.BF16, out=T.BF16, attn_q=T.BF16, attn_k=T.BF16, attn_v=T.BF16, attn_output=T.BF16,
                 ffn_gate=T.BF16, ffn_up=T.BF16, ffn_down=T.BF16),
    "Q8_0": dict(embd=T.Q8_0, out=T.Q8_0, attn_q=T.Q8_0, attn_k=T.Q8_0, attn_v=T.Q8_0, attn_output=T.Q8_0,
                 ffn_gate=T.Q8_0, ffn_up=T.Q8_0, ffn_down=T.Q8_0),
    "Q4_0": dict(embd=T.Q4_0, out=Q6K, attn_q=T.Q4_0, attn_k=T.Q4_0, attn_v=T.Q4_0, attn_output=T.Q4_0,
                 ffn_gate=T.Q4_0, ffn_up=T.Q4_0, ffn_down=T.Q4_0),
    "Q4_1": dict(embd=T.Q4_1, out=Q6K, attn_q=T.Q4_1, attn_k=T.Q4_1, attn_v=T.Q4_1, attn_output=T.Q4_1,
                 ffn_gate=T.Q4_1, ffn_up=T.Q4_1, ffn_down=T.Q4_1),
    "Q5_0": dict(embd=T.Q5_0, out=Q6K, attn_q=T.Q5_0, attn_k=T.Q5_0, attn_v=T.Q5_0, attn_output=T.Q5_0,
                 ffn_gate=T.Q5_0, ffn_up=T.Q5_0, ffn_down=T.Q5_0),
    "Q5_1": dict(embd=T.Q5_1, out=Q6K, attn_q=T.Q5_1, attn_k=T.Q5_1, attn_v=T.Q5_1, attn_output=T.Q5_1,
                 ffn_gate=T.Q5_1, ffn_up=T.Q5_1, ffn_down=T.Q5_1),
    # n_gqa 4 -> attn_v Q4_K; ffn_down and attn_output Q3_K
    "Q2_K": dict(embd=Q2K, out=Q6K, attn_q=Q2K, attn_k=Q2K, attn_v=Q4K, attn_output=Q3K,
                 ffn_gate=Q2K, ffn_up=Q2K, ffn_down=Q3K),
    "Q3_K_S": dict(embd=Q3K, out=Q6K, attn_q=Q3K, attn_k=Q3K, attn_v=Q3K, attn_output=Q3K,
                   ffn_gate=Q3K, ffn_up=Q3K, ffn_down=Q3K),
    # attn_v: first two Q5_K, rest Q4_K; ffn_down: i < 32/16 Q5_K, rest Q4_K; attn_output Q4_K
    "Q3_K_M": dict(embd=Q3K, out=Q6K, attn_q=Q3K, attn_k=Q3K, attn_v=lambda i: Q5K if i < 2 else Q4K,
                   attn_output=Q4K, ffn_gate=Q3K, ffn_up=Q3K, ffn_down=lambda i: Q5K if i < 2 else Q4K),
    "Q3_K_L": dict(embd=Q3K, out=Q6K, attn_q=Q3K, attn_k=Q3K, attn_v=Q5K, attn_output=Q5K,
                   ffn_gate=Q3K, ffn_up=Q3K, ffn_down=Q5K),
    # attn_v: first four Q5_K; ffn_down: i < 32/8 Q5_K
    "Q4_K_S": dict(embd=Q4K, out=Q6K, attn_q=Q4K, attn_k=Q4K, attn_v=lambda i: Q5K if i < 4 else Q4K,
                   attn_output=Q4K, ffn_gate=Q4K, ffn_up=Q4K, ffn_down=lambda i: Q5K if i < 4 else Q4K),
    "Q4_K_M": dict(embd=Q4K, out=Q6K, attn_q=Q4K, attn_k=Q4K, attn_v=more_bits(Q6K, Q4K), attn_output=Q4K,
                   ffn_gate=Q4K, ffn_up=Q4K, ffn_down=more_bits(Q6K, Q4K)),
    "Q5_K_S": dict(embd=Q5K, out=Q6K, attn_q=Q5K, attn_k=Q5K, attn_v=Q5K, attn_output=Q5K,
                   ffn_gate=Q5K, ffn_up=Q5K, ffn_down=Q5K),
    "Q5_K_M": dict(embd=Q5K, out=Q6K, attn_q=Q5K, attn_k=Q5K, attn_v=more_bits(Q6K, Q5K), attn_output=Q5K,
                   ffn_gate=Q5K, ffn_up=Q5K, ffn_down=more_bits(Q6K, Q5K)),
    "Q6_K": dict(embd=Q6K, out=Q6K, attn_q=Q6K, attn_k=Q6K, attn_v=Q6K, attn_output=Q6K,
                 ffn_gate=Q6K, ffn_up=Q6K, ffn_down=Q6K),
    # n_gqa >= 4 -> attn_v Q5_K; without an imatrix ffn_down i < 4 -> Q5_K
    "IQ4_NL": dict(embd=T.IQ4_NL, out=Q6K, attn_q=T.IQ4_NL, attn_k=T.IQ4_NL, attn_v=Q5K, attn_output=T.IQ4_NL,
                   ffn_gate=T.IQ4_NL, ffn_up=T.IQ4_NL, ffn_down=lambda i: Q5K if i < 4 else T.IQ4_NL),
    "IQ4_XS": dict(embd=T.IQ4_XS, out=Q6K, attn_q=T.IQ4_XS, attn_k=T.IQ4_XS, attn_v=Q5K, attn_output=T.IQ4_XS,
                   ffn_gate=T.IQ4_XS, ffn_up=T.IQ4_XS, ffn_down=lambda i: Q5K if i < 4 else T.IQ4_XS),
}  # fmt: skip


@pytest.mark.parametrize("preset", list(EXPECTED_8B))
def test_llama_8b(preset):
    assert_plan(plan_8b(preset), expected_llama(32, **EXPECTED_8B[preset]))


def test_q4_k_m_llama_8b_type_counts():
    # the well-known census of a Llama-3-8B Q4_K_M: 33 Q6_K (16 attn_v, 16 ffn_down, output), 193 Q4_K
    counts: dict[str, int] = {}
    for t in plan_8b("Q4_K_M").values():
        counts[t.name] = counts.get(t.name, 0) + 1
    assert counts == {"Q6_K": 33, "Q4_K": 193, "F32": 66}


def test_layer_order_is_numeric_not_lexicographic():
    # blk.10 comes after blk.9: the attn_v counter follows the layer number
    plan = plan_8b("Q4_K_M")
    assert plan["blk.9.attn_v.weight"] == Q6K and plan["blk.10.attn_v.weight"] == Q4K
    assert plan["blk.27.attn_v.weight"] == Q6K and plan["blk.26.attn_v.weight"] == Q4K


# --------------------------------------------------------------------------------------------------
# a 2-layer toy with rows of 64 and 128 (no multiple of 256): the fallbacks
# --------------------------------------------------------------------------------------------------

TOY = dict(n_layer=2, n_embd=64, n_ff=128, n_vocab=100, n_embd_kv=64)
TOY_META = meta("llama", 2, 4, 4)  # n_gqa 1
# use_more_bits(i, 2): only layer 1 (i >= 7*2/8 = 1)


def plan_toy(preset: str, tied: bool = False, **opts) -> dict[str, T]:
    return plan_tensor_types(llama_tensors(**TOY, tied=tied), TOY_META, QuantOptions(preset, **opts))


EXPECTED_TOY = {
    # output.weight: 64 % 256 != 0 -> Q8_0 (64 % 32 == 0, so it stays); Q4_K -> Q5_0, Q6_K -> Q8_0
    "Q4_K_M": dict(embd=T.Q5_0, out=T.Q8_0, attn_q=T.Q5_0, attn_k=T.Q5_0, attn_output=T.Q5_0, ffn_gate=T.Q5_0,
                   ffn_up=T.Q5_0, attn_v=lambda i: T.Q8_0 if i == 1 else T.Q5_0,
                   ffn_down=lambda i: T.Q8_0 if i == 1 else T.Q5_0),
    # Q5_K -> Q5_1
    "Q5_K_M": dict(embd=T.Q5_1, out=T.Q8_0, attn_q=T.Q5_1, attn_k=T.Q5_1, attn_output=T.Q5_1, ffn_gate=T.Q5_1,
                   ffn_up=T.Q5_1, attn_v=lambda i: T.Q8_0 if i == 1 else T.Q5_1,
                   ffn_down=lambda i: T.Q8_0 if i == 1 else T.Q5_1),
    # n_gqa 1 -> attn_v Q3_K; Q2_K and Q3_K both fall back to Q4_0
    "Q2_K": dict(embd=T.Q4_0, out=T.Q8_0, attn_q=T.Q4_0, attn_k=T.Q4_0, attn_v=T.Q4_0, attn_output=T.Q4_0,
                 ffn_gate=T.Q4_0, ffn_up=T.Q4_0, ffn_down=T.Q4_0),
    # Q3_K_M: attn_v Q5_K (i < 2) -> Q5_1; ffn_down i < 2/16 = 0 never -> Q4_K -> Q5_0
    "Q3_K_M": dict(embd=T.Q4_0, out=T.Q8_0, attn_q=T.Q4_0, attn_k=T.Q4_0, attn_v=T.Q5_1, attn_output=T.Q5_0,
                   ffn_gate=T.Q4_0, ffn_up=T.Q4_0, ffn_down=T.Q5_0),
    # n_gqa 1: no attn_v bump, ffn_down i < 0 never; IQ4_XS -> IQ4_NL
    "IQ4_XS": dict(embd=T.IQ4_NL, out=T.Q8_0, attn_q=T.IQ4_NL, attn_k=T.IQ4_NL, attn_v=T.IQ4_NL,
                   attn_output=T.IQ4_NL, ffn_gate=T.IQ4_NL, ffn_up=T.IQ4_NL, ffn_down=T.IQ4_NL),
    # IQ4_NL output: 64 % 32 == 0 -> Q6_K, which falls back to Q8_0
    "IQ4_NL": dict(embd=T.IQ4_NL, out=T.Q8_0, attn_q=T.IQ4_NL, attn_k=T.IQ4_NL, attn_v=T.IQ4_NL,
                   attn_output=T.IQ4_NL, ffn_gate=T.IQ4_NL, ffn_up=T.IQ4_NL, ffn_down=T.IQ4_NL),
    "Q4_0": dict(embd=T.Q4_0, out=T.Q8_0, attn_q=T.Q4_0, attn_k=T.Q4_0, attn_v=T.Q4_0, attn_output=T.Q4_0,
                 ffn_gate=T.Q4_0, ffn_up=T.Q4_0, ffn_down=T.Q4_0),
    "Q6_K": dict(embd=T.Q8_0, out=T.Q8_0, attn_q=T.Q8_0, attn_k=T.Q8_0, attn_v=T.Q8_0, attn_output=T.Q8_0,
                 ffn_gate=T.Q8_0, ffn_up=T.Q8_0, ffn_down=T.Q8_0),
}  # fmt: skip


@pytest.mark.parametrize("preset", list(EXPECTED_TOY))
def test_toy_fallbacks(preset):
    assert_plan(plan_toy(preset), expected_llama(2, **EXPECTED_TOY[preset]))


def test_rows_not_multiple_of_32_end_as_f16():
    # 48 % 32 != 0: output goes Q8_0 (48 % 32) and then F16; Q4_K -> Q5_0 -> F16; ffn_down (96) is fine
    ts = llama_tensors(n_layer=1, n_embd=48, n_ff=96, n_vocab=10, n_embd_kv=48)
    plan = plan_tensor_types(ts, meta("llama", 1, 4, 4), QuantOptions("Q4_K_S"))
    assert plan["output.weight"] == F16
    assert plan["token_embd.weight"] == F16
    assert plan["blk.0.attn_q.weight"] == F16
    assert plan["blk.0.ffn_gate.weight"] == F16
    assert plan["blk.0.ffn_down.weight"] == T.Q5_0  # i < 1/8 = 0 never: Q4_K on 96 -> Q5_0
    plan = plan_tensor_types(ts, meta("llama", 1, 4, 4), QuantOptions("Q4_0"))
    assert plan["output.weight"] == F16  # Q4_0 block does not divide 48 -> Q8_0 -> F16
    assert plan["blk.0.attn_q.weight"] == F16
    assert plan["blk.0.ffn_down.weight"] == T.Q4_0


@pytest.mark.parametrize(
    "override, ncols, expected",
    [
        ("q2_k", 64, T.Q4_0), ("q3_k", 64, T.Q4_0), ("q4_k", 64, T.Q5_0), ("q5_k", 64, T.Q5_1),
        ("q6_k", 64, T.Q8_0), ("iq4_xs", 64, T.IQ4_NL), ("iq3_s", 64, T.IQ4_NL), ("tq2_0", 64, T.Q4_0),
        ("q4_k", 256, T.Q4_K), ("q6_k", 512, T.Q6_K), ("q8_0", 64, T.Q8_0), ("iq4_nl", 64, T.IQ4_NL),
        ("q4_k", 48, F16), ("q6_k", 48, F16), ("q8_0", 48, F16), ("iq4_nl", 48, F16), ("mxfp4", 48, F16),
        ("q4_0", 48, F16), ("f16", 48, F16), ("f32", 48, F32), ("bf16", 100, T.BF16),
    ],
)  # fmt: skip
def test_fallback_of_overridden_types(override, ncols, expected):
    ts = [TensorInfo("blk.0.attn_q.weight", (ncols, 32), F32)]
    opts = QuantOptions("Q8_0", tensor_type_overrides=[f"attn_q={override}"])
    assert plan_tensor_types(ts, meta("llama", 1, 4, 4), opts) == {"blk.0.attn_q.weight": expected}


def test_fallback_missing_for_large_block_types_is_an_error():
    ts = [TensorInfo("blk.0.attn_q.weight", (64, 32), F32)]
    with pytest.raises(UsageError, match="fallback"):
        plan_tensor_types(ts, meta("llama", 1, 4, 4), QuantOptions("Q8_0", tensor_type_overrides=["attn_q=q8_k"]))


# --------------------------------------------------------------------------------------------------
# tied embeddings, output/token-embedding options, --pure, --leave-output-tensor
# --------------------------------------------------------------------------------------------------

TIED = dict(n_layer=2, n_embd=256, n_ff=512, n_vocab=1000, n_embd_kv=256)


def plan_tied(preset: str, tied: bool = True, **opts) -> dict[str, T]:
    return plan_tensor_types(llama_tensors(**TIED, tied=tied), meta("llama", 2, 4, 4), QuantOptions(preset, **opts))


@pytest.mark.parametrize(
    "preset, embd",
    [("Q4_K_M", Q6K), ("Q3_K_S", Q6K), ("Q4_0", Q6K), ("IQ4_XS", Q6K), ("Q8_0", T.Q8_0), ("Q6_K", Q6K),
     ("F16", F16), ("BF16", T.BF16)],
)  # fmt: skip
def test_tied_token_embd_is_treated_as_output(preset, embd):
    plan = plan_tied(preset)
    assert "output.weight" not in plan
    assert plan["token_embd.weight"] == embd


def test_tied_token_embd_with_unaligned_rows():
    # n_embd 64 with tied embeddings: 64 % 256 != 0 -> Q8_0 (the output rule)
    assert plan_toy("Q4_K_M", tied=True)["token_embd.weight"] == T.Q8_0
    # Q4_0: 64 % 32 == 0 -> Q6_K, which falls back to Q8_0
    assert plan_toy("Q4_0", tied=True)["token_embd.weight"] == T.Q8_0


def test_untied_token_embd_keeps_default_type():
    assert plan_tied("Q4_K_M", tied=False)["token_embd.weight"] == Q4K
    assert plan_tied("Q4_K_M", tied=False)["output.weight"] == Q6K


def test_output_tensor_type():
    plan = plan_tied("Q4_K_M", tied=False, output_tensor_type="q8_0")
    assert plan["output.weight"] == T.Q8_0 and plan["token_embd.weight"] == Q4K
    # with tied embeddings token_embd follows --output-tensor-type
    assert plan_tied("Q4_K_M", output_tensor_type="q5_k")["token_embd.weight"] == Q5K
    # ... and gets the row fallback, since it goes through the normal path (Q5_K on 64 -> Q5_1)
    assert plan_toy("Q4_K_M", tied=True, output_tensor_type="q5_k")["token_embd.weight"] == T.Q5_1
    # it applies even to F16 files
    assert plan_tied("F16", tied=False, output_tensor_type="q8_0")["output.weight"] == T.Q8_0


def test_explicit_output_type_skips_the_fallback_so_llama_cpp_aborts():
    # output.weight returns --output-tensor-type before any fallback; gguf_set_tensor_type then aborts
    with pytest.raises(UsageError, match="output.weight"):
        plan_toy("Q4_K_M", output_tensor_type="q5_k")
    with pytest.raises(UsageError, match="token_embd.weight"):
        plan_toy("Q4_K_M", token_embedding_type="q6_k")


def test_token_embedding_type():
    plan = plan_tied("Q4_K_M", tied=False, token_embedding_type="q8_0", tensor_type_overrides=["token_embd=f16"])
    assert plan["token_embd.weight"] == T.Q8_0  # wins over a matching --tensor-type
    assert plan["output.weight"] == Q6K
    assert plan_tied("Q4_K_M", token_embedding_type="q8_0")["token_embd.weight"] == T.Q8_0  # tied too
    assert plan_tied("F16", tied=False, token_embedding_type="q6_k")["token_embd.weight"] == Q6K
    assert plan_tied("Q4_K_M", pure=True, token_embedding_type="q8_0")["token_embd.weight"] == T.Q8_0


def test_per_layer_token_embd():
    ts = llama_tensors(**TIED) + [TensorInfo("per_layer_token_embd.weight", (256, 1000), F16)]
    m = meta("llama", 2, 4, 4)
    # it is a token-embedding tensor: --token-embedding-type applies to it...
    plan = plan_tensor_types(ts, m, QuantOptions("Q4_K_M", token_embedding_type="q8_0"))
    assert plan["per_layer_token_embd.weight"] == T.Q8_0
    # ...unless a --tensor-type pattern names it
    opts = QuantOptions("Q4_K_M", token_embedding_type="q8_0", tensor_type_overrides=["per_layer=q5_k"])
    plan = plan_tensor_types(ts, m, opts)
    assert plan["per_layer_token_embd.weight"] == Q5K and plan["token_embd.weight"] == T.Q8_0
    assert plan_tensor_types(ts, m, QuantOptions("Q4_K_M"))["per_layer_token_embd.weight"] == Q4K


def test_pure():
    exp = expected_llama(32, embd=Q4K, out=Q4K, **{r: Q4K for r in ROLES})
    assert_plan(plan_8b("Q4_K_M", pure=True), exp)
    # pure still honours --output-tensor-type and still falls back on short rows
    assert plan_8b("Q4_K_M", pure=True, output_tensor_type="q8_0")["output.weight"] == T.Q8_0
    plan = plan_toy("Q4_K_M", pure=True)
    assert plan["output.weight"] == T.Q5_0 and plan["blk.1.attn_v.weight"] == T.Q5_0
    assert plan_tied("Q4_0", pure=True)["token_embd.weight"] == T.Q4_0


def test_leave_output_tensor():
    plan = plan_8b("Q4_K_M", leave_output_tensor=True)
    assert plan["output.weight"] == F16  # copied as it is
    assert plan["token_embd.weight"] == Q4K  # output.weight exists, so the embeddings are not tied
    exp = expected_llama(32, **{**EXPECTED_8B["Q4_K_M"], "out": F16})
    assert_plan(plan, exp)
    # --output-tensor-type cannot reach a tensor that is left alone
    assert plan_8b("Q4_K_M", leave_output_tensor=True, output_tensor_type="q8_0")["output.weight"] == F16


# --------------------------------------------------------------------------------------------------
# --tensor-type overrides
# --------------------------------------------------------------------------------------------------


def test_override_all_attn_v():
    plan = plan_8b("Q4_K_M", tensor_type_overrides=["attn_v=q8_0"])
    exp = expected_llama(32, **{**EXPECTED_8B["Q4_K_M"], "attn_v": T.Q8_0})
    assert_plan(plan, exp)


def test_overridden_tensors_do_not_advance_the_attn_v_counter():
    # blk.1.attn_v skips the mix, so layer j >= 2 is attn_v number j-1 for use_more_bits(., 32)
    plan = plan_8b("Q4_K_M", tensor_type_overrides=[r"blk\.1\.attn_v=q8_0"])
    six_k = {0, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 29, 30, 31}
    for i in range(32):
        want = T.Q8_0 if i == 1 else (Q6K if i in six_k else Q4K)
        assert plan[f"blk.{i}.attn_v.weight"] == want, i
    # ffn_down is untouched
    for i in range(32):
        assert plan[f"blk.{i}.ffn_down.weight"] == (Q6K if i in MORE_BITS_32 else Q4K)


def test_first_matching_override_wins_and_patterns_search_anywhere():
    plan = plan_8b("Q4_K_M", tensor_type_overrides=["attn_.*=q8_0", "attn_v=f16", "ffn_(gate|up)=q5_k"])
    assert plan["blk.0.attn_v.weight"] == T.Q8_0
    assert plan["blk.5.attn_output.weight"] == T.Q8_0
    assert plan["blk.5.ffn_gate.weight"] == Q5K and plan["blk.5.ffn_up.weight"] == Q5K
    assert plan["blk.5.attn_norm.weight"] == F32  # norms are never quantized
    assert plan["blk.6.ffn_down.weight"] == Q6K


def test_override_can_name_output_and_skips_its_rule():
    plan = plan_8b("Q4_K_M", tensor_type_overrides=["output=q5_k"])
    assert plan["output.weight"] == Q5K
    assert plan["blk.3.attn_output.weight"] == Q5K  # "output" is found in attn_output too
    assert plan["output_norm.weight"] == F32


def test_cli_override_is_lowercased_pair_is_not():
    assert plan_8b("Q4_K_M", tensor_type_overrides=["ATTN_Q=q8_0"])["blk.0.attn_q.weight"] == T.Q8_0
    assert plan_8b("Q4_K_M", tensor_type_overrides=[("ATTN_Q", "q8_0")])["blk.0.attn_q.weight"] == Q4K


def test_overrides_are_ignored_for_float_presets():
    # llama.cpp only looks at --tensor-type when the preset's default type is quantized
    for preset, t in (("F16", F16), ("BF16", T.BF16), ("F32", F32)):
        assert plan_8b(preset, tensor_type_overrides=["attn_q=q8_0"])["blk.0.attn_q.weight"] == t


def test_very_low_bit_override_needs_an_imatrix():
    with pytest.raises(UsageError, match="imatrix"):
        plan_8b("Q4_K_M", tensor_type_overrides=["attn_q=iq2_xxs"])
    assert plan_8b("Q4_K_M", tensor_type_overrides=["attn_q=iq2_xxs"], has_imatrix=True)["blk.0.attn_q.weight"] == T.IQ2_XXS
    # output.weight and token_embd are exempt from that requirement
    plan = plan_8b("Q4_K_M", tensor_type_overrides=["^output=iq2_xxs", "token_embd=iq1_s"])
    assert plan["output.weight"] == T.IQ2_XXS and plan["token_embd.weight"] == T.IQ1_S


# --------------------------------------------------------------------------------------------------
# imatrix-dependent rules
# --------------------------------------------------------------------------------------------------


def test_imatrix_changes_q4_0_and_iq4_ffn_down():
    plan = plan_8b("Q4_0", has_imatrix=True)
    assert [plan[f"blk.{i}.ffn_down.weight"] for i in (0, 3, 4, 31)] == [T.Q4_1, T.Q4_1, T.Q4_0, T.Q4_0]
    plan = plan_8b("Q5_0", has_imatrix=True)
    assert [plan[f"blk.{i}.ffn_down.weight"] for i in (0, 3, 4)] == [T.Q5_1, T.Q5_1, T.Q5_0]
    plan = plan_8b("IQ4_XS", has_imatrix=True)
    assert [plan[f"blk.{i}.ffn_down.weight"] for i in (0, 3, 4)] == [T.IQ4_XS] * 3
    assert plan_8b("Q4_1", has_imatrix=True)["blk.0.ffn_down.weight"] == T.Q4_1


# --------------------------------------------------------------------------------------------------
# counters: attn_v counted from tensors, ffn_down compared with the block count
# --------------------------------------------------------------------------------------------------


def test_attn_v_count_comes_from_the_tensor_list():
    # 8 blocks, attn_v only in layers 0,1,3,4,6,7: n_attention_wv = 6, use_more_bits(i, 6) holds for
    # i in {2, 5} (i >= 42/8 = 5, or i % 3 == 2) -> the 3rd and 6th attn_v (layers 3 and 7)
    ts = [t for t in llama_tensors(8, 256, 512, 100, 256) if t.name not in ("blk.2.attn_v.weight", "blk.5.attn_v.weight")]
    plan = plan_tensor_types(ts, meta("llama", 8, 4, 4), QuantOptions("Q4_K_M"))
    got = {i: plan[f"blk.{i}.attn_v.weight"] for i in (0, 1, 3, 4, 6, 7)}
    assert got == {0: Q4K, 1: Q4K, 3: Q6K, 4: Q4K, 6: Q4K, 7: Q6K}


def test_ffn_down_layer_is_a_running_count_against_block_count():
    # layer 0 has no ffn_down: the counter gives layers 1..7 indices 0..6, compared with n = 8
    # (the block count), so use_more_bits holds at indices 0, 3, 6 -> layers 1, 4, 7
    ts = [t for t in llama_tensors(8, 256, 512, 100, 256) if t.name != "blk.0.ffn_down.weight"]
    plan = plan_tensor_types(ts, meta("llama", 8, 4, 4), QuantOptions("Q4_K_M"))
    got = {i for i in range(1, 8) if plan[f"blk.{i}.ffn_down.weight"] == Q6K}
    assert got == {1, 4, 7}


# --------------------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------------------


def moe_tensors(n_layer: int, n_embd: int, n_ff: int, n_expert: int, shared: bool = False) -> list[TensorInfo]:
    ts = [t for t in llama_tensors(n_layer, n_embd, n_ff, 1000, n_embd // 4) if not any(
        f".{r}.weight" in t.name for r in ("ffn_gate", "ffn_up", "ffn_down"))]  # fmt: skip
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [
            TensorInfo(p + "ffn_gate_inp.weight", (n_embd, n_expert), F32),
            TensorInfo(p + "ffn_gate_exps.weight", (n_embd, n_ff, n_expert), F16),
            TensorInfo(p + "ffn_up_exps.weight", (n_embd, n_ff, n_expert), F16),
            TensorInfo(p + "ffn_down_exps.weight", (n_ff, n_embd, n_expert), F16),
        ]
        if shared:
            ts += [
                TensorInfo(p + "ffn_gate_shexp.weight", (n_embd, n_ff), F16),
                TensorInfo(p + "ffn_up_shexp.weight", (n_embd, n_ff), F16),
                TensorInfo(p + "ffn_down_shexp.weight", (n_ff, n_embd), F16),
            ]
    random.Random(1).shuffle(ts)
    return ts


def test_mixtral_like_8_experts_q4_k_m():
    ts = moe_tensors(32, 4096, 14336, 8)
    plan = plan_tensor_types(ts, meta("llama", 32, 32, 8, expert_count=8, expert_used_count=2), QuantOptions("Q4_K_M"))
    for i in range(32):
        p = f"blk.{i}."
        assert plan[p + "attn_v.weight"] == T.Q8_0  # 8 experts: attn_v and attn_k go to Q8_0
        assert plan[p + "attn_k.weight"] == T.Q8_0
        assert plan[p + "attn_output.weight"] == Q5K
        assert plan[p + "attn_q.weight"] == Q4K
        assert plan[p + "ffn_gate_inp.weight"] == F32  # the router is never quantized
        assert plan[p + "ffn_gate_exps.weight"] == Q4K
        assert plan[p + "ffn_up_exps.weight"] == Q4K
        # the layer comes from the name
        assert plan[p + "ffn_down_exps.weight"] == (Q6K if i in MORE_BITS_32 else Q4K)
    assert plan["output.weight"] == Q6K and plan["token_embd.weight"] == Q4K


def test_moe_layer_comes_from_the_name_with_shared_experts():
    # two ffn_down tensors per layer; with n_expert > 1 both use their block number, not a counter
    ts = moe_tensors(8, 256, 512, 4, shared=True)
    plan = plan_tensor_types(ts, meta("qwen2moe", 8, 16, 16, expert_count=4, expert_used_count=2),
                             QuantOptions("Q4_K_M"))  # fmt: skip
    for i in range(8):
        want = Q6K if i in MORE_BITS_8 else Q4K
        assert plan[f"blk.{i}.ffn_down_exps.weight"] == want
        assert plan[f"blk.{i}.ffn_down_shexp.weight"] == want
        assert plan[f"blk.{i}.attn_v.weight"] == want  # 4 experts: no Q8_0 bump
        assert plan[f"blk.{i}.attn_k.weight"] == Q4K
    # Q3_K_M: ffn_down i < 8/16 = 0 never, all the rest Q4_K
    plan = plan_tensor_types(ts, meta("qwen2moe", 8, 16, 16, expert_count=4), QuantOptions("Q3_K_M"))
    assert {plan[f"blk.{i}.ffn_down_exps.weight"] for i in range(8)} == {Q4K}


def test_moe_tensor_without_layer_is_an_error():
    ts = moe_tensors(2, 256, 512, 4) + [TensorInfo("mtp.ffn_down.weight", (512, 256), F16)]
    with pytest.raises(FormatError, match="layer"):
        plan_tensor_types(ts, meta("qwen2moe", 2, 4, 4, expert_count=4), QuantOptions("Q8_0"))


def test_moe_expert_3d_tensors_are_quantized_and_degenerate_3d_too():
    ts = [TensorInfo("blk.0.ffn_up_exps.weight", (256, 64, 4), F16), TensorInfo("blk.0.ffn_up.weight", (256, 64, 1), F16)]
    plan = plan_tensor_types(ts, meta("x", 1, 4, 4, expert_count=4), QuantOptions("Q5_K_S"))
    assert plan == {"blk.0.ffn_up.weight": Q5K, "blk.0.ffn_up_exps.weight": Q5K}


# --------------------------------------------------------------------------------------------------
# arch-specific rules
# --------------------------------------------------------------------------------------------------


def test_70b_attn_v_gets_q5_k():
    ts = llama_tensors(80, 256, 512, 1000, 256)
    plan = plan_tensor_types(ts, meta("llama", 80, 64, 8), QuantOptions("Q3_K_S"))
    assert {plan[f"blk.{i}.attn_v.weight"] for i in range(80)} == {Q5K}
    assert plan["blk.0.attn_q.weight"] == Q3K
    # Q4_K_M: Q4_K attn_v become Q5_K, the use_more_bits ones stay Q6_K (use_more_bits(i, 80): i < 10,
    # i >= 70, or (i - 10) % 3 == 2)
    plan = plan_tensor_types(ts, meta("llama", 80, 64, 8), QuantOptions("Q4_K_M"))
    assert plan["blk.0.attn_v.weight"] == Q6K and plan["blk.10.attn_v.weight"] == Q5K
    assert plan["blk.12.attn_v.weight"] == Q6K and plan["blk.70.attn_v.weight"] == Q6K
    # no GQA: a 65B, no bump
    plan = plan_tensor_types(ts, meta("llama", 80, 64, 64), QuantOptions("Q3_K_S"))
    assert {plan[f"blk.{i}.attn_v.weight"] for i in range(80)} == {Q3K}


def test_falcon():
    ts = [t for t in llama_tensors(32, 4544, 18176, 65024, 64)
          if not any(r in t.name for r in ("attn_q.", "attn_k.", "attn_v."))]  # fmt: skip
    ts += [TensorInfo(f"blk.{i}.attn_qkv.weight", (4608, 4672), F16) for i in range(32)]
    # 4544 = 17.75 * 256: not a multiple of 256 (but of 32)
    plan = plan_tensor_types(ts, meta("falcon", 32, 71, 1), QuantOptions("Q4_K_M"))
    assert plan["output.weight"] == T.Q8_0  # falcon output is always Q8_0
    # attn_qkv takes the attn_v rule; its rows (4608 = 18 * 256) divide
    for i in range(32):
        assert plan[f"blk.{i}.attn_qkv.weight"] == (Q6K if i in MORE_BITS_32 else Q4K)
    # falcon Q4_K_M ffn_down: i < 2 -> Q6_K, use_more_bits -> Q5_K, else Q4_K; rows of 18176 divide
    for i in range(32):
        want = Q6K if i < 2 else (Q5K if i in MORE_BITS_32 else Q4K)
        assert plan[f"blk.{i}.ffn_down.weight"] == want
    # rows of 4544 do not divide 256: Q4_K -> Q5_0
    assert plan["blk.0.attn_output.weight"] == T.Q5_0 and plan["token_embd.weight"] == T.Q5_0
    plan = plan_tensor_types(ts, meta("falcon", 32, 71, 1), QuantOptions("Q3_K_L"))
    assert plan["blk.0.attn_output.weight"] == T.Q5_0  # Q4_K for falcon, then the fallback
    assert plan["blk.5.ffn_down.weight"] == Q4K


@pytest.mark.parametrize(
    "preset, expected",
    [
        # attn_qkv goes through the attn_v branch: Q3_K_M -> first two Q5_K, then Q4_K
        ("Q3_K_M", lambda i: Q5K if i < 2 else Q4K),
        ("Q5_K_M", lambda i: Q6K if i in MORE_BITS_32 else Q5K),
        ("Q4_K_S", lambda i: Q5K if i < 4 else Q4K),
        ("Q2_K", lambda i: Q3K),  # n_gqa 1
    ],
)
def test_fused_qkv_follows_attn_v_rules(preset, expected):
    ts = [TensorInfo(f"blk.{i}.attn_qkv.weight", (2560, 7680), F16) for i in range(32)]
    plan = plan_tensor_types(ts, meta("phi2", 32, 32, 32), QuantOptions(preset))
    assert [plan[f"blk.{i}.attn_qkv.weight"] for i in range(32)] == [expected(i) for i in range(32)]


# --------------------------------------------------------------------------------------------------
# tensors that are never quantized
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, ne, allowed",
    [
        ("blk.0.attn_q.weight", (256, 256), True),
        ("blk.0.attn_norm.weight", (256,), False),
        ("blk.0.attn_q_norm.weight", (256, 4), False),  # any "_norm.weight"
        ("blk.0.attn_q.bias", (256, 4), False),  # not a weight
        ("blk.0.exp_probs_b.bias", (256, 4), False),
        ("blk.0.foo.weight", (256, 1), False),  # one dimension after all
        ("blk.0.foo.weight", (256, 1, 1, 1), False),
        ("blk.0.foo.weight", (1, 256), True),
        ("a.b.c", (256, 256), True),  # llama.cpp's "ends with weight" test passes every 5-char name
        ("a.bcd", (256, 256), True),
        ("a.bc", (256, 256), False),
        ("position_embd.weight", (256, 256), False),
        ("token_types.weight", (256, 2), False),
        ("blk.0.ffn_gate_inp.weight", (256, 8), False),
        ("blk.0.ffn_gate_inp_shexp.weight", (256, 8), True),
        ("blk.0.ssm_conv1d.weight", (4, 256), False),
        ("blk.0.time_mix_w1.weight", (256, 256), False),
        ("blk.0.attn_rel_b.weight", (32, 32), False),
        ("v.position_embd.weight", (256, 256), False),
        ("v.patch_embd.weight", (256, 256), False),
        ("blk.0.altup_proj.weight", (256, 256), False),
        ("blk.0.laurel_l.weight", (256, 256), False),
        ("per_layer_model_proj.weight", (256, 256), False),
        ("rope_freqs.weight", (64,), False),
    ],
)
def test_allows_quantization(name, ne, allowed):
    t = TensorInfo(name, ne, F16)
    assert tensor_allows_quantization(t, QuantOptions("Q8_0")) is allowed
    plan = plan_tensor_types([t], meta("llama", 1, 4, 4), QuantOptions("Q8_0"))
    # (a row of one element cannot hold a Q8_0 block: that one falls back to F16)
    assert plan[name] == (T.Q8_0 if allowed and ne[0] % 32 == 0 else F16)


def test_glm5_next_exclusions_only_for_that_arch():
    t = TensorInfo("blk.0.attn_k_b.weight", (256, 256), F16)
    assert not tensor_allows_quantization(t, QuantOptions("Q8_0"), "glm5-next")
    assert tensor_allows_quantization(t, QuantOptions("Q8_0"), "llama")


def test_glm5_next_keeps_some_projections_at_q8_0():
    ts = [TensorInfo("blk.0.attn_q_a.weight", (256, 256), F16), TensorInfo("blk.0.attn_q.weight", (256, 256), F16)]
    plan = plan_tensor_types(ts, meta("glm5-next", 1, 4, 4), QuantOptions("Q4_K_M"))
    assert plan == {"blk.0.attn_q.weight": Q4K, "blk.0.attn_q_a.weight": T.Q8_0}


# --------------------------------------------------------------------------------------------------
# requantizing and errors
# --------------------------------------------------------------------------------------------------


def test_requantize_needs_allow_requantize():
    ts = llama_tensors(**TOY, src=T.Q8_0)
    with pytest.raises(UsageError, match="allow-requantize"):
        plan_tensor_types(ts, TOY_META, QuantOptions("Q4_0"))
    plan = plan_tensor_types(ts, TOY_META, QuantOptions("Q4_0", allow_requantize=True))
    assert plan["blk.0.attn_q.weight"] == T.Q4_0
    # converting a quantized tensor to F16 is requantizing too
    with pytest.raises(UsageError):
        plan_tensor_types(ts, TOY_META, QuantOptions("F16"))


def test_same_type_needs_no_requantize():
    # every tensor already has its target type: llama.cpp just copies them
    ts = [TensorInfo("blk.0.attn_q.weight", (256, 256), Q4K), TensorInfo("blk.0.attn_k.weight", (256, 256), Q4K)]
    plan = plan_tensor_types(ts, meta("llama", 1, 4, 4), QuantOptions("Q4_K_S"))
    assert plan == {"blk.0.attn_k.weight": Q4K, "blk.0.attn_q.weight": Q4K}
    # norms stored quantized are never touched either
    ts = [TensorInfo("blk.0.attn_norm.weight", (256,), T.Q8_0)]
    assert plan_tensor_types(ts, meta("llama", 1, 4, 4), QuantOptions("F16")) == {"blk.0.attn_norm.weight": T.Q8_0}


def test_integer_tensors_cannot_be_converted():
    ts = [TensorInfo("blk.0.lookup.weight", (256, 256), T.I32)]
    with pytest.raises(UsageError, match="convert"):
        plan_tensor_types(ts, meta("llama", 1, 4, 4), QuantOptions("Q8_0"))


def test_duplicate_names_are_rejected():
    t = TensorInfo("blk.0.attn_q.weight", (256, 256), F16)
    with pytest.raises(FormatError):
        plan_tensor_types([t, t], meta("llama", 1, 4, 4), QuantOptions("Q8_0"))


def test_metadata_from_gguf_reader_fields(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_tensor("blk.0.attn_v.weight", np.zeros((64, 256), np.float16))
    w.add_tensor("blk.1.attn_v.weight", np.zeros((64, 256), np.float16))
    w.add_tensor("blk.1.attn_norm.weight", np.zeros((256,), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(str(path))
    ts = [TensorInfo.from_reader(t) for t in r.tensors]
    assert ts[0].ne == (256, 64)
    plan = plan_tensor_types(ts, r.fields, QuantOptions("Q4_K_M"))
    # n_gqa 4 is irrelevant for Q4_K_M; use_more_bits(i, 2) only for i = 1
    assert plan_names(plan) == {"blk.0.attn_v.weight": "Q4_K", "blk.1.attn_norm.weight": "F32", "blk.1.attn_v.weight": "Q6_K"}
    plan = plan_tensor_types(ts, r.fields, QuantOptions("IQ4_NL"))
    assert plan["blk.0.attn_v.weight"] == Q5K  # n_gqa 8/2 = 4 read from the file


# --------------------------------------------------------------------------------------------------
# cross-check against llama.cpp itself (llama-cpp-python's llama_model_quantize), when installed
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_quantize():
    """Quantize a small GGUF with llama.cpp; return (tensor types in file order, general.file_type)."""
    import ctypes
    import os

    try:
        import llama_cpp
    except Exception as e:  # not installed, or its shared library failed to load
        if os.environ.get("CI"):
            pytest.fail(f"llama-cpp-python is required in CI: {e}")
        pytest.skip(f"llama-cpp-python is not available: {e}")
    import gguf
    import numpy as np

    llama_cpp.llama_backend_init()
    lc = llama_cpp

    def run(tmp_path, tensors, metadata, options: QuantOptions):
        src, dst = tmp_path / "in.gguf", tmp_path / "out.gguf"
        arch = metadata["general.architecture"]
        w = gguf.GGUFWriter(str(src), arch)
        for key, value in metadata.items():
            if key == "general.architecture":
                continue
            if isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_uint32(key, value)
        rng = np.random.default_rng(0)
        for t in tensors:
            data = rng.standard_normal(tuple(reversed(t.ne))).astype(np.float32)
            if t.type in (F32, F16):
                w.add_tensor(t.name, data.astype(np.float16 if t.type == F16 else np.float32))
            else:
                w.add_tensor(t.name, gguf.quants.quantize(data, t.type), raw_dtype=t.type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

        p = lc.llama_model_quantize_default_params()
        p.nthread = 2
        p.ftype = options.preset.ftype
        p.output_tensor_type = int(options.output_tensor_type) if options.output_tensor_type is not None else lc.GGML_TYPE_COUNT
        p.token_embedding_type = (
            int(options.token_embedding_type) if options.token_embedding_type is not None else lc.GGML_TYPE_COUNT
        )
        p.allow_requantize = options.allow_requantize
        p.quantize_output_tensor = options.quantize_output_tensor
        p.pure = options.pure
        keep = []
        if options.tensor_type_overrides:
            n = len(options.tensor_type_overrides)
            arr = (lc.llama_model_tensor_override * (n + 1))()
            for i, (pat, qtype) in enumerate(options.tensor_type_overrides):
                b = ctypes.c_char_p(pat.pattern.encode())
                keep.append(b)
                arr[i].pattern = b.value
                arr[i].type = int(qtype)
            arr[n].pattern = None
            arr[n].type = lc.GGML_TYPE_COUNT
            keep.append(arr)
            p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_tensor_override))
        if options.has_imatrix:
            # an imatrix with no entries: llama.cpp then counts as having one, but uses no data
            im = (lc.llama_model_imatrix_data * 1)()
            im[0].name = None
            im[0].size = 0
            keep.append(im)
            p.imatrix = ctypes.cast(im, ctypes.POINTER(lc.llama_model_imatrix_data))
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
        if rc != 0:
            raise RuntimeError("llama_model_quantize failed")
        r = gguf.GGUFReader(str(dst))
        types = {t.name: T(t.tensor_type) for t in r.tensors}
        return types, int(r.fields["general.file_type"].contents())

    return run


def _llama_meta(n_layer, n_head=8, n_head_kv=2, n_embd=256, arch="llama", **extra):
    m = {
        "general.architecture": arch,
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": n_layer,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        # falcon reads the plain layer-norm epsilon, the others the RMS one
        f"{arch}.attention.layer_norm_epsilon" if arch == "falcon" else f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
    }
    m.update({f"{arch}.{k}": v for k, v in extra.items()})
    return m


def _falcon(n_layer):
    ts = [t for t in _small(n_layer, 4544, 18176) if not re.search(r"attn_[qkv]\.|ffn_gate", t.name)]
    return ts + [TensorInfo(f"blk.{i}.attn_qkv.weight", (4544, 2), F16) for i in range(n_layer)]


def _small(n_layer, n_embd, n_ff, *, tied=False, rows=4, extra=()):
    """A llama-like model with only `rows` rows per matrix (row length is what matters)."""
    ts = [TensorInfo("token_embd.weight", (n_embd, rows), F16), TensorInfo("output_norm.weight", (n_embd,), F32)]
    if not tied:
        ts.append(TensorInfo("output.weight", (n_embd, rows), F16))
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [TensorInfo(p + "attn_norm.weight", (n_embd,), F32), TensorInfo(p + "ffn_norm.weight", (n_embd,), F32)]
        ts += [TensorInfo(p + r + ".weight", (n_embd, rows), F16) for r in ROLES if r != "ffn_down"]
        ts.append(TensorInfo(p + "ffn_down.weight", (n_ff, rows), F16))
    return ts + list(extra)


def _moe(n_layer, n_embd, n_ff, n_expert):
    ts = [t for t in _small(n_layer, n_embd, n_ff) if not re.search(r"ffn_(gate|up|down)\.", t.name)]
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [
            TensorInfo(p + "ffn_gate_inp.weight", (n_embd, n_expert), F32),
            TensorInfo(p + "ffn_gate_exps.weight", (n_embd, 2, n_expert), F16),
            TensorInfo(p + "ffn_up_exps.weight", (n_embd, 2, n_expert), F16),
            TensorInfo(p + "ffn_down_exps.weight", (n_ff, 2, n_expert), F16),
        ]
    return ts


ODD = (
    TensorInfo("a.b.c", (256, 2), F16),
    TensorInfo("blk.0.col.weight", (256, 1), F16),
    TensorInfo("position_embd.weight", (256, 2), F16),
    TensorInfo("rope_freqs.weight", (16,), F32),
)

CASES = {
    # name: (tensors, metadata, options)
    **{f"llama8-{p}": (_small(8, 256, 512, extra=ODD), _llama_meta(8), QuantOptions(p)) for p in FTYPES},
    **{f"toy-{p}": (_small(2, 64, 128), _llama_meta(2, 4, 4, 64), QuantOptions(p)) for p in FTYPES},
    **{f"tied-{p}": (_small(2, 256, 512, tied=True), _llama_meta(2), QuantOptions(p))
       for p in ("Q4_K_M", "Q4_0", "Q8_0", "IQ4_NL", "F16")},
    **{f"rows48-{p}": (_small(1, 48, 96), _llama_meta(1, 4, 4, 48), QuantOptions(p)) for p in ("Q4_K_S", "Q4_0", "Q6_K")},
    **{f"moe8-{p}": (_moe(8, 256, 512, 8), _llama_meta(8, expert_count=8, expert_used_count=2), QuantOptions(p))
       for p in ("Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "Q5_K_M")},
    "moe4-Q4_K_M": (_moe(8, 256, 512, 4), _llama_meta(8, expert_count=4, expert_used_count=2), QuantOptions("Q4_K_M")),
    "70b-Q3_K_S": (
        [TensorInfo(f"blk.{i}.attn_v.weight", (256, 2), F16) for i in range(80)],
        _llama_meta(80, 8, 2),
        QuantOptions("Q3_K_S"),
    ),
    "pure": (_small(8, 256, 512), _llama_meta(8), QuantOptions("Q4_K_M", pure=True)),
    "pure-toy": (_small(2, 64, 128, tied=True), _llama_meta(2, 4, 4, 64), QuantOptions("Q5_K_M", pure=True)),
    "leave-output": (_small(8, 256, 512), _llama_meta(8), QuantOptions("Q4_K_M", leave_output_tensor=True)),
    "output-type": (_small(8, 256, 512), _llama_meta(8), QuantOptions("Q4_K_M", output_tensor_type="q8_0")),
    "output-type-tied-toy": (_small(2, 64, 128, tied=True), _llama_meta(2, 4, 4, 64),
                             QuantOptions("Q4_K_M", output_tensor_type="q5_k")),
    "embd-type": (_small(8, 256, 512), _llama_meta(8), QuantOptions("Q4_K_M", token_embedding_type="q8_0")),
    "embd-type-f16": (_small(8, 256, 512), _llama_meta(8), QuantOptions("F16", token_embedding_type="q6_k")),
    "override-blk1-v": (_small(8, 256, 512), _llama_meta(8),
                        QuantOptions("Q4_K_M", tensor_type_overrides=[r"blk\.1\.attn_v=q8_0"])),
    "override-many": (_small(8, 256, 512), _llama_meta(8),
                      QuantOptions("Q3_K_M", tensor_type_overrides=["attn_.*=q5_0", "ffn_down=q6_k", "output=q4_k"])),
    "override-toy-fallback": (_small(2, 64, 128), _llama_meta(2, 4, 4, 64),
                              QuantOptions("Q8_0", tensor_type_overrides=["ffn=q4_k", "attn_q=iq4_xs", "attn_k=q2_k"])),
    "override-f16-ignored": (_small(2, 256, 512), _llama_meta(2), QuantOptions("F16", tensor_type_overrides=["attn=q8_0"])),
    "imatrix-Q4_0": (_small(8, 256, 512), _llama_meta(8), QuantOptions("Q4_0", has_imatrix=True)),
    "imatrix-IQ4_NL": (_small(8, 256, 512), _llama_meta(8), QuantOptions("IQ4_NL", has_imatrix=True)),
    "no-gqa-IQ4_XS": (_small(8, 256, 512), _llama_meta(8, 8, 8), QuantOptions("IQ4_XS")),
    "no-gqa-Q2_K": (_small(8, 256, 512), _llama_meta(8, 8, 8), QuantOptions("Q2_K")),
    "missing-ffn-down": ([t for t in _small(8, 256, 512) if t.name != "blk.0.ffn_down.weight"], _llama_meta(8),
                         QuantOptions("Q4_K_M")),
    "missing-attn-v": ([t for t in _small(8, 256, 512) if t.name not in ("blk.2.attn_v.weight", "blk.5.attn_v.weight")],
                       _llama_meta(8), QuantOptions("Q5_K_M")),
    "twelve-layers": (_small(12, 256, 512), _llama_meta(12), QuantOptions("Q4_K_M")),
    **{f"moe8-{p}": (_moe(8, 256, 512, 8), _llama_meta(8, expert_count=8, expert_used_count=2), QuantOptions(p))
       for p in ("Q4_K_S", "Q3_K_L", "Q8_0", "Q4_0")},
    "per-layer-embd": (_small(2, 256, 512, extra=(TensorInfo("per_layer_token_embd.weight", (256, 4), F16),)),
                       _llama_meta(2),
                       QuantOptions("Q4_K_M", token_embedding_type="q8_0", tensor_type_overrides=["per_layer=q5_k"])),
    "per-layer-embd-plain": (_small(2, 256, 512, extra=(TensorInfo("per_layer_token_embd.weight", (256, 4), F16),)),
                             _llama_meta(2), QuantOptions("Q4_K_M", token_embedding_type="q8_0")),
    "tied-embd-type": (_small(2, 256, 512, tied=True), _llama_meta(2), QuantOptions("Q4_K_M", token_embedding_type="q4_0")),
    "pure-output-type": (_small(2, 256, 512), _llama_meta(2), QuantOptions("Q4_K_M", pure=True, output_tensor_type="q8_0")),
    "qwen2-70b-Q4_K_M": ([TensorInfo(f"blk.{i}.attn_v.weight", (256, 2), F16) for i in range(80)],
                         _llama_meta(80, 8, 8, arch="qwen2"), QuantOptions("Q4_K_M")),
    "llama-65b-Q3_K_S": ([TensorInfo(f"blk.{i}.attn_v.weight", (256, 2), F16) for i in range(80)],
                         _llama_meta(80, 8, 8), QuantOptions("Q3_K_S")),
    **{f"falcon-{p}": (_falcon(8), _llama_meta(8, 71, 1, 4544, arch="falcon"), QuantOptions(p))
       for p in ("Q4_K_M", "Q3_K_M", "Q3_K_L", "Q4_0", "Q8_0")},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_against_llama_cpp(case, llama_quantize, tmp_path):
    tensors, metadata, options = CASES[case]
    types, file_type = llama_quantize(tmp_path, tensors, metadata, options)
    plan = plan_tensor_types(tensors, metadata, options)
    assert plan_names(plan) == plan_names(types)
    assert list(plan) == list(types), "tensor order differs"
    assert file_type == file_type_for(options)


def test_llama_cpp_refuses_what_we_refuse(llama_quantize, tmp_path):
    meta8 = _llama_meta(2)
    quantized = [TensorInfo(t.name, t.ne, T.Q8_0) if len(t.ne) > 1 else t for t in _small(2, 256, 512)]
    opts = QuantOptions("Q4_K_M")
    with pytest.raises(UsageError):
        plan_tensor_types(quantized, meta8, opts)
    with pytest.raises(RuntimeError):
        llama_quantize(tmp_path, quantized, meta8, opts)
    # allowed, both agree on the result
    opts = QuantOptions("Q4_K_M", allow_requantize=True)
    types, _ = llama_quantize(tmp_path, quantized, meta8, opts)
    assert plan_names(plan_tensor_types(quantized, meta8, opts)) == plan_names(types)
    # Q8_0 -> Q8_0 everywhere is a plain copy, no permission needed
    opts = QuantOptions("Q8_0")
    types, _ = llama_quantize(tmp_path, quantized, meta8, opts)
    assert plan_names(plan_tensor_types(quantized, meta8, opts)) == plan_names(types)
    # a very-low-bit type without an imatrix
    plain = _small(2, 256, 512)
    opts = QuantOptions("Q4_K_M", tensor_type_overrides=["attn_q=iq2_xs"])
    with pytest.raises(UsageError):
        plan_tensor_types(plain, meta8, opts)
    with pytest.raises(RuntimeError):
        llama_quantize(tmp_path, plain, meta8, opts)
