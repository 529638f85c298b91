"""Tokenizers between Hugging Face files and GGUF, checked against the programs users run.

Tokenizers are trained offline here with the ``tokenizers`` library (byte-level BPE with Llama 3's and
Qwen2's split regexes, a SentencePiece-style BPE with byte fallback, a BERT WordPiece) and with
``sentencepiece`` (a ``tokenizer.model``), saved as Hugging Face directories, converted to GGUF tokenizer
metadata, written into a tiny Llama GGUF and loaded by llama.cpp (``llama_cpp.Llama(vocab_only=True)``).
llama.cpp's ids must equal transformers' on every sample; the files rebuilt from the GGUF must load in
transformers and give llama.cpp's ids too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
from gguf import GGUFValueType as V

from slmpkg.checkpoint import LazyTensor, MetaValue
from slmpkg.errors import FormatError
from slmpkg.formats import gguf as gguf_format
from slmpkg.tokenizer import (
    PRE_TOKENIZERS,
    TokenType,
    gguf_tokenizer_metadata,
    hf_tokenizer_files,
    llama_cpp_pre_type,
    parse_sentencepiece_model,
)


def _need(module: str) -> Any:
    # the peers are dev dependencies: CI has them, so a missing one fails there instead of skipping
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


tokenizers = _need("tokenizers")
transformers = _need("transformers")
llama_cpp = _need("llama_cpp")

from tokenizers import (  # noqa: E402  (after the skip above)
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

REPO = Path(__file__).resolve().parents[1]

LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k's split regex (GPT-4o, Phi-4-mini), as its tokenizer.json spells it
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# ---- test data ------------------------------------------------------------------------------------


def corpus(n: int = 400, seed: int = 7) -> list[str]:
    """Varied English with digits, punctuation, whitespace runs and some non-ASCII text, deterministic."""
    rng = random.Random(seed)
    words = (
        "the of and to in is was for on that with as by at from it this be are have not or an which "
        "model token tokenizer llama quick brown fox jumps over lazy dog hello world python code "
        "function value number data file system test result error string example people time year "
        "I you he she we they it's don't can't we'll they've I'm you'd Hello World The A This"
    ).split()
    extra = [
        "café",
        "naïve",
        "résumé",
        "über",
        "straße",
        "日本語",
        "中文",
        "Привет",
        "мир",
        "Ελληνικά",
        "🦙",
        "🚀",
        "😀",
        "€",
        "½",
    ]
    punct = [
        ".",
        ",",
        "!",
        "?",
        ";",
        ":",
        "...",
        " -",
        " (",
        ")",
        '"',
        "'",
        " --",
        " [x]",
        " {y}",
        " #",
        " @",
        " &",
        " %",
    ]
    lines = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.72:
                parts.append(rng.choice(words))
            elif r < 0.84:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            elif r < 0.93:
                parts.append(rng.choice(extra))
            else:
                parts.append(rng.choice(words) + rng.choice(punct))
        line = " ".join(parts)
        if i % 9 == 0:
            line = "    " + line
        if i % 11 == 0:
            line = line + "\n\n" + "\t" + rng.choice(words)
        if i % 13 == 0:
            line = "x = f(" + str(i) + ") + y[" + str(i % 7) + "];  // " + line
        lines.append(line)
    return lines


SAMPLES = [
    "Hello world",
    " Hello world",
    "  two leading spaces and   three inside",
    "Hello\nworld\n\nnew paragraph\n",
    "tabs\tand\ttabs\t\t",
    "numbers 1234567 and 3.14159 and 42",
    "punctuation!? (yes) [no] {maybe} -- 'quoted' \"double\" ...",
    "it's I'm we'll they've you'd DON'T",
    "café naïve résumé über straße",
    "emoji 🦙🚀 and 😀 together 🦙🦙",
    "日本語のテキスト and 中文",
    "Привет мир, Ελληνικά",
    "trailing spaces   ",
    "",
    "a",
    "\n",
    " ",
    "UPPER lower MiXeD CamelCase",
    "x = f(12) + y[3];  // comment",
    "zebra xylophone quokka",  # words the corpus lacks: byte fallback / unknown pieces
    "ǅ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # rare characters outside the training alphabet
]


def _save(tok: Tokenizer, path: Path, **specials: str) -> Path:
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(str(path))
    return path


def byte_level_bpe(path: Path, regex: Optional[str], *, llama3_style: bool, digits: bool = False) -> Path:
    """A byte-level BPE like Llama 3 (bos template, ignore_merges) or Qwen2 (no bos, NFC normalizer).

    ``regex`` None: GPT-2's own ByteLevel splitting (Phi-2's CodeGen tokenizer), after single digits
    apart when ``digits`` (StarCoder's)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=llama3_style))
    if not llama3_style:
        tok.normalizer = normalizers.NFC()
    if regex is None:
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens(["<tool>"])  # a non-special added token: user-defined in llama.cpp
    if llama3_style:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
        _save(tok, path, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        _save(tok, path, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _complete_merges(tok: Tokenizer) -> None:
    """Rewrite a trained SentencePiece-style BPE's merges the way transformers converts a SentencePiece model:
    every split of every token into two tokens, ranked by the merged token's id (the trainer's merge order).

    Real Llama 2 / Mistral / Gemma tokenizer.json files are built like this; a merge list straight from the
    ``tokenizers`` trainer lacks pairs that llama.cpp's score-driven loop would still merge."""
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    found = []
    for text, i in vocab.items():
        for k in range(1, len(text)):
            if text[:k] in vocab and text[k:] in vocab:
                found.append((i, vocab[text[:k]], vocab[text[k:]], text[:k], text[k:]))
    found.sort()
    data["model"]["merges"] = [[a, b] for *_, a, b in found]
    replacement = Tokenizer.from_str(json.dumps(data))
    tok.model = replacement.model


def spm_bpe(path: Path, *, gemma: bool = False, complete: bool = True) -> Path:
    """A SentencePiece-style BPE with byte fallback, laid out like Llama 2's tokenizer.json (▁ prepended), or
    like Gemma's (``gemma``: no ▁ prepended, <pad> <eos> <bos> <unk> first, a no-op Split pre-tokenizer)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    bos, eos = ("<bos>", "<eos>") if gemma else ("<s>", "</s>")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = sorted({c for line in corpus() for c in line.replace(" ", "▁")} | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if complete:
        _complete_merges(tok)
    replace = normalizers.Replace(" ", "▁")
    to_space = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = replace
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence(to_space)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence(to_space + [decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    # byte tokens are vocabulary, not added tokens, in a SentencePiece-derived tokenizer.json
    data = json.loads(tok.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if not a["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"] + (["<start_of_turn>", "<end_of_turn>"] if gemma else []))
    # matched in the raw text, as llama.cpp matches user-defined tokens (a normalized one would be looked for
    # after ▁ is prepended, which llama.cpp cannot do)
    tok.add_tokens([AddedToken("<tool>", normalized=False)])
    if gemma:  # Gemma's whitespace runs: added tokens spelled with ▁, matched after normalization
        tok.add_tokens([AddedToken("▁▁▁▁", normalized=True)])
    extra = {"pad_token": "<pad>"} if gemma else {}
    return _save(tok, path, bos_token=bos, eos_token=eos, unk_token="<unk>", **extra)


def unigram(path: Path) -> Path:
    """A SentencePiece-style Unigram (Metaspace, ▁ prepended)."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    trainer = trainers.UnigramTrainer(
        vocab_size=700,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return _save(tok, path, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def wordpiece(path: Path) -> Path:
    """A BERT-style WordPiece (uncased, BertNormalizer, BertPreTokenizer, [CLS] A [SEP])."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return _save(
        tok, path, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]"
    )


def sentencepiece_model(path: Path) -> Path:
    """A ``tokenizer.model`` trained with sentencepiece (BPE, byte fallback, identity normalization)."""
    spm = _need("sentencepiece")
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=700,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=["<tool>"],
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    return path


# ---- GGUF / peers ---------------------------------------------------------------------------------


def _tiny_llama_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_tiny_llama", REPO / "examples" / "make_tiny_llama.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sidecar_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def write_gguf(metadata: dict[str, MetaValue], path: Path, name: str = "Tiny Llama") -> Path:
    """A tiny Llama GGUF (one layer) carrying ``metadata``'s vocabulary, embedding rows to match."""
    ckpt = _tiny_llama_module().tiny_llama(n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1)
    n_vocab = len(metadata["tokenizer.ggml.tokens"].value)
    md = {k: v for k, v in ckpt.metadata.items() if not k.startswith("tokenizer.")}
    md["llama.vocab_size"] = MetaValue(md["llama.vocab_size"].type, n_vocab)
    md["general.name"] = MetaValue(V.STRING, name)
    md.update(metadata)
    rng = np.random.default_rng(0)
    tensors = []
    for t in ckpt.tensors:
        if t.name in ("token_embd.weight", "output.weight"):
            t = LazyTensor.from_array(t.name, (rng.standard_normal((n_vocab, 64)) * 0.02).astype(np.float16))
        tensors.append(t)
    ckpt.metadata, ckpt.tensors = md, tensors
    gguf_format.write(path, ckpt)
    return path


def llama(path: Path) -> Any:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def hf(path: Path, split_special_tokens: bool = False) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(path), split_special_tokens=split_special_tokens)


def write_files(files: dict[str, bytes], path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


# (text, add special tokens, parse special tokens in the text) -> ids
Encoder = Callable[[str, bool, bool], list[int]]


def llama_ids(llm: Any) -> Encoder:
    return lambda text, add, special: llm.tokenize(text.encode("utf-8"), add_bos=add, special=special)


def hf_ids(path: Path) -> Encoder:
    """transformers' ids; llama.cpp's special=False (special tokens in the text are plain text) is
    transformers' split_special_tokens=True."""
    plain, split = hf(path), hf(path, split_special_tokens=True)
    return lambda text, add, special: list((plain if special else split)(text, add_special_tokens=add)["input_ids"])


def mismatches(a: Encoder, b: Encoder, texts: list[str]) -> list[tuple[str, bool, bool, list[int], list[int]]]:
    bad = []
    for text in texts:
        for add in (False, True):
            for special in (False, True):
                x, y = a(text, add, special), b(text, add, special)
                if x != y:
                    bad.append((text, add, special, x, y))
    return bad


# ---- fixtures ------------------------------------------------------------------------------------


class Case:
    """One tokenizer: its HF directory, GGUF metadata, the GGUF llama.cpp loaded, and rebuilt HF files."""

    def __init__(self, name: str, hf_dir: Path, work: Path, specials: list[str]) -> None:
        self.name = name
        self.hf_dir = hf_dir
        self.metadata = gguf_tokenizer_metadata(sidecar_of(hf_dir))
        self.gguf = write_gguf(self.metadata, work / f"{name}.gguf")
        self.llm = llama(self.gguf)
        self.rebuilt = write_files(hf_tokenizer_files(self.metadata), work / f"{name}-rebuilt")
        texts = list(SAMPLES)
        if specials:
            texts += [
                f"{specials[0]}Hello {specials[1]} world",
                f"text {specials[0]} between {specials[1]}",
                f"{specials[1]}{specials[0]}",
            ]
        self.texts = texts + ["<tool> call", "a<tool>b"] + corpus(60, seed=99)


BUILDERS: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "llama3": (lambda p: byte_level_bpe(p, LLAMA3_REGEX, llama3_style=True), ["<|im_start|>", "<|im_end|>"]),
    "qwen2": (lambda p: byte_level_bpe(p, QWEN2_REGEX, llama3_style=False), ["<|im_start|>", "<|im_end|>"]),
    "spm": (spm_bpe, ["<|im_start|>", "<|im_end|>"]),
    "gemma": (lambda p: spm_bpe(p, gemma=True), ["<start_of_turn>", "<|im_end|>"]),
    "bert": (wordpiece, ["[MASK]", "[SEP]"]),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    work = tmp_path_factory.mktemp("tok")
    return {
        name: Case(name, build(work / f"{name}-hf"), work, specials) for name, (build, specials) in BUILDERS.items()
    }


# ---- forward: HF -> GGUF, checked by llama.cpp ------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_llama_cpp_matches_transformers(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    bad = mismatches(llama_ids(case.llm), hf_ids(case.hf_dir), case.texts)
    assert not bad, f"{name}: {len(bad)} of {4 * len(case.texts)} differ, first: {bad[0]}"


def test_metadata_conventions(cases: dict[str, Case]) -> None:
    l3, qw, spm, bert = (cases[n].metadata for n in ("llama3", "qwen2", "spm", "bert"))
    assert (l3["tokenizer.ggml.model"].value, l3["tokenizer.ggml.pre"].value) == ("gpt2", "llama-bpe")
    assert (qw["tokenizer.ggml.model"].value, qw["tokenizer.ggml.pre"].value) == ("gpt2", "qwen2")
    assert spm["tokenizer.ggml.model"].value == "llama" and bert["tokenizer.ggml.model"].value == "bert"
    assert l3["tokenizer.ggml.add_bos_token"].value is True and qw["tokenizer.ggml.add_bos_token"].value is False
    assert l3["tokenizer.chat_template"].value == CHAT_TEMPLATE
    # token types as llama.cpp numbers them
    tokens, types = spm["tokenizer.ggml.tokens"].value, spm["tokenizer.ggml.token_type"].value
    kind = dict(zip(tokens, types.tolist()))
    assert kind["<unk>"] == TokenType.UNKNOWN and kind["<s>"] == TokenType.CONTROL and kind["<0x41>"] == TokenType.BYTE
    assert kind["<|im_start|>"] == TokenType.CONTROL
    assert types.dtype == np.int32 and spm["tokenizer.ggml.scores"].value.dtype == np.float32
    assert spm["tokenizer.ggml.add_space_prefix"].value is True
    qtypes = dict(zip(qw["tokenizer.ggml.tokens"].value, qw["tokenizer.ggml.token_type"].value.tolist()))
    assert qtypes["<tool>"] == TokenType.USER_DEFINED and qtypes["<|im_end|>"] == TokenType.CONTROL
    assert qw["tokenizer.ggml.eos_token_id"].value == qw["tokenizer.ggml.padding_token_id"].value
    # BERT: llama.cpp's phantom-space vocabulary, [CLS] as bos
    btokens = bert["tokenizer.ggml.tokens"].value
    assert bert["tokenizer.ggml.bos_token_id"].value == btokens.index("[CLS]")
    assert bert["tokenizer.ggml.seperator_token_id"].value == btokens.index("[SEP]")
    assert any(t.startswith("▁") for t in btokens) and not any(t.startswith("##") for t in btokens)


# ---- reverse: GGUF -> HF, checked against llama.cpp -------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_rebuilt_files_match_llama_cpp(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    bad = mismatches(llama_ids(case.llm), hf_ids(case.rebuilt), case.texts)
    assert not bad, f"{name}: {len(bad)} of {4 * len(case.texts)} differ, first: {bad[0]}"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_round_trip_hf_gguf_hf(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    bad = mismatches(hf_ids(case.hf_dir), hf_ids(case.rebuilt), case.texts)
    assert not bad, f"{name}: {len(bad)} differ, first: {bad[0]}"
    # and the rebuilt files convert back to the same llama.cpp vocabulary
    again = gguf_tokenizer_metadata(sidecar_of(case.rebuilt))
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.bos_token_id",
    ):
        if key in case.metadata:
            assert again[key].value == case.metadata[key].value, key
    assert list(again["tokenizer.ggml.tokens"].value) == list(case.metadata["tokenizer.ggml.tokens"].value)
    if "tokenizer.ggml.merges" in case.metadata:
        assert list(again["tokenizer.ggml.merges"].value) == list(case.metadata["tokenizer.ggml.merges"].value)
    if "tokenizer.ggml.scores" in case.metadata:  # rebuilt from merge ranks: other numbers, the same order
        before, after = case.metadata["tokenizer.ggml.scores"].value, again["tokenizer.ggml.scores"].value
        normal = case.metadata["tokenizer.ggml.token_type"].value == TokenType.NORMAL
        assert (np.argsort(-before[normal], kind="stable") == np.argsort(-after[normal], kind="stable")).all()
    assert (
        again["tokenizer.ggml.token_type"].value.tolist() == case.metadata["tokenizer.ggml.token_type"].value.tolist()
    )


def test_rebuilt_config(cases: dict[str, Case]) -> None:
    tok = hf(cases["llama3"].rebuilt)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    assert tok.chat_template == CHAT_TEMPLATE
    bert = hf(cases["bert"].rebuilt)
    assert (bert.cls_token, bert.sep_token, bert.mask_token, bert.unk_token) == ("[CLS]", "[SEP]", "[MASK]", "[UNK]")


# ---- tokenizer.model (SentencePiece protobuf) -------------------------------------------------------


def test_sentencepiece_model(tmp_path: Path) -> None:
    spm = _need("sentencepiece")
    src = sentencepiece_model(tmp_path / "sp")
    data = (src / "tokenizer.model").read_bytes()
    proc = spm.SentencePieceProcessor(model_proto=data)
    parsed = parse_sentencepiece_model(data)
    assert parsed.pieces == [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    assert np.allclose(parsed.scores, [proc.get_score(i) for i in range(proc.get_piece_size())])
    assert (parsed.model_type, parsed.byte_fallback, parsed.add_dummy_prefix) == (2, True, True)
    assert parsed.types[proc.piece_to_id("<tool>")] == TokenType.USER_DEFINED

    md = gguf_tokenizer_metadata(sidecar_of(src))
    assert md["tokenizer.ggml.model"].value == "llama"
    llm = llama(write_gguf(md, tmp_path / "sp.gguf"))
    texts = SAMPLES + corpus(60, seed=99)
    # SentencePiece's own encoder: no bos (added by llama.cpp's add_special only)
    bad = [(t, llm.tokenize(t.encode(), add_bos=False, special=False), proc.encode(t)) for t in texts]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"{len(bad)} differ from sentencepiece, first: {bad[0]}"
    rebuilt = write_files(hf_tokenizer_files(md), tmp_path / "sp-rebuilt")
    bad2 = mismatches(llama_ids(llm), hf_ids(rebuilt), texts)
    assert not bad2, f"{len(bad2)} differ, first: {bad2[0]}"


# ---- a second llama.cpp pre-tokenizer path: plain GPT-2 ByteLevel ----------------------------------


def test_gpt2_byte_level_pre_tokenizer(tmp_path: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    src = _save(tok, tmp_path / "gpt2", bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    md = gguf_tokenizer_metadata(sidecar_of(src))
    assert md["tokenizer.ggml.pre"].value == "gpt-2"
    llm = llama(write_gguf(md, tmp_path / "gpt2.gguf"))
    texts = SAMPLES + corpus(40, seed=5)
    assert not mismatches(llama_ids(llm), hf_ids(src), texts)
    assert not mismatches(llama_ids(llm), hf_ids(write_files(hf_tokenizer_files(md), tmp_path / "r")), texts)


# ---- pre-tokenizer derivation and errors ------------------------------------------------------------


def test_pre_type_from_regexes() -> None:
    def split(*regexes: str) -> dict[str, Any]:
        steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes]
        return {
            "type": "Sequence",
            "pretokenizers": steps + [{"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}],
        }

    assert llama_cpp_pre_type(split(LLAMA3_REGEX), ignore_merges=True) == "llama-bpe"
    assert llama_cpp_pre_type(split(LLAMA3_REGEX), ignore_merges=False) == "smaug-bpe"
    assert llama_cpp_pre_type(split(QWEN2_REGEX), clean_spaces=False) == "qwen2"
    digits = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}],
    }
    assert llama_cpp_pre_type(digits) == "starcoder"
    # every table entry is recognised from the way tokenizer.json spells it, and from llama.cpp's spelling
    for pre in PRE_TOKENIZERS:
        name, ignore_merges, clean = pre.variants[0]
        assert (
            llama_cpp_pre_type(split(*pre.tokenizer_json_regexes()), ignore_merges=ignore_merges, clean_spaces=clean)
            == name
        )
        assert llama_cpp_pre_type(split(*pre.regexes), ignore_merges=ignore_merges, clean_spaces=clean) == name


def test_unknown_pre_tokenizer_regex_is_named(tmp_path: Path) -> None:
    src = byte_level_bpe(tmp_path / "odd", r"\p{L}+|\p{N}{1,4}|[^\p{L}\p{N}]+", llama3_style=True)
    found = re.escape(r"['\p{L}+|\p{N}{1,4}|[^\p{L}\p{N}]+'] match no llama.cpp pre-tokenizer")
    with pytest.raises(FormatError, match="^tokenizer\\.json: pre_tokenizer split regexes " + found) as err:
        gguf_tokenizer_metadata(sidecar_of(src))
    assert "\n" not in str(err.value)


def test_errors_name_the_file() -> None:
    with pytest.raises(FormatError, match="tokenizer.json: missing"):
        gguf_tokenizer_metadata({})
    with pytest.raises(FormatError, match="tokenizer.json: not valid JSON"):
        gguf_tokenizer_metadata({"tokenizer.json": b"{"})
    with pytest.raises(FormatError, match="tokenizer.model"):
        gguf_tokenizer_metadata({"tokenizer.model": b"\x0f\x00"})
    with pytest.raises(FormatError, match="tokenizer.json: model type 'WordLevel'"):
        gguf_tokenizer_metadata({"tokenizer.json": json.dumps({"model": {"type": "WordLevel", "vocab": {}}}).encode()})
    with pytest.raises(FormatError, match="tokenizer.ggml.model"):
        hf_tokenizer_files({})
    with pytest.raises(FormatError, match="'t5'"):
        hf_tokenizer_files(
            {
                "tokenizer.ggml.model": MetaValue(V.STRING, "t5"),
                "tokenizer.ggml.tokens": MetaValue(V.ARRAY, ["a"], V.STRING),
            }
        )


def test_vocab_padded_to_config(cases: dict[str, Case]) -> None:
    sidecar = sidecar_of(cases["qwen2"].hf_dir)
    n = len(cases["qwen2"].metadata["tokenizer.ggml.tokens"].value)
    md = gguf_tokenizer_metadata(sidecar, {"vocab_size": n + 6})
    tokens = md["tokenizer.ggml.tokens"].value
    assert len(tokens) == n + 6 and tokens[-1] == f"[PAD{n + 5}]"
    assert md["tokenizer.ggml.token_type"].value[-1] == TokenType.UNUSED
    with pytest.raises(FormatError, match="vocab_size"):
        gguf_tokenizer_metadata(sidecar, {"vocab_size": n - 1})


# ---- more shapes of input -------------------------------------------------------------------------


def test_unigram_maps_to_llama_and_rebuilds_exactly(tmp_path: Path) -> None:
    """A Unigram tokenizer.json becomes a ``llama`` vocabulary with its log-probabilities as scores.

    llama.cpp's ``llama`` tokenizer merges greedily by score rather than searching the best segmentation,
    so its ids differ from transformers' Unigram (see the module notes); what it does is reproduced exactly by
    the rebuilt files."""
    src = unigram(tmp_path / "uni")
    with pytest.warns(UserWarning) as warned:
        md = gguf_tokenizer_metadata(sidecar_of(src))
    messages = " | ".join(str(w.message) for w in warned)
    assert "Unigram model becomes llama.cpp's 'llama' tokenizer" in messages
    assert "adds no ▁ to text starting with a space;" in messages
    assert md["tokenizer.ggml.model"].value == "llama"
    assert md["tokenizer.ggml.add_space_prefix"].value is True
    pieces = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    assert np.allclose(md["tokenizer.ggml.scores"].value[len(pieces) - 1], pieces[-1][1])
    llm = llama(write_gguf(md, tmp_path / "uni.gguf"))
    texts = SAMPLES + corpus(40, seed=3)
    assert not mismatches(llama_ids(llm), hf_ids(write_files(hf_tokenizer_files(md), tmp_path / "r")), texts)


def test_reverse_of_a_gguf_vocabulary(tmp_path: Path) -> None:
    """GGUF -> HF for a vocabulary we did not convert: make_tiny_llama's byte-fallback vocab and scores,
    with the ▁ it merges from added as a token (it has none: a Hugging Face BPE could not merge from it)."""
    module = _tiny_llama_module()
    ckpt = module.tiny_llama(n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1)
    with pytest.warns(UserWarning, match="'▁'.* merged by llama.cpp but are not tokens"):
        hf_tokenizer_files(ckpt.metadata)
    tokens = list(ckpt.metadata["tokenizer.ggml.tokens"].value) + ["▁"]
    scores = np.append(ckpt.metadata["tokenizer.ggml.scores"].value, np.float32(-1000))
    types = np.append(ckpt.metadata["tokenizer.ggml.token_type"].value, np.int32(TokenType.NORMAL))
    ckpt.metadata["tokenizer.ggml.tokens"] = MetaValue(V.ARRAY, tokens, V.STRING)
    ckpt.metadata["tokenizer.ggml.scores"] = MetaValue(V.ARRAY, scores, V.FLOAT32)
    ckpt.metadata["tokenizer.ggml.token_type"] = MetaValue(V.ARRAY, types, V.INT32)
    md = {
        k: v
        for k, v in ckpt.metadata.items()
        if k.startswith("tokenizer.") or k == "general.architecture" or k == "llama.context_length"
    }
    path = write_gguf(md, tmp_path / "tiny.gguf")
    md = gguf_format.read(path).metadata
    rebuilt = write_files(hf_tokenizer_files(md), tmp_path / "tiny-hf")
    texts = SAMPLES + ["eat a tea at ten", "the rain in spain"] + corpus(40, seed=4)
    assert not mismatches(llama_ids(llama(path)), hf_ids(rebuilt), texts)
    config = json.loads((rebuilt / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["model_max_length"] == 256


def test_phi3_added_tokens_swallow_following_whitespace(tmp_path: Path) -> None:
    """Phi-3's chat tokens have rstrip; GGUF cannot say so, llama.cpp strips by model name (Phi-3) instead."""
    src = spm_bpe(tmp_path / "phi3")
    doc = json.loads((src / "tokenizer.json").read_text())
    next_id = max(a["id"] for a in doc["added_tokens"]) + 1
    for k, text in enumerate(["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]):
        doc["added_tokens"].append({"id": next_id + k, "content": text, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})  # fmt: skip
    for entry in doc["added_tokens"]:
        entry["rstrip"] = entry["content"] not in ("<unk>", "<s>", "<|endoftext|>")
    (src / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=r"added token\(s\) .* swallow neighbouring whitespace"):
        md = gguf_tokenizer_metadata(sidecar_of(src))
    path = write_gguf(md, tmp_path / "phi3.gguf", name="Phi-3 Mini Tiny")
    texts = ["<|user|>\n  Hello<|end|>\n<|assistant|>  Hi <|endoftext|> x", "</s>  a <s>  b <tool>  c"] + SAMPLES
    assert not mismatches(llama_ids(llama(path)), hf_ids(src), texts)
    rebuilt = write_files(hf_tokenizer_files(gguf_format.read(path).metadata), tmp_path / "r")
    assert not mismatches(llama_ids(llama(path)), hf_ids(rebuilt), texts)


def _vocab_files() -> list[Path]:
    root = os.environ.get("LLAMA_CPP_VOCABS")  # llama.cpp's models/ directory (ggml-vocab-*.gguf)
    return sorted(Path(root).glob("ggml-vocab-*.gguf")) if root else []


@pytest.mark.skipif(not _vocab_files(), reason="set LLAMA_CPP_VOCABS to llama.cpp's models/ directory")
@pytest.mark.parametrize("path", _vocab_files(), ids=lambda p: p.name[len("ggml-vocab-") : -len(".gguf")])
def test_llama_cpp_vocabularies(path: Path, tmp_path: Path) -> None:
    """Real vocabularies (Llama 2 SPM, Llama 3, Qwen2, Phi-3, BERT, GPT-2, StarCoder, ...) shipped with
    llama.cpp: GGUF -> HF matches llama.cpp on its own test strings, and HF -> GGUF again tokenizes alike."""
    from slmpkg.checkpoint import Checkpoint

    md = gguf_format.read(path).metadata
    if md["tokenizer.ggml.model"].value not in ("gpt2", "llama", "bert"):
        pytest.skip(f"tokenizer model {md['tokenizer.ggml.model'].value!r} is not converted")
    inp = path.with_name(path.name + ".inp")
    texts = (inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n") if inp.exists() else []) + SAMPLES
    rebuilt = write_files(hf_tokenizer_files(md), tmp_path / "hf")
    original = llama(path)
    bad = mismatches(llama_ids(original), hf_ids(rebuilt), texts)
    assert not bad, f"{len(bad)} differ, first: {bad[0]}"
    again = {k: v for k, v in md.items() if not k.startswith("tokenizer.")}
    again.update(gguf_tokenizer_metadata(sidecar_of(rebuilt)))
    gguf_format.write(tmp_path / "again.gguf", Checkpoint(again, []))
    bad = mismatches(llama_ids(original), llama_ids(llama(tmp_path / "again.gguf")), texts)
    assert not bad, f"{len(bad)} differ after HF -> GGUF, first: {bad[0]}"


def _tiny_gpt2_json(**extra: Any) -> dict[str, Any]:
    vocab = {c: i for i, c in enumerate("abcdefgh")} | {"ab": 8}
    doc = {
        "added_tokens": [
            {"id": 9, "content": "<|endoftext|>", "special": True, "normalized": False},
            {"id": 10, "content": "<|im_end|>", "special": True, "normalized": False},
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]]},
    }
    doc.update(extra)
    return doc


def test_chat_templates_and_special_ids_from_side_files() -> None:
    sidecar = {
        "tokenizer.json": json.dumps(_tiny_gpt2_json()).encode(),
        "tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>"}).encode(),
        "generation_config.json": json.dumps({"bos_token_id": 9, "eos_token_id": [9, 10]}).encode(),
        "chat_template.jinja": b"{{ messages }}",
        "additional_chat_templates/tool_use.jinja": b"{{ tools }}",
    }
    md = gguf_tokenizer_metadata(sidecar, {"pad_token_id": 9})
    assert md["tokenizer.ggml.merges"].value == ["a b"] and md["tokenizer.ggml.pre"].value == "gpt-2"
    assert md["tokenizer.ggml.eos_token_id"].value == 10  # tokenizer_config wins over generation_config
    assert md["tokenizer.ggml.bos_token_id"].value == 9 and md["tokenizer.ggml.padding_token_id"].value == 9
    assert md["tokenizer.chat_template"].value == "{{ messages }}"
    assert md["tokenizer.chat_template.tool_use"].value == "{{ tools }}"
    assert md["tokenizer.chat_templates"].value == ["tool_use"]
    config = json.loads(hf_tokenizer_files(md)["tokenizer_config.json"])
    assert config["chat_template"] == [
        {"name": "default", "template": "{{ messages }}"},
        {"name": "tool_use", "template": "{{ tools }}"},
    ]
    # the template in tokenizer_config.json takes precedence over chat_template.jinja
    sidecar["tokenizer_config.json"] = json.dumps({"chat_template": "{{ x }}"}).encode()
    assert gguf_tokenizer_metadata(sidecar)["tokenizer.chat_template"].value == "{{ x }}"


def test_post_processor_that_llama_cpp_cannot_express() -> None:
    template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [],
        "special_tokens": {"<|im_end|>": {"id": "<|im_end|>", "ids": [10], "tokens": ["<|im_end|>"]}},
    }
    sidecar = {
        "tokenizer.json": json.dumps(_tiny_gpt2_json(post_processor=template)).encode(),
        "tokenizer_config.json": json.dumps({"bos_token": "<|endoftext|>"}).encode(),
    }
    with pytest.raises(FormatError, match=r"tokenizer\.json: post_processor starts with '<\|im_end\|>' but bos is"):
        gguf_tokenizer_metadata(sidecar)
    # without a configured bos, the template's first token is the bos llama.cpp adds
    sidecar["tokenizer_config.json"] = b"{}"
    md = gguf_tokenizer_metadata(sidecar)
    assert md["tokenizer.ggml.bos_token_id"].value == 10 and md["tokenizer.ggml.add_bos_token"].value is True
