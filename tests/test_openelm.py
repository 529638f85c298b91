"""OpenELM (Apple) HF ⇄ GGUF, proved by llama.cpp against a numpy reference of OpenELM's forward pass.

transformers has no OpenELM class (the checkpoints run with their own ``modeling_openelm.py`` through
``trust_remote_code``, which no test may fetch), so the reference here follows that code: per-layer head
counts and MLP widths, fused q/k/v with per-head q/k RMS norms, rotate-half rotary, a fused gate/up
SwiGLU (gate rows first), the embedding as the output matrix. GGUF → HF writes Apple's layout (its
config.json keys, tensor names and shapes); OpenELM's configuration recomputes the per-layer sizes from
its sizing rules, so the tests check those rules with a port of that computation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gguf import GGUFValueType

from slmpkg import architectures
from slmpkg.checkpoint import Checkpoint, LazyTensor, MetaValue
from slmpkg.errors import FormatError
from slmpkg.formats import gguf as gguf_format
from slmpkg.formats import safetensors as safetensors_format
from slmpkg.quant import QuantType
from slmpkg.pipeline import convert
from slmpkg.presets import PRESETS

llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from llama_ref import llama_quantize  # noqa: E402
from test_convert import PROMPTS  # noqa: E402
from test_tokenizer import spm_bpe  # noqa: E402

# OpenELM-270M's layout, smaller: heads and MLP widths grow with depth (its qkv/ffn multipliers)
CONFIG = {
    "architectures": ["OpenELMForCausalLM"], "model_type": "openelm", "model_dim": 128, "head_dim": 32,
    "num_transformer_layers": 3, "num_query_heads": [2, 4, 4], "num_kv_heads": [1, 2, 2],
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


def _reference_logits(w: dict[str, np.ndarray], ids: list[int], head: "np.ndarray | None" = None) -> np.ndarray:
    """OpenELM's forward pass in float64 numpy; ``head``: another output matrix than the embedding."""
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
    head = w["transformer.token_embeddings.weight"] if head is None else head.astype(np.float64)
    return _rms(x, w["transformer.norm.weight"]) @ head.T


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


# ---- GGUF → HF: Apple's layout (its config.json keys, its tensor names and shapes) -------------------


def _apple_sizes(config: dict) -> tuple[list[int], list[int], list[int]]:
    """(query heads, key/value heads, MLP widths) per layer as OpenELM's configuration class recomputes them
    when it loads a config.json (its ``__post_init__``: the lists in the file are replaced), written out."""
    n, dim, hd = config["num_transformer_layers"], config["model_dim"], config["head_dim"]

    def divisible(v: float, d: int) -> int:
        r = max(d, int(v + d / 2) // d * d)
        return r + d if r < 0.9 * v else r

    def per_layer(m):
        if isinstance(m, (int, float)):
            return [m] * n
        return [round(v, 2) for v in np.linspace(m[0], m[1], num=n, dtype=float)] if len(m) == 2 else list(m)

    groups = config["num_gqa_groups"]
    heads = [divisible(dim * m, hd * groups) // hd for m in per_layer(config["qkv_multipliers"])]
    ffs = [divisible(m * dim, config["ffn_dim_divisor"]) for m in per_layer(config["ffn_multipliers"])]
    return heads, [h // groups for h in heads], ffs


def test_the_source_config_is_what_openelm_recomputes():
    """The tiny model's lists agree with its sizing rules, as a real OpenELM config.json's do."""
    assert _apple_sizes(CONFIG) == (CONFIG["num_query_heads"], CONFIG["num_kv_heads"],
                                    [_ff(m) for m in CONFIG["ffn_multipliers"]])


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_hf_gguf_hf_keeps_every_tensor_and_the_config(openelm, tmp_path, dtype):
    src, weights, _ = openelm
    gguf, back = tmp_path / "m.gguf", tmp_path / "back"
    convert(src, gguf, quant=dtype.upper(), progress=False)
    convert(gguf, back, dtype=dtype, progress=False)
    source = json.loads((src / "config.json").read_text())
    config = json.loads((back / "config.json").read_text())
    assert {k: config.get(k) for k in source} == source  # every key, OpenELM's sizing rules included
    tensors = {t.name: t for t in safetensors_format.read(back).tensors}
    assert set(tensors) == set(weights)  # Apple's names: qkv_proj and proj_1 fused, no lm_head
    for name, value in weights.items():
        t = tensors[name]
        assert t.shape == value.shape and t.qtype.name == dtype.upper(), name
        if dtype == "f32":
            assert t.raw().tobytes() == value.tobytes(), name
        else:
            assert np.array_equal(t.float32(), torch.from_numpy(value).to(torch.bfloat16).float().numpy()), name
    tok = transformers.AutoTokenizer.from_pretrained(back)
    assert all(tok(p)["input_ids"] == transformers.AutoTokenizer.from_pretrained(src)(p)["input_ids"] for p in PROMPTS)


def _comparable(path: Path) -> tuple[dict, list]:
    ckpt = gguf_format.read(path)
    metadata = {k: v.value.tolist() if isinstance(v.value, np.ndarray) else v.value for k, v in ckpt.metadata.items()
                if k != "general.name"}  # the directory's name
    return metadata, [(t.name, t.qtype, t.raw().tobytes()) for t in ckpt.tensors]


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_gguf_hf_gguf_is_byte_identical(openelm, tmp_path, dtype):
    _, _, gguf = openelm
    hf1, first, hf2, second = tmp_path / "hf1", tmp_path / "a.gguf", tmp_path / "hf2", tmp_path / "b.gguf"
    convert(gguf, hf1, dtype=dtype.lower(), progress=False)
    convert(hf1, first, quant=dtype, progress=False)
    convert(first, hf2, dtype=dtype.lower(), progress=False)
    convert(hf2, second, quant=dtype, progress=False)
    assert _comparable(first) == _comparable(second)
    if dtype == "F32":  # the GGUF made from the source is that fixed point already
        assert _comparable(gguf) == _comparable(first)


def _without_kept_rules(gguf: Path, out: Path) -> Path:
    """The GGUF as llama.cpp's converter writes it: without slmpkg's copy of the sizing rules."""
    ckpt = gguf_format.read(gguf)
    del ckpt.metadata[architectures.HF_CONFIG_KEY]
    gguf_format.write(out, ckpt)
    return out


def test_a_gguf_without_the_rules_gets_rules_that_recompute_its_sizes(openelm, tmp_path):
    _, weights, gguf = openelm
    plain = _without_kept_rules(gguf, tmp_path / "plain.gguf")
    back, again = tmp_path / "back", tmp_path / "again.gguf"
    convert(plain, back, dtype="f32", progress=False)
    config = json.loads((back / "config.json").read_text())
    sizes = (CONFIG["num_query_heads"], CONFIG["num_kv_heads"], [_ff(m) for m in CONFIG["ffn_multipliers"]])
    assert _apple_sizes(config) == sizes
    assert (config["num_query_heads"], config["num_kv_heads"]) == sizes[:2]
    tensors = {t.name: t.float32() for t in safetensors_format.read(back).tensors}
    assert all(np.array_equal(tensors[n], v) for n, v in weights.items()) and set(tensors) == set(weights)
    convert(back, again, quant="F32", progress=False)
    ours, theirs = _comparable(again), _comparable(plain)
    assert ours[1] == theirs[1]
    assert {k: v for k, v in ours[0].items() if k != architectures.HF_CONFIG_KEY} == theirs[0]


@pytest.mark.parametrize("name,layers,dim,head_dim", [
    ("OpenELM-270M", 16, 1280, 64), ("OpenELM-450M", 20, 1536, 64), ("OpenELM-1_1B", 28, 2048, 64),
    ("OpenELM-3B", 36, 3072, 128),
])
def test_published_shapes_get_rules_that_recompute_their_sizes(name, layers, dim, head_dim):
    """The four released OpenELM shapes (their published sizing rules), metadata only: a GGUF without
    slmpkg's copy of the rules gets a config.json from which OpenELM's code recomputes the same sizes."""
    rules = {"num_gqa_groups": 4, "qkv_multipliers": [0.5, 1.0], "ffn_multipliers": [0.5, 4.0], "ffn_dim_divisor": 256}
    shape = {"num_transformer_layers": layers, "model_dim": dim, "head_dim": head_dim}
    heads, kv, ffs = _apple_sizes({**shape, **rules})
    config = {"architectures": ["OpenELMForCausalLM"], **shape, **rules, "num_query_heads": heads, "num_kv_heads": kv,
              "ffn_multipliers": [f / dim for f in ffs], "vocab_size": 32000}
    metadata, _ = architectures.hf_metadata(config, {})
    del metadata[architectures.HF_CONFIG_KEY]
    embedding = LazyTensor("token_embd.weight", (32000, dim), QuantType.F32, lambda: np.zeros(0, np.uint8))
    written = architectures.hf_config(Checkpoint(metadata, [embedding]))
    assert _apple_sizes(written) == (heads, kv, ffs), name


def test_sizes_no_openelm_rules_give_are_refused(openelm, tmp_path):
    _, _, gguf = openelm
    ckpt = gguf_format.read(_without_kept_rules(gguf, tmp_path / "plain.gguf"))
    ckpt.metadata["openelm.attention.head_count_kv"] = MetaValue(GGUFValueType.ARRAY, [1, 2, 1], GGUFValueType.UINT32)
    gguf_format.write(tmp_path / "odd.gguf", ckpt)
    with pytest.raises(FormatError, match=r"heads \[2, 4, 4\] with \[1, 2, 1\] have no common group count"):
        convert(tmp_path / "odd.gguf", tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()
