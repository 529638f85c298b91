"""SentencePiece ``tokenizer.model``: a minimal protobuf reader of its pieces, scores and types."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Iterator


from ..errors import FormatError
from .vocab import _NORMAL


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
        elif wire in (1, 2, 5):  # fixed64, length-delimited, fixed32
            size = {1: 8, 5: 4}[wire] if wire != 2 else varint()
            if i + size > n:
                raise FormatError(f"{source}: truncated protobuf")
            yield number, wire, data[i : i + size]
            i += size
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
