"""Write a tiny Llama-architecture GGUF with random weights and a byte-fallback vocabulary.

It is a real model as far as llama.cpp is concerned (it loads and generates nonsense), small enough
to quantize in a second:

    python examples/make_tiny_llama.py tiny-f16.gguf
    slmpkg quantize tiny-f16.gguf -o tiny-Q4_K_M.gguf --quant Q4_K_M
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as V

from slmpkg.checkpoint import Checkpoint, LazyTensor, MetaValue
from slmpkg.formats import gguf as gguf_format

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def _vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pieces = ["▁" + c for c in letters] + list(letters)
    pieces += ["▁" + a + b for a in letters[:12] for b in letters[:12]]
    for p in pieces[: size - len(tokens)]:
        tokens.append(p)
        types.append(NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def tiny_llama(
    n_layer: int = 8,
    n_embd: int = 256,
    n_ff: int = 640,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_vocab: int = 512,
    dtype: str = "f16",
    seed: int = 0,
    tied_embeddings: bool = False,
) -> Checkpoint:
    """A random Llama checkpoint; ``n_ff`` not a multiple of 256 exercises llama.cpp's K-quant fallbacks."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab(n_vocab)
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    arch = "llama"
    u32, f32 = V.UINT32, V.FLOAT32
    md = {
        "general.architecture": MetaValue(V.STRING, arch),
        "general.name": MetaValue(V.STRING, "Tiny Llama"),
        f"{arch}.context_length": MetaValue(u32, 256),
        f"{arch}.embedding_length": MetaValue(u32, n_embd),
        f"{arch}.block_count": MetaValue(u32, n_layer),
        f"{arch}.feed_forward_length": MetaValue(u32, n_ff),
        f"{arch}.attention.head_count": MetaValue(u32, n_head),
        f"{arch}.attention.head_count_kv": MetaValue(u32, n_head_kv),
        f"{arch}.attention.layer_norm_rms_epsilon": MetaValue(f32, 1e-5),
        f"{arch}.rope.freq_base": MetaValue(f32, 10000.0),
        f"{arch}.rope.dimension_count": MetaValue(u32, head_dim),
        f"{arch}.vocab_size": MetaValue(u32, n_vocab),
        "general.file_type": MetaValue(u32, 1 if dtype == "f16" else 0),
        "tokenizer.ggml.model": MetaValue(V.STRING, "llama"),
        "tokenizer.ggml.tokens": MetaValue(V.ARRAY, tokens, V.STRING),
        "tokenizer.ggml.scores": MetaValue(V.ARRAY, np.array(scores, np.float32), V.FLOAT32),
        "tokenizer.ggml.token_type": MetaValue(V.ARRAY, np.array(types, np.int32), V.INT32),
        "tokenizer.ggml.bos_token_id": MetaValue(u32, 1),
        "tokenizer.ggml.eos_token_id": MetaValue(u32, 2),
        "tokenizer.ggml.unknown_token_id": MetaValue(u32, 0),
        "tokenizer.ggml.add_bos_token": MetaValue(V.BOOL, True),
    }
    store = np.float16 if dtype == "f16" else np.float32

    def weight(name: str, *shape: int, std: float = 0.02) -> LazyTensor:
        return LazyTensor.from_array(name, (rng.standard_normal(shape) * std).astype(store))

    def norm(name: str) -> LazyTensor:  # norms stay float32, as llama.cpp's converter writes them
        return LazyTensor.from_array(name, (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))

    kv = n_head_kv * head_dim
    tensors = [weight("token_embd.weight", n_vocab, n_embd, std=1.0), norm("output_norm.weight")]
    if not tied_embeddings:
        tensors.append(weight("output.weight", n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [
            norm(p + "attn_norm.weight"),
            weight(p + "attn_q.weight", n_embd, n_embd),
            weight(p + "attn_k.weight", kv, n_embd),
            weight(p + "attn_v.weight", kv, n_embd),
            weight(p + "attn_output.weight", n_embd, n_embd),
            norm(p + "ffn_norm.weight"),
            weight(p + "ffn_gate.weight", n_ff, n_embd),
            weight(p + "ffn_up.weight", n_ff, n_embd),
            weight(p + "ffn_down.weight", n_embd, n_ff),
        ]
    return Checkpoint(md, tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gguf_format.write(args.out, tiny_llama(n_layer=args.layers, dtype=args.dtype, seed=args.seed))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
