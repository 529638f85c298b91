"""OpenELM (Apple) HF → GGUF, proved by llama.cpp against a numpy reference of OpenELM's forward pass.

transformers has no OpenELM class (the checkpoints run with their own ``modeling_openelm.py`` through
``trust_remote_code``, which no test may fetch), so the reference here follows that code: per-layer head
counts and MLP widths, fused q/k/v with per-head q/k RMS norms, rotate-half rotary, a fused gate/up
SwiGLU (gate rows first), the embedding as the output matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slmpkg.errors import FormatError
from slmpkg.formats import gguf as gguf_format
from slmpkg.pipeline import convert
from slmpkg.presets import PRESETS

llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from llama_ref import llama_quantize  # noqa: E402
from test_convert import PROMPTS  # noqa: E402
from test_tokenizer import spm_bpe  # noqa: E402

# OpenELM-270M's layout, smaller: heads and MLP widths grow with depth (its qkv/ffn multipliers)
CONFIG = {
    "architectures": ["OpenELMForCausalLM"], "model_type": "openelm", "model_dim": 128, "head_dim": 32,
    "num_transformer_layers": 3, "num_query_heads": [2, 4, 4], "num_kv_heads": [1, 2, 1],
    "ffn_multipliers": [0.5, 1.0, 2.0], "ffn_dim_divisor": 64, "ffn_with_glu": True,
    "normalize_qk_projections": True, "share_input_output_layers": True, "rope_freq_constant": 10000,
    "rope_max_length": 256, "max_context_length": 128, "activation_fn_name": "swish",
    "normalization_layer_name": "rms_norm", "qkv_multipliers": [0.5, 1.0], "num_gqa_groups": 2,
}
EPS = 1e-6


def _ff(multiplier: float) -> int:  # OpenELM's make_divisible, written out
    v = multiplier * CONFIG["model_dim"]
    d = CONFIG["ffn_dim_divisor"]
    r = max(d, int(v + d / 2) // d * d)
    return r + d if r < 0.9 * v else r


def _model(path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    spm_bpe(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    rng = np.random.default_rng(7)
    hidden, hd = CONFIG["model_dim"], CONFIG["head_dim"]
    w = {"transformer.token_embeddings.weight": rng.normal(0, 0.08, (len(tok), hidden)),
         "transformer.norm.weight": 1 + rng.normal(0, 0.1, hidden)}
    for i, (q, kv, m) in enumerate(zip(CONFIG["num_query_heads"], CONFIG["num_kv_heads"], CONFIG["ffn_multipliers"])):
        p, ff = f"transformer.layers.{i}.", _ff(m)
        w[p + "attn_norm.weight"] = 1 + rng.normal(0, 0.1, hidden)
        w[p + "attn.qkv_proj.weight"] = rng.normal(0, 0.08, ((q + 2 * kv) * hd, hidden))
        w[p + "attn.q_norm.weight"] = 1 + rng.normal(0, 0.1, hd)
        w[p + "attn.k_norm.weight"] = 1 + rng.normal(0, 0.1, hd)
        w[p + "attn.out_proj.weight"] = rng.normal(0, 0.08, (hidden, q * hd))
        w[p + "ffn_norm.weight"] = 1 + rng.normal(0, 0.1, hidden)
        w[p + "ffn.proj_1.weight"] = rng.normal(0, 0.08, (2 * ff, hidden))
        w[p + "ffn.proj_2.weight"] = rng.normal(0, 0.08, (hidden, ff))
    w = {k: v.astype(np.float32) for k, v in w.items()}
    safetensors_numpy.save_file(w, str(path / "model.safetensors"))
    config = dict(CONFIG, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    (path / "config.json").write_text(json.dumps(config))
    return path, w


def _rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * weight


def _rope(x: np.ndarray) -> np.ndarray:
    """Rotate-half rotary over the last axis of x [tokens, heads, head_dim]."""
    hd = x.shape[-1]
    inv = 1.0 / CONFIG["rope_freq_constant"] ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(x.shape[0])[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1))[:, None], np.sin(np.concatenate([angles] * 2, -1))[:, None]
    half = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + half * sin


def _reference_logits(w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """OpenELM's forward pass in float64 numpy."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hd, t = CONFIG["head_dim"], len(ids)
    x = w["transformer.token_embeddings.weight"][ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i, (q_heads, kv_heads) in enumerate(zip(CONFIG["num_query_heads"], CONFIG["num_kv_heads"])):
        p = f"transformer.layers.{i}."
        qkv = (_rms(x, w[p + "attn_norm.weight"]) @ w[p + "attn.qkv_proj.weight"].T).reshape(t, -1, hd)
        q, k, v = qkv[:, :q_heads], qkv[:, q_heads:q_heads + kv_heads], qkv[:, q_heads + kv_heads:]
        q, k = _rope(_rms(q, w[p + "attn.q_norm.weight"])), _rope(_rms(k, w[p + "attn.k_norm.weight"]))
        groups = q_heads // kv_heads
        k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, -1)
        x = x + attn @ w[p + "attn.out_proj.weight"].T
        gate, up = np.split(_rms(x, w[p + "ffn_norm.weight"]) @ w[p + "ffn.proj_1.weight"].T, 2, axis=-1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn.proj_2.weight"].T
    return _rms(x, w["transformer.norm.weight"]) @ w["transformer.token_embeddings.weight"].T


@pytest.fixture(scope="module")
def openelm(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], Path]:
    src, weights = _model(tmp_path_factory.mktemp("openelm"))
    out = tmp_path_factory.mktemp("openelm-gguf") / "model-F32.gguf"
    convert(src, out, quant="F32", progress=False)
    return src, weights, out


def test_llama_cpp_computes_what_openelm_computes(openelm):
    src, weights, gguf = openelm
    tok = transformers.AutoTokenizer.from_pretrained(src)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=True) == ids
        llm.reset()
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
        ref = _reference_logits(weights, ids)
        assert np.abs(ours - ref).max() <= 1e-3 * (ref.max() - ref.min()), prompt
    llm.close()


def test_per_layer_sizes_are_llama_cpp_arrays_and_gate_up_is_split(openelm):
    _, weights, gguf = openelm
    ckpt = gguf_format.read(gguf)
    assert ckpt.architecture == "openelm"
    assert list(ckpt.get("openelm.attention.head_count")) == CONFIG["num_query_heads"]
    assert list(ckpt.get("openelm.attention.head_count_kv")) == CONFIG["num_kv_heads"]
    ffs = [_ff(m) for m in CONFIG["ffn_multipliers"]]
    assert list(ckpt.get("openelm.feed_forward_length")) == ffs
    tensors = {t.name: t for t in ckpt.tensors}
    assert "output.weight" not in tensors
    for i, ff in enumerate(ffs):
        fused = weights[f"transformer.layers.{i}.ffn.proj_1.weight"]
        assert np.array_equal(tensors[f"blk.{i}.ffn_gate.weight"].float32(), fused[:ff])
        assert np.array_equal(tensors[f"blk.{i}.ffn_up.weight"].float32(), fused[ff:])


def test_one_pass_quantization_equals_llama_cpp(openelm, tmp_path):
    src, _, gguf = openelm
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(src, ours, quant="Q8_0", progress=False)
    assert llama_quantize(gguf, ref, PRESETS["Q8_0"].ftype) == 0
    assert ours.read_bytes() == ref.read_bytes()


def test_gguf_to_hf_is_refused_by_name(openelm, tmp_path):
    _, _, gguf = openelm
    with pytest.raises(FormatError, match="OpenELMForCausalLM has no transformers class"):
        convert(gguf, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()
