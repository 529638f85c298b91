"""What both directions share: llama.cpp's token types and SentencePiece's visible space."""

from __future__ import annotations

from enum import IntEnum


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
