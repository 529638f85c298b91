"""Tokenizers between Hugging Face files and GGUF metadata, both directions.

Forward, :func:`gguf_tokenizer_metadata` reads a Hugging Face directory's tokenizer files (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``, ``chat_template.jinja``,
or a SentencePiece ``tokenizer.model``) and returns llama.cpp's ``tokenizer.*`` keys. Three llama.cpp
tokenizer models come out of it:

- ``gpt2``: byte-level BPE (Llama 3, Qwen2/3, Granite, GPT-2, StarCoder). ``tokenizer.ggml.pre`` is derived
  from the split regexes of tokenizer.json's ``pre_tokenizer``, matched against the regex lists llama.cpp
  implements for each pre-tokenizer type (see :data:`PRE_TOKENIZERS`), not from a hash of sample ids.
- ``llama``: SentencePiece-style BPE or Unigram over ``▁``-escaped text with byte fallback (Llama 2, Mistral,
  Gemma 1-3, Phi-3). llama.cpp merges the adjacent pair whose concatenation has the best score, so scores are
  derived from the BPE merge ranks (or taken from ``tokenizer.model`` when it ships).
- ``bert``: WordPiece, stored the way llama.cpp reads it (word starts carry ``▁``, ``##`` is dropped).

Backward, :func:`hf_tokenizer_files` turns those keys into ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` that ``transformers.AutoTokenizer`` loads as a fast tokenizer encoding text to the
ids llama.cpp produces. For ``llama`` vocabularies that means a BPE whose merges are every pair of tokens that
concatenates to a token, ranked by the merged token's score: the same choice llama.cpp's loop makes.

What llama.cpp cannot express (a :class:`FormatError` when nothing sensible can be written, a warning when the
ids differ only on some text): Unigram models (llama.cpp's ``llama`` tokenizer merges by score, it does not
search the best segmentation), a Metaspace pre-tokenizer's "no ▁ before text that starts with a space" and
"▁ only at the very start" (llama.cpp prepends one to every piece of text), per-token ``lstrip``/``rstrip``
on added tokens, byte-level normalizers other than NFC (NFC itself is dropped: non-NFC input differs), and a
``tokenizer.model``'s normalization rules (``precompiled_charsmap``, ``remove_extra_whitespaces``).

Example:
    >>> from slmpkg.tokenizer import gguf_tokenizer_metadata, hf_tokenizer_files
    >>> md = gguf_tokenizer_metadata({"tokenizer.json": open("tokenizer.json", "rb").read()})  # doctest: +SKIP
    >>> md["tokenizer.ggml.model"].value, md["tokenizer.ggml.pre"].value                      # doctest: +SKIP
    ('gpt2', 'llama-bpe')
    >>> sorted(hf_tokenizer_files(md))                                                           # doctest: +SKIP
    ['special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json']
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
from gguf import GGUFValueType as V

from .checkpoint import MetaValue
from .errors import FormatError

__all__ = [
    "PRE_TOKENIZERS",
    "PreTokenizer",
    "SentencePieceModel",
    "TokenType",
    "gguf_tokenizer_metadata",
    "hf_tokenizer_files",
    "llama_cpp_pre_type",
    "parse_sentencepiece_model",
]

SPACE = "\u2581"  # SentencePiece's visible space, "▁"


class TokenType(IntEnum):
    """llama.cpp's token types (``tokenizer.ggml.token_type``); SentencePiece numbers its piece types alike."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# plain ints for the per-token loops (IntEnum attribute lookups cost seconds over a 256k vocabulary)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = (int(t) for t in TokenType)


# ---- llama.cpp's BPE pre-tokenizers ---------------------------------------------------------------

# llama.cpp's regex engine has no inline case-insensitive groups, so it spells the English contractions out;
# tokenizer.json files use the (?i:...) form. Both spellings are accepted and compared in llama.cpp's.
_CONTRACTIONS_CI = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CONTRACTIONS_CS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# ByteLevel(use_regex=true)'s built-in split; llama.cpp drops the final "|\s+", which its own splitter covers.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_GPT2_HF = _GPT2 + r"|\s+"

_LLAMA3 = _CONTRACTIONS_CS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS_CS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS_CS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SEED_CODER = _CONTRACTIONS_CS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
_JAIS2 = (
    _CONTRACTIONS_CS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)"
    + r"|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
_EXAONE_MOE = (
    _CONTRACTIONS_CS
    + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_MINICPM5 = _CONTRACTIONS_CS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Upper/lower-case classes: tokenizer.json names Unicode categories; llama.cpp rewrites them with lookaheads.
_UPPER_HF = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER_HF = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_UPPER_CPP = r"((?=[\p{L}])([^a-z]))"
_LOWER_CPP = r"((?=[\p{L}])([^A-Z]))"
_GPT4O_HF = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_HF}*{_LOWER_HF}+{_CONTRACTIONS_CI}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_HF}+{_LOWER_HF}*{_CONTRACTIONS_CI}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_CPP}*{_LOWER_CPP}+{_CONTRACTIONS_CS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_CPP}+{_LOWER_CPP}*{_CONTRACTIONS_CS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_HF = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_HF}*{_LOWER_HF}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_HF}+{_LOWER_HF}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_CPP}*{_LOWER_CPP}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_CPP}+{_LOWER_CPP}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TINY_AYA_HF = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_HF}*{_LOWER_HF}+{_CONTRACTIONS_CI}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER_HF}+{_LOWER_HF}*{_CONTRACTIONS_CI}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    (
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)


_DEEPSEEK_LLM = (
    r"[\r\n]",
    # letters of cased scripts, as listed by llama.cpp
    (
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
        "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
        "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
        "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
        "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
        "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
        "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
        "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
        "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
        "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
    ),
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")

Variant = tuple[str, bool, bool]  # (llama.cpp pre name, ignore_merges, clean_spaces) as llama.cpp sets them


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp BPE pre-tokenizer: the regexes it splits with, in order, and the names that select it.

    ``variants`` are the names written when converting, as ``(name, ignore_merges, clean_spaces)``: names
    sharing these regexes but differing in the flags llama.cpp sets for them (look a whole word up in the
    vocabulary before merging; clean up spaces on decode). ``aliases`` are further names llama.cpp gives the
    same regexes, accepted when reading a GGUF. ``hf_regexes`` is how tokenizer.json spells each regex, when
    that differs from llama.cpp's spelling.
    """

    regexes: tuple[str, ...]
    variants: tuple[Variant, ...]
    hf_regexes: tuple[str, ...] = ()
    aliases: tuple[Variant, ...] = ()

    @property
    def name(self) -> str:
        return self.variants[0][0]

    def tokenizer_json_regexes(self) -> tuple[str, ...]:
        return self.hf_regexes or tuple(r.replace(_CONTRACTIONS_CS, _CONTRACTIONS_CI) for r in self.regexes)


# Regex lists are llama.cpp's (src/llama-vocab.cpp, llm_tokenizer_bpe); names and flags from its vocab loader.
PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer(
        (_LLAMA3,),
        (("llama-bpe", True, True), ("smaug-bpe", False, True)),
        aliases=tuple(
            (n, True, True)
            for n in ("llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")
        )
        + (("dbrx", False, True),),
    ),
    PreTokenizer(
        (_QWEN2,),
        (("qwen2", False, False), ("stablelm2", False, True)),
        aliases=tuple(
            (n, False, False) for n in ("deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open", "grok-2")
        )
        + (("megrez", False, True),),
    ),
    PreTokenizer((_QWEN35,), (("qwen35", False, False),)),
    PreTokenizer(
        (_GPT2,),
        (("gpt-2", False, True),),
        hf_regexes=(_GPT2_HF,),
        aliases=tuple(
            (n, False, True)
            for n in (
                "phi-2",
                "jina-es",
                "jina-de",
                "gigachat",
                "jina-v2-es",
                "jina-v2-de",
                "a.x-4.0",
                "mellum",
                "modern-bert",
                "exaone4",
                "mpt",
                "olmo",
                "jais",
            )
        )
        + (("trillion", False, False), ("granite-docling", False, False)),
    ),
    PreTokenizer(
        (r"\p{N}", _GPT2),
        (("starcoder", False, True), ("smollm", False, False)),
        hf_regexes=(r"\p{N}", _GPT2_HF),
        aliases=tuple((n, False, True) for n in ("refact", "codeshell", "exaone", "minerva-7b", "mellum2"))
        + (("command-r", False, False),),
    ),
    PreTokenizer(
        (_GPT4O,),
        (("gpt-4o", False, False),),
        hf_regexes=(_GPT4O_HF,),
        aliases=tuple((n, False, False) for n in ("llama4", "kanana2", "talkie", "minimax-m2")),
    ),
    PreTokenizer((_TEKKEN,), (("tekken", True, False),), hf_regexes=(_TEKKEN_HF,)),
    PreTokenizer(
        (r"\d{1,3}(?=(?:\d{3})*\b)", _TINY_AYA_HF.replace(_CONTRACTIONS_CI, _CONTRACTIONS_CS)),
        (("tiny_aya", False, False),),
        aliases=(("cohere2moe", False, False),),
    ),
    PreTokenizer((_SEED_CODER,), (("seed-coder", False, False),)),
    PreTokenizer(
        _DEEPSEEK3,
        (("deepseek-v3", False, False),),
        aliases=tuple((n, False, False) for n in ("hunyuan-dense", "joyai-llm", "hy_v4")),
    ),
    PreTokenizer(_DEEPSEEK_LLM, (("deepseek-llm", False, False),)),
    PreTokenizer(_DEEPSEEK_CODER, (("deepseek-coder", False, False),)),
    PreTokenizer((_UFAKZEKA,), (("ufakzeka", False, False),)),
    PreTokenizer((_JAIS2,), (("jais-2", False, True),)),
    PreTokenizer((_EXAONE_MOE,), (("exaone-moe", False, True),)),
    PreTokenizer((r"\p{N}{1,3}", _MINICPM5), (("minicpm5", True, True),)),
    PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), (("falcon", False, True),)),
    # llama.cpp's fallback, still found in old GGUFs (and used when tokenizer.ggml.pre is missing)
    PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), (("default", False, True),)),
)

# pre-tokenizers for which llama.cpp adds bos unless tokenizer.ggml.add_bos_token says otherwise
_BOS_BY_DEFAULT = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano", "tekken")
)


def _canonical_regex(regex: str) -> str:
    # A literal newline and the escape "\n" mean the same to a regex engine; so do the two contraction spellings.
    regex = regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")
    return regex.replace(_CONTRACTIONS_CI, _CONTRACTIONS_CS)


def _pre_by_name(name: str) -> tuple[PreTokenizer, bool, bool]:
    for pre in PRE_TOKENIZERS:
        for variant, ignore_merges, clean in pre.variants + pre.aliases:
            if variant == name:
                return pre, ignore_merges, clean
    known = ", ".join(n for p in PRE_TOKENIZERS for n, _, _ in p.variants + p.aliases)
    raise FormatError(
        f"GGUF metadata: tokenizer.ggml.pre {name!r} is not a byte-level pre-tokenizer we can rebuild (known: {known})"
    )


def _split_regexes(pre_tokenizer: Optional[Mapping[str, Any]], source: str) -> tuple[list[str], bool]:
    """The regexes a byte-level pre_tokenizer splits with, in order, and whether it ends in ByteLevel."""
    steps: list[Mapping[str, Any]] = []

    def flatten(node: Optional[Mapping[str, Any]]) -> None:
        if not node:
            return
        if node.get("type") == "Sequence":
            for sub in node.get("pretokenizers", []):
                flatten(sub)
        else:
            steps.append(node)

    flatten(pre_tokenizer)
    regexes: list[str] = []
    byte_level = False
    for step in steps:
        kind = step.get("type")
        if byte_level:
            raise FormatError(f"{source}: pre_tokenizer step {kind} after ByteLevel is not supported by llama.cpp")
        if kind == "Split":
            pattern = step.get("pattern", {})
            behavior = step.get("behavior")
            if step.get("invert") or behavior != "Isolated":
                raise FormatError(
                    f"{source}: pre_tokenizer Split with behavior {behavior!r}, invert {step.get('invert')!r} "
                    "cannot be expressed in llama.cpp (it isolates matches)"
                )
            if "Regex" in pattern:
                regexes.append(pattern["Regex"])
            else:
                regexes.append(re.escape(pattern.get("String", "")))
        elif kind == "Digits":
            regexes.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise FormatError(f"{source}: ByteLevel add_prefix_space=true has no llama.cpp equivalent")
            if step.get("use_regex", True):
                regexes.append(_GPT2_HF)
            byte_level = True
        else:
            raise FormatError(f"{source}: pre_tokenizer step {kind!r} has no llama.cpp byte-level equivalent")
    return regexes, byte_level


def llama_cpp_pre_type(
    pre_tokenizer: Optional[Mapping[str, Any]],
    *,
    ignore_merges: bool = False,
    clean_spaces: Optional[bool] = None,
    source: str = "tokenizer.json",
) -> str:
    """The ``tokenizer.ggml.pre`` value for a byte-level BPE ``pre_tokenizer`` section of tokenizer.json.

    The split regexes are compared, in order, with the lists llama.cpp implements; among the names sharing a
    list, the one whose flags match ``ignore_merges`` (tokenizer.json ``model.ignore_merges``) and
    ``clean_spaces`` (``clean_up_tokenization_spaces``; None: unknown, the first name wins) is chosen.

    >>> llama_cpp_pre_type({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    'gpt-2'
    """
    regexes, byte_level = _split_regexes(pre_tokenizer, source)
    if not byte_level:
        raise FormatError(
            f"{source}: pre_tokenizer has no ByteLevel step, which llama.cpp's byte-level BPE always applies"
        )
    found = tuple(_canonical_regex(r) for r in regexes)
    for pre in PRE_TOKENIZERS:
        spellings = [
            tuple(_canonical_regex(r) for r in pre.regexes),
            tuple(_canonical_regex(r) for r in pre.tokenizer_json_regexes()),
        ]
        if len(found) != len(pre.regexes):
            continue
        if all(f in (a, b) for f, a, b in zip(found, *spellings)):
            best = max(
                pre.variants, key=lambda v: 2 * (v[1] == ignore_merges) + (v[2] == clean_spaces)
            )  # first on ties
            return best[0]
    shown = ", ".join(f"'{r}'" for r in found)  # canonical: control characters escaped, so one line
    raise FormatError(f"{source}: pre_tokenizer split regexes [{shown}] match no llama.cpp pre-tokenizer type")


# ---- SentencePiece tokenizer.model ---------------------------------------------------------------


@dataclass
class SentencePieceModel:
    """The parts of a SentencePiece ``ModelProto`` the conversion needs."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = 1  # 1 unigram, 2 BPE, 3 word, 4 char
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    normalizer_name: str = ""


def _proto_fields(data: bytes, source: str) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; values of length-delimited fields are bytes."""
    i, n = 0, len(data)

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            if i >= n:
                raise FormatError(f"{source}: truncated protobuf")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, data[i : i + 8]
            i += 8
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise FormatError(f"{source}: truncated protobuf")
            yield number, wire, data[i : i + size]
            i += size
        elif wire == 5:
            yield number, wire, data[i : i + 4]
            i += 4
        else:
            raise FormatError(f"{source}: not a SentencePiece model (protobuf wire type {wire})")


def _int32(value: int) -> int:
    # int32 fields are varints of the two's complement 64-bit value
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_sentencepiece_model(data: bytes, source: str = "tokenizer.model") -> SentencePieceModel:
    """Decode a SentencePiece ``tokenizer.model`` (protobuf ``ModelProto``).

    A small wire-format reader instead of ``sentencepiece``/``protobuf``: neither is a dependency of slmpkg,
    ``sentencepiece``'s Python API does not expose the normalizer flags (``add_dummy_prefix``), and its
    generated ``_pb2`` module needs ``protobuf``.

    >>> m = parse_sentencepiece_model(open("tokenizer.model", "rb").read())  # doctest: +SKIP
    >>> m.pieces[:3], m.add_dummy_prefix                                        # doctest: +SKIP
    (['<unk>', '<s>', '</s>'], True)
    """
    model = SentencePieceModel([], [], [])
    try:
        for number, wire, value in _proto_fields(data, source):
            if number == 1 and wire == 2:  # SentencePiece piece
                piece, score, kind = "", 0.0, _NORMAL
                for f, w, v in _proto_fields(value, source):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                model.pieces.append(piece)
                model.scores.append(score)
                model.types.append(kind)
            elif number == 2 and wire == 2:  # TrainerSpec
                for f, w, v in _proto_fields(value, source):
                    if w != 0:
                        continue
                    if f == 3:
                        model.model_type = v
                    elif f == 35:
                        model.byte_fallback = bool(v)
                    elif f == 40:
                        model.unk_id = _int32(v)
                    elif f == 41:
                        model.bos_id = _int32(v)
                    elif f == 42:
                        model.eos_id = _int32(v)
                    elif f == 43:
                        model.pad_id = _int32(v)
            elif number == 3 and wire == 2:  # NormalizerSpec
                for f, w, v in _proto_fields(value, source):
                    if f == 1 and w == 2:
                        model.normalizer_name = v.decode("utf-8")
                    elif f == 3 and w == 0:
                        model.add_dummy_prefix = bool(v)
                    elif f == 4 and w == 0:
                        model.remove_extra_whitespaces = bool(v)
    except UnicodeDecodeError:
        raise FormatError(f"{source}: not a SentencePiece model (piece is not UTF-8)") from None
    if not model.pieces:
        raise FormatError(f"{source}: not a SentencePiece model (no pieces)")
    return model


# ---- reading Hugging Face files ------------------------------------------------------------------


class _Files:
    """The sidecar files, parsed on demand; errors name the file."""

    def __init__(self, sidecar: Mapping[str, bytes]) -> None:
        self.raw = sidecar
        self._json: dict[str, Any] = {}

    def json(self, name: str) -> Any:
        if name not in self._json:
            data = self.raw.get(name)
            if data is None:
                self._json[name] = None
            else:
                try:
                    self._json[name] = json.loads(data)
                except (ValueError, UnicodeDecodeError) as e:
                    raise FormatError(f"{name}: not valid JSON ({e})") from None
        return self._json[name]

    def text(self, name: str) -> Optional[str]:
        data = self.raw.get(name)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{name}: not UTF-8 text") from None


def _token_content(entry: Any) -> Optional[str]:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _looks_special(text: str) -> bool:
    # Added tokens some checkpoints forget to flag as special although they only ever appear as markup.
    if text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    if (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<\uff5c") and text.endswith("\uff5c>")):
        return True
    return text.startswith("<unused") and text.endswith(">")


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

_SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
    "pad": "tokenizer.ggml.padding_token_id",
    "cls": "tokenizer.ggml.cls_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}


@dataclass
class _Vocab:
    """A vocabulary on its way to GGUF: ``hf_text`` is each token as Hugging Face spells it (for lookups)."""

    model: str
    tokens: list[str]
    types: list[int]
    hf_text: list[Optional[str]]
    scores: Optional[list[float]] = None
    merges: Optional[list[str]] = None
    pre: Optional[str] = None
    extra: dict[str, MetaValue] = field(default_factory=dict)


def _config_vocab_size(config: Mapping[str, Any]) -> Optional[int]:
    for cfg in (config, config.get("text_config") or {}):
        size = cfg.get("vocab_size") if isinstance(cfg, Mapping) else None
        if isinstance(size, int) and size > 0:
            return size
    return None


def _id_table(tj: Mapping[str, Any], source: str) -> tuple[dict[int, str], dict[int, Mapping[str, Any]]]:
    """id -> text over model vocab and added tokens, and id -> added-token entry."""
    model = tj.get("model") or {}
    by_id: dict[int, str] = {}
    vocab = model.get("vocab")
    if isinstance(vocab, Mapping):
        for text, i in vocab.items():
            by_id[int(i)] = text
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for i, item in enumerate(vocab):
            by_id[i] = item[0]
    else:
        raise FormatError(f"{source}: model.vocab is missing")
    added: dict[int, Mapping[str, Any]] = {}
    for entry in tj.get("added_tokens") or []:
        i = int(entry["id"])
        added[i] = entry
        by_id[i] = entry["content"]
    return by_id, added


def _size(by_id: Mapping[int, str], vocab_size: Optional[int], source: str) -> int:
    needed = max(by_id) + 1 if by_id else 0
    if vocab_size is None:
        return needed
    if needed > vocab_size:
        raise FormatError(f"{source}: token id {needed - 1} does not fit config.json vocab_size {vocab_size}")
    return vocab_size


def _merge_pairs(merges: Iterable[Any], source: str) -> Iterator[tuple[str, str]]:
    for m in merges:
        if isinstance(m, str):
            left, sep, right = m.partition(" ")
            if not sep:
                raise FormatError(f"{source}: malformed merge {m!r}")
            yield left, right
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            yield m[0], m[1]
        else:
            raise FormatError(f"{source}: malformed merge {m!r}")


def _gguf_merge(left: str, right: str) -> str:
    # GGUF stores a merge as one string split at the first space after the first character; a space inside a
    # part is written as U+0120, as llama.cpp's converter does (byte-level vocabularies never contain one).
    return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in (left, right))


def _gpt2_vocab(tj: Mapping[str, Any], tc: Mapping[str, Any], vocab_size: Optional[int]) -> _Vocab:
    src = "tokenizer.json"
    model = tj["model"]
    by_id, added = _id_table(tj, src)
    n = _size(by_id, vocab_size, src)
    tokens, types, hf_text = [], [], []
    for i in range(n):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            hf_text.append(None)
            continue
        entry = added.get(i)
        if entry is None:
            kind = _NORMAL
        elif entry.get("special") or _looks_special(text):
            kind = _CONTROL
        else:
            kind = _USER_DEFINED
        tokens.append(text)
        types.append(kind)
        hf_text.append(text)
    merges = [_gguf_merge(a, b) for a, b in _merge_pairs(model.get("merges") or [], src)]
    clean = tc.get("clean_up_tokenization_spaces")
    pre = llama_cpp_pre_type(
        tj.get("pre_tokenizer"),
        ignore_merges=bool(model.get("ignore_merges", False)),
        clean_spaces=None if clean is None else bool(clean),
        source=src,
    )
    _check_byte_level_normalizer(tj.get("normalizer"), src)
    return _Vocab("gpt2", tokens, [int(t) for t in types], hf_text, merges=merges, pre=pre)


def _check_byte_level_normalizer(normalizer: Optional[Mapping[str, Any]], source: str) -> None:
    # llama.cpp's BPE applies no normalizer. NFC (Qwen2) only matters for text that is not already NFC, which is
    # accepted; anything else would change ids for ordinary text.
    if not normalizer:
        return
    kind = normalizer.get("type")
    if kind == "Sequence":
        for sub in normalizer.get("normalizers", []):
            _check_byte_level_normalizer(sub, source)
    elif kind != "NFC":
        raise FormatError(f"{source}: normalizer {kind!r} has no llama.cpp equivalent for byte-level BPE")


def _walk(node: Any, key: str) -> Iterator[Mapping[str, Any]]:
    """Every step of a normalizer/pre_tokenizer/decoder tree, flattening Sequences."""
    if not isinstance(node, Mapping):
        return
    if node.get("type") == "Sequence":
        for sub in node.get(key, []):
            yield from _walk(sub, key)
    else:
        yield node


def _spm_space_prefix(tj: Mapping[str, Any]) -> Optional[bool]:
    """Whether the tokenizer.json puts ``▁`` before the text (llama.cpp's add_space_prefix); None: no sign."""
    for step in _walk(tj.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == SPACE:
            return True
    for step in _walk(tj.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme")
            if scheme is not None:
                return scheme != "never"
            return bool(step.get("add_prefix_space", True))
    for step in _walk(tj.get("normalizer"), "normalizers"):
        if step.get("type") == "Replace" and step.get("content") == SPACE:
            return False  # spaces escaped but nothing prepended (Gemma)
    return None


def _spm_vocab(
    tj: Optional[Mapping[str, Any]],
    sp: Optional[SentencePieceModel],
    tc: Mapping[str, Any],
    added_json: Optional[Mapping[str, int]],
    vocab_size: Optional[int],
) -> _Vocab:
    """A ``llama`` vocabulary from a SentencePiece-style tokenizer.json, a tokenizer.model, or both."""
    src = "tokenizer.json" if tj is not None else "tokenizer.model"
    added: dict[int, Mapping[str, Any]] = {}
    scores_by_id: dict[int, float] = {}
    types_by_id: dict[int, int] = {}
    unk_text: Optional[str] = None
    if tj is not None:
        by_id, added = _id_table(tj, src)
        model = tj["model"]
        if model.get("type") == "Unigram":
            for i, item in enumerate(model["vocab"]):
                scores_by_id[i] = float(item[1])
            unk_id = model.get("unk_id")
            if isinstance(unk_id, int):
                types_by_id[unk_id] = _UNKNOWN
        else:
            scores_by_id = _scores_from_merges(by_id, model.get("merges") or [], src)
            unk_text = model.get("unk_token")
        if sp is not None:
            # the SentencePiece scores are the originals; take them wherever the pieces agree
            for i, piece in enumerate(sp.pieces):
                if by_id.get(i) == piece:
                    scores_by_id[i] = sp.scores[i]
                    if sp.types[i] in (_UNKNOWN, _CONTROL, _UNUSED, _BYTE):
                        types_by_id[i] = sp.types[i]
    else:
        assert sp is not None
        by_id = dict(enumerate(sp.pieces))
        scores_by_id = dict(enumerate(sp.scores))
        types_by_id = dict(enumerate(sp.types))
        # tokens added on top of the SentencePiece model, as transformers records them
        for text, i in (added_json or {}).items():
            by_id[int(i)] = text
            added[int(i)] = {"content": text, "special": False}
        for key, entry in (tc.get("added_tokens_decoder") or {}).items():
            by_id[int(key)] = entry["content"]
            added[int(key)] = entry
    n = _size(by_id, vocab_size, src)
    tokens, types, scores, hf_text = [], [], [], []
    for i in range(n):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            scores.append(-10000.0)
            hf_text.append(None)
            continue
        hf_text.append(text)
        score = scores_by_id.get(i, 0.0)
        entry = added.get(i)
        if text == unk_text and i not in types_by_id:
            kind = _UNKNOWN
        elif entry is not None and types_by_id.get(i) not in (_UNKNOWN, _BYTE):
            if entry.get("special") or _looks_special(text):
                kind = _CONTROL
            else:
                kind = _USER_DEFINED
                if entry.get("normalized", True):
                    # transformers looks for it after spaces became ▁ (Gemma's whitespace runs); llama.cpp looks
                    # in the raw text, so it needs the spaces back
                    text = text.replace(SPACE, " ")
        elif i in types_by_id:
            kind = int(types_by_id[i])
        elif _BYTE_TOKEN.fullmatch(text):
            kind = _BYTE
        else:
            kind = _NORMAL
        tokens.append(text)
        types.append(kind)
        scores.append(score)
    if tj is not None:
        prefix = _spm_space_prefix(tj)
        if prefix is None:
            prefix = sp.add_dummy_prefix if sp is not None else True
        _warn_spm_differences(tj)
    else:
        assert sp is not None
        prefix = tc["add_prefix_space"] if isinstance(tc.get("add_prefix_space"), bool) else sp.add_dummy_prefix
    extra = {"tokenizer.ggml.add_space_prefix": MetaValue(V.BOOL, bool(prefix))}
    return _Vocab("llama", tokens, types, hf_text, scores=scores, pre="default", extra=extra)


def _warn_spm_differences(tj: Mapping[str, Any]) -> None:
    """Warn about tokenizer.json behaviour llama.cpp's ``llama`` tokenizer cannot reproduce."""
    if (tj.get("model") or {}).get("type") == "Unigram":
        warnings.warn(
            "tokenizer.json: a Unigram model becomes llama.cpp's 'llama' tokenizer, which merges pieces by score "
            "instead of searching the best segmentation: ids differ from transformers on much ordinary text",
            stacklevel=4,
        )
    for step in _walk(tj.get("pre_tokenizer"), "pretokenizers"):
        scheme = step.get("prepend_scheme", "always")
        if step.get("type") == "Metaspace" and scheme != "never":
            where = "to text starting with a space" + (" or following a special token" if scheme == "first" else "")
            warnings.warn(
                f"tokenizer.json: the Metaspace pre-tokenizer (prepend_scheme {scheme!r}) adds no ▁ {where}; "
                "llama.cpp adds one to every piece of text: ids differ there",
                stacklevel=4,
            )


def _scores_from_merges(by_id: Mapping[int, str], merges: Iterable[Any], source: str) -> dict[int, float]:
    """llama.cpp scores for a BPE vocabulary: a token's score is minus the rank of the first merge making it.

    llama.cpp merges the adjacent pair whose concatenation scores best, so ranking tokens by the first merge
    that produces them reproduces the merge order. Tokens no merge produces keep 0 (single characters, whose
    score llama.cpp never reads) or rank after every merge (multi-character leftovers)."""
    ids = {text: i for i, text in by_id.items()}
    scores: dict[int, float] = {}
    rank = -1
    for rank, (left, right) in enumerate(_merge_pairs(merges, source)):
        i = ids.get(left + right)
        if i is not None and i not in scores:
            scores[i] = -float(rank)
    last = rank + 1
    for i, text in by_id.items():
        if i not in scores:
            scores[i] = 0.0 if len(text) <= 1 or _BYTE_TOKEN.fullmatch(text) else -float(last + i)
    return scores


def _bert_vocab(
    tj: Mapping[str, Any],
    tc: Mapping[str, Any],
    specials: set[str],
    vocab_size: Optional[int],
    config: Mapping[str, Any],
) -> _Vocab:
    src = "tokenizer.json"
    model = tj["model"]
    prefix = model.get("continuing_subword_prefix") or "##"
    by_id, added = _id_table(tj, src)
    n = _size(by_id, vocab_size, src)
    tokens, types, hf_text = [], [], []
    for i in range(n):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            hf_text.append(None)
            continue
        hf_text.append(text)
        entry = added.get(i)
        if (entry is not None and (entry.get("special") or _looks_special(text))) or text in specials:
            tokens.append(text)
            types.append(_CONTROL)
        elif entry is not None:
            tokens.append(text)  # matched in the raw text, so kept as written
            types.append(_USER_DEFINED)
        else:
            # llama.cpp's WordPiece looks words up with a leading ▁ and continuations bare
            tokens.append(text[len(prefix) :] if text.startswith(prefix) else SPACE + text)
            types.append(_NORMAL)
    extra: dict[str, MetaValue] = {}
    for step in _walk(tj.get("normalizer"), "normalizers"):
        if step.get("type") == "BertNormalizer":
            lowercase = bool(step.get("lowercase", True))
            strip = step.get("strip_accents")
            extra["tokenizer.ggml.normalizer.lowercase"] = MetaValue(V.BOOL, lowercase)
            extra["tokenizer.ggml.normalizer.strip_accents"] = MetaValue(
                V.BOOL, lowercase if strip is None else bool(strip)
            )
        elif step.get("type") == "Lowercase":
            extra["tokenizer.ggml.normalizer.lowercase"] = MetaValue(V.BOOL, True)
        elif step.get("type") == "StripAccents":
            extra["tokenizer.ggml.normalizer.strip_accents"] = MetaValue(V.BOOL, True)
    if "tokenizer.ggml.normalizer.lowercase" not in extra:
        # no lowercasing step at all: tell llama.cpp, whose WordPiece lowercases unless told otherwise
        extra["tokenizer.ggml.normalizer.lowercase"] = MetaValue(V.BOOL, False)
        extra.setdefault("tokenizer.ggml.normalizer.strip_accents", MetaValue(V.BOOL, False))
    if isinstance(config.get("type_vocab_size"), int):
        extra["tokenizer.ggml.token_type_count"] = MetaValue(V.UINT32, config["type_vocab_size"])
    return _Vocab("bert", tokens, types, hf_text, pre="default", extra=extra)


def _tokenizer_kind(tj: Mapping[str, Any]) -> str:
    model = tj.get("model") or {}
    kind = model.get("type")
    if kind == "WordPiece":
        return "bert"
    if kind == "Unigram":
        return "llama"
    if kind == "BPE":
        if model.get("byte_fallback"):
            return "llama"
        byte_level = any(
            step.get("type") == "ByteLevel"
            for node, key in ((tj.get("pre_tokenizer"), "pretokenizers"), (tj.get("decoder"), "decoders"))
            for step in _walk(node, key)
        )
        if byte_level:
            return "gpt2"
        if _spm_space_prefix(tj) is not None:
            return "llama"  # SentencePiece-style BPE without byte fallback
        raise FormatError(
            "tokenizer.json: BPE model is neither byte-level nor SentencePiece-style (no ByteLevel, no ▁)"
        )
    raise FormatError(f"tokenizer.json: model type {kind!r} has no llama.cpp tokenizer (BPE, Unigram, WordPiece)")


def _template_ends(tj: Mapping[str, Any]) -> Optional[tuple[Optional[str], Optional[str], dict[str, int]]]:
    """(first, last) special tokens a single-sequence post_processor adds, with their ids; None: no template."""
    node = tj.get("post_processor")
    steps = list(_walk(node, "processors")) if node else []
    for step in steps:
        kind = step.get("type")
        if kind == "TemplateProcessing":
            single = step.get("single") or []
            ids: dict[str, int] = {}
            for name, spec in (step.get("special_tokens") or {}).items():
                if spec.get("ids"):
                    ids[name] = int(spec["ids"][0])
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            return first, last, ids
        if kind in ("BertProcessing", "RobertaProcessing"):
            cls_name, cls_id = step["cls"]
            sep_name, sep_id = step["sep"]
            return cls_name, sep_name, {cls_name: int(cls_id), sep_name: int(sep_id)}
    return None


def _chat_templates(files: _Files, tc: Mapping[str, Any]) -> Optional[Any]:
    template = tc.get("chat_template")
    if template is not None:
        if not isinstance(template, (str, list)):
            raise FormatError("tokenizer_config.json: chat_template is neither a string nor a list")
        return template
    jinja = files.text("chat_template.jinja")
    if jinja is not None:
        extra = sorted(n for n in files.raw if n.startswith("additional_chat_templates/") and n.endswith(".jinja"))
        if not extra:
            return jinja
        named = [{"name": "default", "template": jinja}]
        for name in extra:
            named.append({"name": name.rsplit("/", 1)[1][: -len(".jinja")], "template": files.text(name)})
        return named
    ct = files.json("chat_template.json")
    if isinstance(ct, Mapping):
        return ct.get("chat_template")
    return None


def _template_metadata(template: Any) -> dict[str, MetaValue]:
    if isinstance(template, str):
        return {"tokenizer.chat_template": MetaValue(V.STRING, template)}
    md: dict[str, MetaValue] = {}
    names: list[str] = []
    default: Optional[str] = None
    for choice in template:
        name = re.sub(r"[^A-Za-z0-9]", "_", str(choice.get("name", "")))
        text = choice.get("template")
        if not name or text is None:
            continue
        if name == "default":
            default = text
        else:
            names.append(name)
            md[f"tokenizer.chat_template.{name}"] = MetaValue(V.STRING, text)
    if names:
        md["tokenizer.chat_templates"] = MetaValue(V.ARRAY, names, V.STRING)
    if default is not None:
        md["tokenizer.chat_template"] = MetaValue(V.STRING, default)
    return md


def _added_specials(
    vocab: _Vocab,
    tj: Optional[Mapping[str, Any]],
    tc: Mapping[str, Any],
    special: dict[str, int],
    ids: Mapping[str, int],
) -> tuple[bool, bool, Optional[bool]]:
    """(add_bos, add_eos, add_sep) from the post_processor, else tokenizer_config.json; fills ``special``.

    The post_processor is what a fast tokenizer runs (transformers 5 ignores ``add_bos_token`` beside it).
    llama.cpp can only add its bos and eos (WordPiece: bos and sep), so a template adding other tokens fails.
    """
    add_bos: Optional[bool] = None
    add_eos: Optional[bool] = None
    add_sep: Optional[bool] = None
    ends = _template_ends(tj) if tj is not None else None
    if ends is not None:
        first, last, template_ids = ends
        first_id = (template_ids.get(first) if first in template_ids else ids.get(first)) if first else None
        last_id = (template_ids.get(last) if last in template_ids else ids.get(last)) if last else None
        add_bos = first_id is not None
        if first_id is not None and special.setdefault("bos", first_id) != first_id:
            raise FormatError(
                f"tokenizer.json: post_processor starts with {first!r} but bos is "
                f"{vocab.hf_text[special['bos']]!r}; llama.cpp can only prepend bos"
            )
        if vocab.model == "bert":
            add_sep, add_eos = last_id is not None, False
            if last_id is not None:
                special.setdefault("sep", last_id)
        else:
            add_eos = last_id is not None
            if last_id is not None and special.setdefault("eos", last_id) != last_id:
                raise FormatError(
                    f"tokenizer.json: post_processor ends with {last!r} but eos is "
                    f"{vocab.hf_text[special['eos']]!r}; llama.cpp can only append eos"
                )
    if add_bos is None and isinstance(tc.get("add_bos_token"), bool):
        add_bos = tc["add_bos_token"]
    if add_eos is None and isinstance(tc.get("add_eos_token"), bool):
        add_eos = tc["add_eos_token"]
    return bool(add_bos), bool(add_eos), add_sep


def gguf_tokenizer_metadata(
    sidecar: Mapping[str, bytes], config: Optional[Mapping[str, Any]] = None
) -> dict[str, MetaValue]:
    """llama.cpp's ``tokenizer.*`` GGUF keys for a Hugging Face checkpoint's tokenizer files.

    ``sidecar`` maps file names to bytes (a :class:`~slmpkg.checkpoint.Checkpoint`'s ``sidecar``);
    ``config`` is the parsed config.json (read from ``sidecar`` when omitted): its ``vocab_size`` pads the
    vocabulary to the embedding rows and its ``*_token_id`` fill special ids the tokenizer files leave out.

    >>> md = gguf_tokenizer_metadata(checkpoint.sidecar)        # doctest: +SKIP
    >>> md["tokenizer.ggml.model"].value                         # doctest: +SKIP
    'llama'

    Raises :class:`FormatError` naming the file when the tokenizer cannot be expressed for llama.cpp.
    """
    files = _Files(sidecar)
    if config is None:
        config = files.json("config.json") or {}
    tc: Mapping[str, Any] = files.json("tokenizer_config.json") or {}
    stm: Mapping[str, Any] = files.json("special_tokens_map.json") or {}
    tj: Optional[Mapping[str, Any]] = files.json("tokenizer.json")
    sp = parse_sentencepiece_model(sidecar["tokenizer.model"]) if "tokenizer.model" in sidecar else None
    vocab_size = _config_vocab_size(config)

    names: dict[str, str] = {}  # special token texts by kind, from tokenizer_config.json then special_tokens_map.json
    for kind in _SPECIAL_KINDS:
        text = _token_content(tc.get(f"{kind}_token"))
        if text is None:
            text = _token_content(stm.get(f"{kind}_token"))
        if text is not None:
            names[kind] = text

    if tj is not None:
        if not isinstance(tj, Mapping) or not isinstance(tj.get("model"), Mapping):
            raise FormatError("tokenizer.json: no model section")
        kind = _tokenizer_kind(tj)
        try:
            if kind == "gpt2":
                vocab = _gpt2_vocab(tj, tc, vocab_size)
            elif kind == "llama":
                spm = sp if sp is not None and sp.model_type in (1, 2) else None
                vocab = _spm_vocab(tj, spm, tc, None, vocab_size)
            else:
                vocab = _bert_vocab(tj, tc, set(names.values()), vocab_size, config)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            # a field of the wrong shape somewhere in a hand-edited file
            raise FormatError(f"tokenizer.json: malformed ({type(e).__name__}: {e})") from None
    elif sp is not None:
        if sp.model_type not in (1, 2):
            raise FormatError(
                f"tokenizer.model: SentencePiece model type {sp.model_type} (word/char) is not supported by llama.cpp"
            )
        vocab = _spm_vocab(None, sp, tc, files.json("added_tokens.json"), vocab_size)
    else:
        raise FormatError("tokenizer.json: missing (and no tokenizer.model either)")

    if tj is not None:
        stripping = [a["content"] for a in tj.get("added_tokens") or [] if a.get("lstrip") or a.get("rstrip")]
        if stripping:
            shown = ", ".join(repr(t) for t in stripping[:3])
            warnings.warn(
                f"tokenizer.json: {len(stripping)} added token(s) ({shown}) swallow neighbouring whitespace "
                "(lstrip/rstrip); GGUF has no key for it and llama.cpp does it only for models whose general.name "
                "says Phi-3: ids differ around them otherwise",
                stacklevel=2,
            )

    ids = {text: i for i, text in reversed(list(enumerate(vocab.hf_text))) if text is not None}
    special = {kind: ids[text] for kind, text in names.items() if text in ids}
    if sp is not None and tj is None:
        for kind, i in (("unk", sp.unk_id), ("bos", sp.bos_id), ("eos", sp.eos_id), ("pad", sp.pad_id)):
            if 0 <= i < len(vocab.tokens):
                special.setdefault(kind, i)
    if vocab.model == "bert":
        # llama.cpp's WordPiece starts a sequence with bos and ends it with sep
        if "cls" in special:
            special.setdefault("bos", special["cls"])
        if "sep" in special:
            special.setdefault("eos", special["sep"])
    add_bos, add_eos, add_sep = _added_specials(vocab, tj, tc, special, ids)
    # config.json and generation_config.json fill in what the tokenizer files leave out
    generation = files.json("generation_config.json") or {}
    for source in (config, config.get("text_config") or {}, generation):
        if not isinstance(source, Mapping):
            continue
        for kind in _SPECIAL_KINDS:
            value = source.get(f"{kind}_token_id")
            if isinstance(value, list) and value:
                value = value[0]  # generation_config may list several end tokens; llama.cpp finds the rest by text
            if isinstance(value, int) and 0 <= value < len(vocab.tokens):
                special.setdefault(kind, value)

    md: dict[str, MetaValue] = {"tokenizer.ggml.model": MetaValue(V.STRING, vocab.model)}
    if vocab.pre is not None:
        md["tokenizer.ggml.pre"] = MetaValue(V.STRING, vocab.pre)
    md["tokenizer.ggml.tokens"] = MetaValue(V.ARRAY, vocab.tokens, V.STRING)
    if vocab.scores is not None:
        md["tokenizer.ggml.scores"] = MetaValue(V.ARRAY, np.asarray(vocab.scores, np.float32), V.FLOAT32)
    md["tokenizer.ggml.token_type"] = MetaValue(V.ARRAY, np.asarray(vocab.types, np.int32), V.INT32)
    if vocab.merges is not None:
        md["tokenizer.ggml.merges"] = MetaValue(V.ARRAY, vocab.merges, V.STRING)
    for kind in _SPECIAL_KINDS:
        if kind in special:
            md[_SPECIAL_KEYS[kind]] = MetaValue(V.UINT32, special[kind])
    # written even when false: llama.cpp's defaults differ per tokenizer type and pre-tokenizer
    md["tokenizer.ggml.add_bos_token"] = MetaValue(V.BOOL, add_bos)
    md["tokenizer.ggml.add_eos_token"] = MetaValue(V.BOOL, add_eos)
    if add_sep is not None:
        md["tokenizer.ggml.add_sep_token"] = MetaValue(V.BOOL, add_sep)
    md.update(vocab.extra)
    template = _chat_templates(files, tc)
    if template is not None:
        md.update(_template_metadata(template))
    return md


# ---- writing Hugging Face files ------------------------------------------------------------------


def _md_value(metadata: Mapping[str, MetaValue], key: str, default: Any = None) -> Any:
    item = metadata.get(key)
    return default if item is None else item.value


def _added_token(i: int, text: str, special: bool) -> dict[str, Any]:
    return {
        "id": i,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _template(
    first: Optional[tuple[str, int]], last: Optional[tuple[str, int]], pair_sep: bool = False
) -> Optional[dict[str, Any]]:
    """A TemplateProcessing that adds ``first`` before and ``last`` after the sequence (None: adds nothing)."""
    if first is None and last is None:
        return None

    def piece(name: str, type_id: int = 0) -> dict[str, Any]:
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    def seq(name: str, type_id: int = 0) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    single: list[dict[str, Any]] = (
        ([piece(first[0])] if first else []) + [seq("A")] + ([piece(last[0])] if last else [])
    )
    if pair_sep:  # BERT: [CLS] A [SEP] B [SEP], the second segment typed 1
        pair = single + [seq("B", 1)] + ([piece(last[0], 1)] if last else [])
    else:
        pair = single + ([piece(first[0], 1)] if first else []) + [seq("B", 1)] + ([piece(last[0], 1)] if last else [])
    specials = {name: {"id": name, "ids": [i], "tokens": [name]} for name, i in (t for t in (first, last) if t)}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}


def _spm_merges(tokens: Sequence[str], scores: np.ndarray) -> list[list[str]]:
    """Every (left, right) whose concatenation is a token, ranked by that token's score, best first.

    This is the ranking llama.cpp's SentencePiece loop applies: at each step it merges the adjacent pair whose
    concatenation is in the vocabulary with the highest score (leftmost on ties). llama.cpp starts from single
    characters whether or not they are tokens; a Hugging Face BPE turns a character that is not a token into
    bytes at once, so merges through such a character are lost (warned about: real SentencePiece vocabularies
    hold every character they use)."""
    ids: dict[str, int] = {}
    for i, text in enumerate(tokens):
        ids[text] = i  # llama.cpp's text -> id map keeps the last duplicate
    found: list[tuple[float, int, int, str, str]] = []
    lost: set[str] = set()
    for text, i in ids.items():
        for k in range(1, len(text)):
            left, right = text[:k], text[k:]
            in_left, in_right = left in ids, right in ids
            if in_left and in_right:
                found.append((-float(scores[i]), i, k, left, right))
            elif (in_left or len(left) == 1) and (in_right or len(right) == 1):
                lost.update(part for part in (left, right) if part not in ids)
    if lost:
        shown = ", ".join(repr(c) for c in sorted(lost)[:5])
        warnings.warn(
            f"GGUF metadata: {len(lost)} character(s) ({shown}) are merged by llama.cpp but are not tokens; the "
            "Hugging Face tokenizer byte-encodes them instead, so ids differ on text containing them",
            stacklevel=3,
        )
    found.sort()
    return [[left, right] for _, _, _, left, right in found]


def _tokenizer_json(
    model: Mapping[str, Any],
    added: list[dict[str, Any]],
    normalizer: Any,
    pre_tokenizer: Any,
    post_processor: Any,
    decoder: Any,
) -> bytes:
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
    }
    # compact: json's indenting encoder is pure Python, ten times slower on a 256k-token vocabulary
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def hf_tokenizer_files(metadata: Mapping[str, MetaValue]) -> dict[str, bytes]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` for a GGUF's tokenizer keys.

    The files load with ``transformers.AutoTokenizer.from_pretrained`` (a fast tokenizer) and encode text to
    the ids llama.cpp produces from the same metadata, special tokens included.

    >>> from slmpkg.formats import gguf as gguf_format
    >>> files = hf_tokenizer_files(gguf_format.read("model.gguf").metadata)   # doctest: +SKIP
    >>> sorted(files)                                                           # doctest: +SKIP
    ['special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json']
    """
    try:
        return _hf_tokenizer_files(metadata)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise FormatError(f"GGUF metadata: malformed tokenizer keys ({type(e).__name__}: {e})") from None


def _hf_tokenizer_files(metadata: Mapping[str, MetaValue]) -> dict[str, bytes]:
    kind = _md_value(metadata, "tokenizer.ggml.model")
    if kind is None:
        raise FormatError("GGUF metadata: tokenizer.ggml.model is missing")
    tokens = _md_value(metadata, "tokenizer.ggml.tokens")
    if tokens is None:
        raise FormatError("GGUF metadata: tokenizer.ggml.tokens is missing")
    tokens = list(tokens)
    n = len(tokens)
    types: list[int] = np.asarray(
        _md_value(metadata, "tokenizer.ggml.token_type", np.full(n, _NORMAL)), np.int32
    ).tolist()
    if len(types) < n:
        raise FormatError(f"GGUF metadata: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

    def special_id(kind_: str, default: Optional[int] = None) -> Optional[int]:
        """The id a key names, else llama.cpp's default id for it when that token looks special."""
        value = _md_value(metadata, _SPECIAL_KEYS[kind_])
        if value is None and default is not None and default < n and types[default] in (_CONTROL, _UNKNOWN):
            value = default
        return int(value) if value is not None and 0 <= int(value) < n else None

    # llama.cpp's defaults when a key is absent: bos added for SentencePiece, WordPiece and some BPE types
    pre_name = _md_value(metadata, "tokenizer.ggml.pre") or "default"
    add_bos = bool(
        _md_value(metadata, "tokenizer.ggml.add_bos_token", kind in ("llama", "bert") or pre_name in _BOS_BY_DEFAULT)
    )
    add_eos = bool(_md_value(metadata, "tokenizer.ggml.add_eos_token", False))

    if kind == "gpt2":
        specials = {k: special_id(k) for k in _SPECIAL_KINDS}
        # llama.cpp falls back to id 11 for a bos/eos it must add but was not told about; only the template
        # gets that fallback, naming "(" or whatever sits at 11 a special token would split it out of text
        added_ends = {k: specials[k] if specials[k] is not None else (11 if 11 < n else None) for k in ("bos", "eos")}
        tokenizer_json, clean = _gpt2_json(metadata, pre_name, tokens, types, added_ends, add_bos, add_eos)
    elif kind == "llama":
        specials = {k: special_id(k, d) for k, d in (("bos", 1), ("eos", 2), ("unk", 0))}
        specials.update({k: special_id(k) for k in ("sep", "pad", "cls", "mask")})
        tokenizer_json = _spm_json(metadata, tokens, types, specials, add_bos, add_eos)
        clean = False
    elif kind == "bert":
        specials = {
            k: special_id(k, d) for k, d in (("bos", 101), ("unk", 100), ("sep", 102), ("pad", 0), ("mask", 103))
        }
        specials["cls"] = special_id("cls") if special_id("cls") is not None else specials["bos"]
        specials["eos"] = special_id("eos")
        tokenizer_json = _bert_json(metadata, tokens, types, specials)
        clean = True
    else:
        raise FormatError(
            f"GGUF metadata: tokenizer.ggml.model {kind!r} cannot be rebuilt as a Hugging Face tokenizer (gpt2, llama, bert)"
        )

    def text_of(i: Optional[int]) -> Optional[str]:
        if i is None:
            return None
        if kind == "bert" and types[i] == _NORMAL:
            return _unphantom(tokens[i])
        return tokens[i]

    special_map = {f"{k}_token": text_of(i) for k, i in specials.items() if i is not None}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update(special_map)
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = add_eos
    config["clean_up_tokenization_spaces"] = clean
    arch = _md_value(metadata, "general.architecture")
    context = _md_value(metadata, f"{arch}.context_length") if arch else None
    if context is not None:
        config["model_max_length"] = int(context)
    template = _hf_chat_template(metadata)
    if template is not None:
        config["chat_template"] = template
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2).encode("utf-8"),
        "special_tokens_map.json": json.dumps(special_map, ensure_ascii=False, indent=2).encode("utf-8"),
    }


def _hf_chat_template(metadata: Mapping[str, MetaValue]) -> Optional[Any]:
    default = _md_value(metadata, "tokenizer.chat_template")
    names = list(_md_value(metadata, "tokenizer.chat_templates", []) or [])
    if not names:
        return default
    named = [{"name": "default", "template": default}] if default is not None else []
    for name in names:
        text = _md_value(metadata, f"tokenizer.chat_template.{name}")
        if text is not None:
            named.append({"name": name, "template": text})
    return named


def _rstripped(metadata: Mapping[str, MetaValue], tokens: Sequence[str], types: Sequence[int]) -> set[int]:
    """Tokens llama.cpp strips the whitespace after. GGUF has no key for it: llama.cpp decides by model name,
    for Phi-3 only (its added tokens have ``rstrip``), all special tokens but <unk>, <s> and <|endoftext|>."""
    name = str(_md_value(metadata, "general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return set()
    keep = {"<unk>", "<s>", "<|endoftext|>"}
    return {i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED, _UNKNOWN) and tokens[i] not in keep}


def _added_tokens(
    metadata: Mapping[str, MetaValue], tokens: Sequence[str], types: Sequence[int]
) -> list[dict[str, Any]]:
    # llama.cpp splits control and unknown tokens out of the text when parsing specials, user-defined ones
    # always: the same as special and non-special added tokens in a fast tokenizer.
    rstrip = _rstripped(metadata, tokens, types)
    added = []
    for i, t in enumerate(types):
        if t in (_CONTROL, _UNKNOWN, _USER_DEFINED):
            entry = _added_token(i, tokens[i], t != _USER_DEFINED)
            entry["rstrip"] = i in rstrip
            added.append(entry)
    return added


def _gpt2_json(
    metadata: Mapping[str, MetaValue],
    pre_name: str,
    tokens: list[str],
    types: Sequence[int],
    specials: Mapping[str, Optional[int]],
    add_bos: bool,
    add_eos: bool,
) -> tuple[bytes, bool]:
    pre, ignore_merges, clean = _pre_by_name(pre_name)
    merges = []
    for m in _md_value(metadata, "tokenizer.ggml.merges", []) or []:
        cut = m.find(" ", 1)
        if cut < 0:
            raise FormatError(f"GGUF metadata: tokenizer.ggml.merges entry {m!r} has no space")
        # a space inside a part was written as U+0120, which in a byte-level vocabulary is the space byte
        merges.append([m[:cut], m[cut + 1 :]])
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab[text] = i
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": merges,
    }
    splits: list[dict[str, Any]] = [
        {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
        for r in pre.tokenizer_json_regexes()
    ]
    splits.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    bos, eos = specials.get("bos"), specials.get("eos")
    post = _template(
        (tokens[bos], bos) if add_bos and bos is not None else None,
        (tokens[eos], eos) if add_eos and eos is not None else None,
    )
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return _tokenizer_json(
        model,
        _added_tokens(metadata, tokens, types),
        None,
        {"type": "Sequence", "pretokenizers": splits},
        post,
        decoder,
    ), clean


def _spm_json(
    metadata: Mapping[str, MetaValue],
    tokens: list[str],
    types: Sequence[int],
    specials: Mapping[str, Optional[int]],
    add_bos: bool,
    add_eos: bool,
) -> bytes:
    n = len(tokens)
    scores = _md_value(metadata, "tokenizer.ggml.scores")
    scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)
    if len(scores) < n:
        raise FormatError(f"GGUF metadata: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    prefix = bool(_md_value(metadata, "tokenizer.ggml.add_space_prefix", True))
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab[text] = i
    unk = specials.get("unk")
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": tokens[unk] if unk is not None else None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": _spm_merges(tokens, scores),
    }
    # llama.cpp puts a space before every piece of text that follows a special token (or starts the input),
    # then turns spaces into ▁: a Prepend normalizer does the same, as it runs on each segment between
    # added tokens.
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    normalizer = {
        "type": "Sequence",
        "normalizers": ([{"type": "Prepend", "prepend": SPACE}] if prefix else []) + [replace],
    }
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos, eos = specials.get("bos"), specials.get("eos")
    post = _template(
        (tokens[bos], bos) if add_bos and bos is not None else None,
        (tokens[eos], eos) if add_eos and eos is not None else None,
    )
    return _tokenizer_json(
        model,
        _added_tokens(metadata, tokens, types),
        normalizer,
        None,
        post,
        {"type": "Sequence", "decoders": decoders},
    )


def _unphantom(token: str) -> str:
    return token[1:] if token.startswith(SPACE) else "##" + token


def _bert_json(
    metadata: Mapping[str, MetaValue],
    tokens: list[str],
    types: Sequence[int],
    specials: Mapping[str, Optional[int]],
) -> bytes:
    vocab: dict[str, int] = {}
    hf_tokens: list[str] = []
    for i, text in enumerate(tokens):
        hf = _unphantom(text) if types[i] == _NORMAL else text
        hf_tokens.append(hf)
        vocab[hf] = i
    lowercase = bool(_md_value(metadata, "tokenizer.ggml.normalizer.lowercase", True))
    strip = bool(_md_value(metadata, "tokenizer.ggml.normalizer.strip_accents", lowercase))
    unk = specials.get("unk")
    model = {
        "type": "WordPiece",
        "unk_token": hf_tokens[unk] if unk is not None else "[UNK]",
        "continuing_subword_prefix": "##",
        # llama.cpp has no word-length limit; Hugging Face's default (100) would turn long words into [UNK]
        "max_input_chars_per_word": 1_000_000,
        "vocab": vocab,
    }
    normalizer = {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": True,
        "strip_accents": strip,
        "lowercase": lowercase,
    }
    bos, sep = specials.get("bos"), specials.get("sep")
    post = _template(
        (hf_tokens[bos], bos) if bos is not None else None,
        (hf_tokens[sep], sep) if sep is not None else None,
        pair_sep=True,
    )
    added = [_added_token(i, hf_tokens[i], True) for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
    added += [_added_token(i, hf_tokens[i], False) for i, t in enumerate(types) if t == _USER_DEFINED]
    added.sort(key=lambda a: a["id"])
    decoder = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    return _tokenizer_json(model, added, normalizer, {"type": "BertPreTokenizer"}, post, decoder)
