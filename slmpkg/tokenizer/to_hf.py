"""llama.cpp's ``tokenizer.*`` GGUF keys → Hugging Face tokenizer files (:func:`hf_tokenizer_files`)."""

from __future__ import annotations

import json
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..checkpoint import MetaValue
from ..errors import FormatError
from .pretokenizers import _BOS_BY_DEFAULT, _pre_by_name
from .vocab import _CONTROL, _NORMAL, _SPECIAL_KEYS, _SPECIAL_KINDS, _UNKNOWN, _USER_DEFINED, SPACE


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
