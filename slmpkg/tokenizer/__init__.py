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

from .pretokenizers import PRE_TOKENIZERS, PreTokenizer, llama_cpp_pre_type
from .spm_model import SentencePieceModel, parse_sentencepiece_model
from .to_gguf import gguf_tokenizer_metadata
from .to_hf import hf_tokenizer_files
from .vocab import SPACE, TokenType  # noqa: F401  (SPACE: importable as before)


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
