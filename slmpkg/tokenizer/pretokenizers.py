"""llama.cpp's BPE pre-tokenizers: the split regexes each ``tokenizer.ggml.pre`` type runs, and the type that
``tokenizer.json``'s ``pre_tokenizer`` section amounts to (:func:`llama_cpp_pre_type`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional


from ..errors import FormatError


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
