"""Real-sized GGUFs for the benchmarks, built offline: a byte-level BPE vocabulary and Qwen2.5-shaped tensors.

The vocabulary is made the way BPE training makes one: starting from GPT-2's 256 byte characters, each
merge joins two existing tokens into a new one (short tokens are picked more often, so lengths come out
like a real vocabulary's: 3-12 characters, many starting with ``Ġ``), and ``tokenizer.ggml.merges``
lists those merges. llama.cpp loads it as a ``gpt2``/``qwen2`` vocabulary. The tensors have the shapes
of Qwen2.5-0.5B (896 columns, which K-quants cannot hold, so presets fall back to Q5_0/Q8_0 as on the
real model) with random weights, F16 as ``convert_hf_to_gguf.py`` writes them.

    python benchmarks/real_vocab.py OUT.gguf [--vocab 151936] [--layers 24]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as V

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slmpkg.checkpoint import Checkpoint, LazyTensor, MetaValue  # noqa: E402
from slmpkg.formats import gguf as gguf_format  # noqa: E402
from slmpkg.quant import QuantType  # noqa: E402

NORMAL, CONTROL = 1, 3
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
) * 8


def byte_alphabet() -> list[str]:
    """GPT-2's byte → printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def bpe_vocabulary(n_vocab: int, n_special: int = 22, seed: int = 0) -> tuple[list[str], list[str], list[int]]:
    """``(tokens, merges, token types)``: ``n_vocab - n_special`` merged tokens, then the specials."""
    rng = np.random.default_rng(seed)
    tokens = byte_alphabet()
    seen = set(tokens)
    merges: list[str] = []
    target = n_vocab - n_special
    space = tokens[ord(" ")]
    while len(tokens) < target:
        k = len(tokens)
        u = rng.random(4096)
        picks = (k * u**6).astype(np.int64)  # short, early tokens more often, as in real merges
        letters = rng.integers(ord("a"), ord("z") + 1, 4096)
        for i in range(0, picks.size, 2):
            a, b = tokens[picks[i]], tokens[picks[i + 1]]
            if i % 4 == 0:  # mostly ASCII text, as real vocabularies are
                b = chr(letters[i])
            if i % 6 == 0 and not a.startswith(space) and space + a in seen:
                a = space + a
            new = a + b
            if new in seen or len(new) > 16:
                continue
            seen.add(new)
            tokens.append(new)
            merges.append(f"{a} {b}")
            if len(tokens) == target:
                break
    types = [NORMAL] * len(tokens)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(n_special - 3)]
    return tokens + specials, merges, types + [CONTROL] * len(specials)


def qwen_like(
    n_vocab: int = 151936, n_layer: int = 24, n_embd: int = 896, n_ff: int = 4864, n_head: int = 14,
    n_head_kv: int = 2, seed: int = 0,
) -> Checkpoint:
    """A Qwen2.5-0.5B-shaped F16 checkpoint with a real-sized BPE vocabulary; tensors are made lazily."""
    tokens, merges, types = bpe_vocabulary(n_vocab, seed=seed)
    arch, u32, f32 = "qwen2", V.UINT32, V.FLOAT32
    head_dim = n_embd // n_head
    md = {
        "general.architecture": MetaValue(V.STRING, arch),
        "general.type": MetaValue(V.STRING, "model"),
        "general.name": MetaValue(V.STRING, "Qwen Like"),
        "general.size_label": MetaValue(V.STRING, "0.5B"),
        f"{arch}.block_count": MetaValue(u32, n_layer),
        f"{arch}.context_length": MetaValue(u32, 32768),
        f"{arch}.embedding_length": MetaValue(u32, n_embd),
        f"{arch}.feed_forward_length": MetaValue(u32, n_ff),
        f"{arch}.attention.head_count": MetaValue(u32, n_head),
        f"{arch}.attention.head_count_kv": MetaValue(u32, n_head_kv),
        f"{arch}.rope.freq_base": MetaValue(f32, 1000000.0),
        f"{arch}.attention.layer_norm_rms_epsilon": MetaValue(f32, 1e-6),
        "general.file_type": MetaValue(u32, 1),
        "tokenizer.ggml.model": MetaValue(V.STRING, "gpt2"),
        "tokenizer.ggml.pre": MetaValue(V.STRING, "qwen2"),
        "tokenizer.ggml.tokens": MetaValue(V.ARRAY, tokens, V.STRING),
        "tokenizer.ggml.token_type": MetaValue(V.ARRAY, np.array(types, np.int32), V.INT32),
        "tokenizer.ggml.merges": MetaValue(V.ARRAY, merges, V.STRING),
        "tokenizer.ggml.eos_token_id": MetaValue(u32, len(tokens) - 20),
        "tokenizer.ggml.padding_token_id": MetaValue(u32, len(tokens) - 22),
        "tokenizer.ggml.bos_token_id": MetaValue(u32, len(tokens) - 22),
        "tokenizer.ggml.add_bos_token": MetaValue(V.BOOL, False),
        "tokenizer.chat_template": MetaValue(V.STRING, CHAT_TEMPLATE),
        "general.quantization_version": MetaValue(u32, 2),
    }

    def tensor(name: str, shape: tuple[int, ...], index: int) -> LazyTensor:
        qtype = QuantType.F16 if len(shape) == 2 else QuantType.F32

        def raw() -> np.ndarray:
            values = np.random.default_rng(seed * 1000 + index).standard_normal(shape, dtype=np.float32)
            values *= np.float32(0.02 if len(shape) == 2 else 1.0)
            return values.astype(np.float16 if qtype is QuantType.F16 else np.float32).reshape(-1).view(np.uint8)

        return LazyTensor(name, shape, qtype, raw)

    kv = n_head_kv * head_dim
    specs = [("token_embd.weight", (len(tokens), n_embd))]
    for i in range(n_layer):
        p = f"blk.{i}."
        specs += [
            (p + "attn_norm.weight", (n_embd,)),
            (p + "attn_q.weight", (n_embd, n_embd)), (p + "attn_q.bias", (n_embd,)),
            (p + "attn_k.weight", (kv, n_embd)), (p + "attn_k.bias", (kv,)),
            (p + "attn_v.weight", (kv, n_embd)), (p + "attn_v.bias", (kv,)),
            (p + "attn_output.weight", (n_embd, n_embd)),
            (p + "ffn_norm.weight", (n_embd,)),
            (p + "ffn_gate.weight", (n_ff, n_embd)), (p + "ffn_up.weight", (n_ff, n_embd)),
            (p + "ffn_down.weight", (n_embd, n_ff)),
        ]
    specs.append(("output_norm.weight", (n_embd,)))
    return Checkpoint(md, [tensor(name, shape, i) for i, (name, shape) in enumerate(specs)])


def cached_f16(directory: Path, n_vocab: int = 151936) -> Path:
    """The F16 file of :func:`qwen_like` with ``n_vocab`` tokens in ``directory``, built when missing."""
    path = directory / f"qwen-like-{n_vocab}-f16.gguf"
    if not path.exists():
        gguf_format.write(path, qwen_like(n_vocab))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    gguf_format.write(args.output, qwen_like(args.vocab, args.layers))


if __name__ == "__main__":
    main()
