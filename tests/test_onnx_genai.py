"""onnxruntime-genai, the runtime the ONNX layout is made for, loads slmpkg's model directories.

``og.Model(dir)`` reads ``genai_config.json``, the graph and the tokenizer files slmpkg writes; its
tokenizer gives the ids transformers gives (onnxruntime-genai's ``encode`` adds no BOS; both
generations below start from transformers' ids, BOS included), and its greedy generation (KV cache managed by
onnxruntime-genai, past/present buffers shared) produces the tokens transformers' greedy
``generate`` produces on the source checkpoint. OpenELM (per-layer KV head counts, no transformers class)
generates what tests/test_openelm.py's numpy reference does, greedily.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

og = pytest.importorskip("onnxruntime_genai")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import _hf_model, _ids

from slmpkg.pipeline import convert

NEW_TOKENS = 12
PROMPT = "Hello world, the quick brown fox"


def _transformers_greedy(src: Path, ids: list[int]) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return out[0].tolist()


def _genai_greedy(model_dir: Path, ids: list[int]) -> list[int]:
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW_TOKENS, min_length=len(ids) + NEW_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi2", "starcoder2"])
def test_onnxruntime_genai_generates_what_transformers_generates(family, tmp_path):
    src = _hf_model(tmp_path / "hf", family)
    out = tmp_path / "onnx"
    convert(src, out, to="onnx", progress=False)
    ids = _ids(src, PROMPT)
    model = og.Model(str(out))
    plain = transformers.AutoTokenizer.from_pretrained(src)(PROMPT, add_special_tokens=False)["input_ids"]
    assert [int(t) for t in og.Tokenizer(model).encode(PROMPT)] == plain
    assert _genai_greedy(out, ids) == _transformers_greedy(src, ids)


def test_onnxruntime_genai_runs_openelm_with_per_layer_kv_heads(tmp_path):
    import numpy as np
    import test_openelm

    src, weights = test_openelm._model(tmp_path)
    out = tmp_path / "onnx"
    convert(src, out, to="onnx", progress=False)
    rng = np.random.default_rng(0)
    for _ in range(3):  # random prompts: the tiny model's greedy continuations differ more than from one text
        ids = [1] + rng.integers(3, len(transformers.AutoTokenizer.from_pretrained(src)), size=8).tolist()
        expected = list(ids)
        for _ in range(NEW_TOKENS):
            expected.append(int(test_openelm._reference_logits(weights, expected)[-1].argmax()))
        assert _genai_greedy(out, ids) == expected
