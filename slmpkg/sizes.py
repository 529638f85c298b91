"""Sizes written by people (``--max-shard-size 5GB``, ``--split-max-size 2G``, ``--max-memory 8GiB``):
one rule, used by every option that takes a size.

The unit's prefix decides, with or without the trailing ``B`` and in any case:

- ``K``, ``M``, ``G``, ``T`` (``KB``, ``MB``, ``GB``, ``TB``) are powers of 1000 (SI), as transformers
  reads ``max_shard_size``, llama.cpp's ``gguf-split --split-max-size`` reads ``2G`` and Kubernetes
  reads ``8G``;
- ``Ki``, ``Mi``, ``Gi``, ``Ti`` (``KiB``, ``MiB``, ``GiB``, ``TiB``) are powers of 1024 (IEC);
- no unit, or ``B``, is bytes.

A fraction is allowed (``1.5GB``) and rounds down to whole bytes; the result must be at least one byte.

Example:
    >>> parse_size("8G"), parse_size("8GB"), parse_size("8GiB"), parse_size("8Gi")
    (8000000000, 8000000000, 8589934592, 8589934592)
    >>> parse_size("1.5 MiB"), parse_size(4096)
    (1572864, 4096)
"""

from __future__ import annotations

import decimal
import re
from typing import Union

from .errors import UsageError

__all__ = ["parse_size"]

_PREFIXES = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
             "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?(b)?\s*", re.IGNORECASE)
_HELP = ("use a number of bytes with an optional unit: K, M, G, T (KB, MB, ...: powers of 1000) "
         "or Ki, Mi, Gi, Ti (KiB, MiB, ...: powers of 1024)")


def parse_size(value: Union[str, int]) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"2G"``, ``"512MiB"``, ``"1.5GB"``, ``"4096"``
    (see the module docstring for the rule). Raises :class:`~slmpkg.errors.UsageError` naming the
    value for anything else (an unknown unit, an exponent, zero or a negative size).

    Example:
        >>> parse_size("500MB"), parse_size("2GiB")
        (500000000, 2147483648)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"invalid size {value!r}: {_HELP}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.fullmatch(value)
        if m is None:
            raise UsageError(f"invalid size '{value}': {_HELP}")
        n = int(decimal.Decimal(m.group(1)) * _PREFIXES[(m.group(2) or "").lower()])
    if n < 1:
        raise UsageError(f"invalid size '{value}': must be at least 1 byte")
    return n
