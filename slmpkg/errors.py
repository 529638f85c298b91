"""The error hierarchy. Every error slmpkg raises on bad input is a :class:`SlmpkgError`, whose
message is one line that names the file (or value) and the problem; the CLI prints it and exits non-zero."""

from __future__ import annotations

__all__ = ["SlmpkgError", "QuantizationError", "FormatError", "UsageError", "SignatureError"]


class SlmpkgError(Exception):
    """Base class of every error slmpkg raises deliberately."""


class QuantizationError(SlmpkgError, ValueError):
    """An array cannot be quantized as asked (unknown type, shape not divisible by the block, bad imatrix)."""


class FormatError(SlmpkgError):
    """A file is not what it claims to be: not a GGUF, truncated, or missing required metadata."""


class UsageError(SlmpkgError):
    """Options that contradict each other or the input (e.g. re-quantizing without --allow-requantize)."""


class SignatureError(SlmpkgError):
    """Signing or verification failed. The message is one line naming the file and what failed: a bad
    signature, the wrong key, a file changed/added/removed, a malformed bundle, or a path we refuse
    (symlink, special file)."""
