"""`slmpkg convert` HF ⇄ GGUF, proved by the runtimes: llama.cpp computes what transformers computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slmpkg.formats import gguf as gguf_format
from slmpkg.formats import safetensors as st_format
from slmpkg.pipeline import convert
from slmpkg.presets import PRESETS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

from llama_ref import llama_quantize  # noqa: E402
from test_tokenizer import LLAMA3_REGEX, QWEN2_REGEX, byte_level_bpe, spm_bpe  # noqa: E402

PROMPTS = ["Hello world, the quick brown fox", "numbers 1234 and café 🦙"]


def _config(family: str, vocab_size: int, tokenizer) -> "transformers.PretrainedConfig":
    common = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "llama-tied":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=64, tie_word_embeddings=False)
    if family == "llama3-rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        return transformers.LlamaConfig(**common, rope_parameters=rope)
    raise AssertionError(family)


FAMILIES = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "llama3-rope"]


def _hf_model(path: Path, family: str, dtype=torch.float32) -> Path:
    if family == "mistral":
        spm_bpe(path)
    elif family.startswith("qwen"):
        byte_level_bpe(path, QWEN2_REGEX, llama3_style=False)
    else:
        byte_level_bpe(path, LLAMA3_REGEX, llama3_style=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(sum(map(ord, family)))
    model = transformers.AutoModelForCausalLM.from_config(_config(family, len(tokenizer), tokenizer))
    with torch.no_grad():  # larger than the default init, so logits spread over a useful range
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def hf_dir(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _hf_model(tmp_path_factory.mktemp(request.param), request.param)


def _hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _ids(path: Path, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(path)(text)["input_ids"]


def test_f32_gguf_computes_what_transformers_computes(hf_dir, tmp_path):
    family, src = hf_dir
    out = tmp_path / "model.gguf"
    convert(src, out, quant="F32", progress=False)
    for prompt in PROMPTS:
        ids = _ids(src, prompt)
        ref, ours = _hf_logits(src, ids), _llama_logits(out, ids)
        span = ref.max() - ref.min()
        assert np.abs(ours - ref).max() <= 1e-3 * span, f"{family}: {prompt!r}"


def test_tokenizer_ids_match_llama_cpp(hf_dir, tmp_path):
    family, src = hf_dir
    out = tmp_path / "model.gguf"
    convert(src, out, quant="F32", progress=False)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for prompt in PROMPTS:
        assert llm.tokenize(prompt.encode(), add_bos=True) == _ids(src, prompt)


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M"])
def test_one_pass_quantization_equals_llama_cpp_on_our_f32(hf_dir, tmp_path, preset):
    family, src = hf_dir
    f32, ours, ref = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(src, f32, quant="F32", progress=False)
    convert(src, ours, quant=preset, progress=False)
    assert llama_quantize(f32, ref, PRESETS[preset].ftype) == 0
    mine, theirs = gguf_format.read(ours), gguf_format.read(ref)
    assert [t.name for t in mine.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(mine.tensors, theirs.tensors):
        assert a.qtype == b.qtype and np.array_equal(a.raw(), b.raw()), a.name
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_hf_gguf_hf_keeps_every_tensor_and_the_logits(hf_dir, tmp_path, dtype):
    family, src = hf_dir
    if family == "llama3-rope":
        pytest.skip("rope_freqs → config.json is not recovered yet")
    gguf_path, back = tmp_path / "m.gguf", tmp_path / "back"
    convert(src, gguf_path, quant=dtype.upper(), progress=False)
    convert(gguf_path, back, dtype=dtype, progress=False)
    source = {t.name: t for t in st_format.read(src).tensors}
    result = {t.name: t for t in st_format.read(back).tensors}
    assert set(result) == set(source)
    for name, t in source.items():
        expected = t.float32()
        if dtype == "bf16":  # the source is f32: the round trip keeps bf16-rounded values
            expected = torch.from_numpy(expected).to(torch.bfloat16).float().numpy()
        assert np.array_equal(result[name].float32(), expected), name
    ids = _ids(src, PROMPTS[0])
    assert _ids(back, PROMPTS[0]) == ids
    if dtype == "f32":
        assert np.array_equal(_hf_logits(back, ids), _hf_logits(src, ids))


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_gguf_hf_gguf_is_byte_identical(hf_dir, tmp_path, dtype):
    family, src = hf_dir
    if family == "llama3-rope":
        pytest.skip("rope_freqs → config.json is not recovered yet")
    first, back, second = tmp_path / "a.gguf", tmp_path / "hf", tmp_path / "b.gguf"
    convert(src, first, quant=dtype, progress=False)
    convert(first, back, dtype=dtype.lower(), progress=False)
    convert(back, second, quant=dtype, progress=False)
    a, b = gguf_format.read(first), gguf_format.read(second)
    assert [(t.name, t.qtype) for t in a.tensors] == [(t.name, t.qtype) for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(x.raw(), y.raw()), x.name
