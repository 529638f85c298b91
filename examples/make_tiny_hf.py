"""Write a tiny random Hugging Face checkpoint (Llama or Qwen2) with a tokenizer trained offline.

The directory is what a model repo holds (config.json, model.safetensors in bf16, tokenizer.json,
tokenizer_config.json, generation_config.json), small enough to build every target in seconds:

    python examples/make_tiny_hf.py tiny-llama
    slmpkg build examples/slmpkg.toml

Needs transformers, torch and tokenizers (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Llama 3's pre-tokenizer split (what llama.cpp calls the "llama-bpe" pre-tokenizer)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's: digits one at a time
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

FAMILIES = ("llama", "qwen2")


def _corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    from slmpkg.evaluation import builtin_text

    rng = random.Random(seed)
    words = builtin_text().split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(lines)]


def train_tokenizer(path: Path, family: str, vocab_size: int = 1024) -> None:
    """A byte-level BPE like Llama 3's (BOS added) or Qwen2's (no BOS), saved as tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama"))
    split = LLAMA3_SPLIT if family == "llama" else QWEN2_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if family == "llama":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    fast.save_pretrained(str(path))


def make_tiny_hf(path: Path, family: str = "llama", *, layers: int = 4, hidden: int = 256, seed: int = 0,
                 dtype: str = "bfloat16") -> Path:
    """Write the checkpoint to ``path`` (created) and return it."""
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path, family)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, eos_token_id=tokenizer.eos_token_id)
    if family == "llama":
        config = transformers.LlamaConfig(**common, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            # wider than the default init, so the logits spread and quantization changes the next-token odds
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    config_path = path / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json.setdefault("_name_or_path", f"tiny-{family}")
    config_path.write_text(json.dumps(config_json, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_hf(args.out, args.family, layers=args.layers, seed=args.seed)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {args.out}/ ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
