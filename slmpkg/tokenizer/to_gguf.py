"""Hugging Face tokenizer files → llama.cpp's ``tokenizer.*`` GGUF keys (:func:`gguf_tokenizer_metadata`)."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np
from gguf import GGUFValueType as V

from ..checkpoint import MetaValue
from ..errors import FormatError
from .pretokenizers import llama_cpp_pre_type
from .spm_model import SentencePieceModel, parse_sentencepiece_model
from .vocab import _BYTE, _CONTROL, _NORMAL, _SPECIAL_KEYS, _SPECIAL_KINDS, _UNKNOWN, _UNUSED, _USER_DEFINED, SPACE


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
                except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
                    raise FormatError(f"{name}: not valid JSON ({e})") from None
        return self._json[name]

    def object(self, name: str) -> Optional[Mapping[str, Any]]:
        """The file as a JSON object, None when absent; any other JSON is a FormatError."""
        value = self.json(name)
        if value is not None and not isinstance(value, Mapping):
            raise FormatError(f"{name}: not a JSON object")
        return value

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


# ids without a token are padded with [PADi] tokens (GGUF lists every id); real checkpoints pad a few
# hundred ids at most, so a vocabulary mostly made of padding is damage, refused before it is built
_MOST_PADDING = 256


def _size(by_id: Mapping[int, str], vocab_size: Optional[int], source: str) -> int:
    if any(i < 0 for i in by_id):
        raise FormatError(f"{source}: token id {min(by_id)} is negative")
    needed = max(by_id) + 1 if by_id else 0
    if vocab_size is not None and needed > vocab_size:
        raise FormatError(f"{source}: token id {needed - 1} does not fit config.json vocab_size {vocab_size}")
    size = needed if vocab_size is None else vocab_size
    if size - len(by_id) > max(len(by_id), _MOST_PADDING):
        raise FormatError(f"{source}: {size - len(by_id)} of {size} token ids have no token (the ids given, "
                          "or config.json's vocab_size, leave more padding than vocabulary)")
    return size


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
    """Every step of a normalizer/pre_tokenizer/decoder tree, flattening Sequences (without recursion:
    a file may nest them as deep as its JSON parses)."""
    pending = [node]
    while pending:
        node = pending.pop()
        if not isinstance(node, Mapping):
            continue
        if node.get("type") == "Sequence":
            steps = node.get(key, [])
            pending.extend(reversed(steps) if isinstance(steps, list) else ())
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
    try:
        ends = _post_processor_ends(tj)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise FormatError(f"tokenizer.json: malformed post_processor ({type(e).__name__}: {e})") from None
    if ends is not None and not all(isinstance(t, (str, type(None))) for t in ends[:2]):
        raise FormatError("tokenizer.json: post_processor's special tokens are not named by strings")
    return ends


def _post_processor_ends(tj: Mapping[str, Any]) -> Optional[tuple[Optional[str], Optional[str], dict[str, int]]]:
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
        if not isinstance(choice, Mapping) or not isinstance(choice.get("template", ""), str):
            raise FormatError("tokenizer_config.json: chat_template list entries are not {name, template} objects")
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
        for end, end_id in ((first, first_id), (last, last_id)):
            if end_id is not None and not 0 <= end_id < len(vocab.tokens):
                raise FormatError(f"tokenizer.json: post_processor's {end!r} has id {end_id}, not a token id")
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
        config = files.object("config.json") or {}
    tc: Mapping[str, Any] = files.object("tokenizer_config.json") or {}
    stm: Mapping[str, Any] = files.object("special_tokens_map.json") or {}
    tj: Optional[Mapping[str, Any]] = files.object("tokenizer.json")
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
        try:
            vocab = _spm_vocab(None, sp, tc, files.object("added_tokens.json"), vocab_size)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            # an added token of the wrong shape in added_tokens.json or tokenizer_config.json
            raise FormatError(f"added_tokens.json / tokenizer_config.json: malformed added token ({type(e).__name__}: {e})") from None
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
    generation = files.object("generation_config.json") or {}
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
    _check_text(md)
    return md


def _check_text(md: Mapping[str, MetaValue]) -> None:
    """Every string of ``md`` is text a GGUF file can hold: JSON can spell lone surrogates (``"\\ud800"``) and
    put numbers where tokens belong. (Bytes a GGUF held that are not UTF-8 come as surrogate escapes and go back.)"""
    for key, item in md.items():
        values = item.value if item.item_type is V.STRING else [item.value] if item.type is V.STRING else []
        for text in values:
            try:
                text.encode("utf-8", "surrogateescape")
            except (AttributeError, UnicodeEncodeError):
                raise FormatError(f"tokenizer files: {key} would hold {text!r}, which is not text") from None
