"""Rope settings recovered from rotary cos/sin caches: the base and a linear factor, LongRoPE's per-frequency
factors and magnitude."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from ...errors import FormatError


def _nice(value: float) -> float:
    """A float32 attribute as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _shortest(value: float, accept: Callable[[float], bool]) -> Optional[float]:
    """The decimal with the fewest significant digits (up to 7) near ``value`` that ``accept`` takes."""
    if not (math.isfinite(value) and value > 0):
        return None
    digits = int(math.floor(math.log10(value)))
    for significant in range(1, 8):
        candidate = float(round(value, significant - 1 - digits))
        if candidate > 0 and accept(candidate):
            return candidate
    return None


def _frequencies(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Each column's angular step per position, from the phase unwrapped along the positions (steps
    are below π since rotary frequencies are at most 1), least squares through the origin."""
    phase = np.unwrap(np.arctan2(sin, cos), axis=0)  # [positions, half]
    p = np.arange(cos.shape[0], dtype=np.float64)
    return (phase * p[:, None]).sum(axis=0) / (p * p).sum()


def _rope_base(cos: np.ndarray, sin: np.ndarray, eps: float, source: str) -> tuple[float, float]:
    """(rope base, linear scaling factor) behind cos/sin caches [positions, dim/2] of
    ``position × base^(-2j/dim) / factor``.

    The first frequency is ``1 / factor`` (1 unscaled); the base is fitted in log space across the
    others, each weighted by its total angle (its precision). Caches stored in float16 (or short ones)
    pin them only to a few digits, so the answer is the shortest decimals (10000, 500000, 1e6; 8, 4)
    whose recomputed caches match the stored ones within ``eps`` (the caches' rounding plus a float32
    writer's accumulated error); no match means a rope scaling this cannot name (per-frequency
    factors: Llama 3's, LongRoPE without its two caches).
    """
    positions, half = cos.shape
    if positions < 2 or half < 2:
        raise FormatError(f"{source}: cos/sin caches too small to read the rope base from")
    dim = 2 * half
    p = np.arange(positions, dtype=np.float64)
    inv_freq = _frequencies(cos, sin)
    if not (inv_freq > 0).all():
        raise FormatError(f"{source}: cos/sin caches do not look like rotary embeddings")
    j = np.arange(1, half)
    x = 2 * j / dim

    def matches(base: float, factor: float) -> bool:
        freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim) / factor
        angles = np.outer(p, freqs)
        return bool(np.abs(np.cos(angles) - cos).max() <= eps and np.abs(np.sin(angles) - sin).max() <= eps)

    factors = [1.0] if abs(inv_freq[0] - 1.0) < 1e-4 else []
    factors += [f for f in [_shortest(1.0 / inv_freq[0], lambda f: True)] if f is not None and f not in factors]
    for factor in factors:
        scaled = inv_freq[1:] * factor
        weights = scaled * (positions - 1)
        estimate = float(np.exp(-(weights * x * np.log(scaled)).sum() / (weights * x * x).sum()))
        base = _shortest(estimate, lambda b, f=factor: matches(b, f))
        if base is None and matches(estimate, factor):
            base = float(np.float32(estimate))
        if base is None:
            continue
        # the factor too, to the fewest digits that still match
        return base, _shortest(factor, lambda f, b=base: matches(b, f)) or factor
    raise FormatError(
        f"{source}: cos_cache/sin_cache are not plain rotary embeddings of any base (a per-frequency rope scaling?); "
        "put the model's config.json beside the ONNX file to say which"
    )


def _writer_inv_freq(base: float, dim: int) -> np.ndarray:
    """Rotary inverse frequencies as float32 the way slmpkg's writer (and transformers) computes them."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def _longrope_factors(cos: np.ndarray, sin: np.ndarray, base: float, source: str) -> tuple[np.ndarray, float]:
    """(per-frequency divisors, cos/sin magnitude) of one LongRoPE cache pair (float32 arrays as stored).

    Caches are ``cos(position × inv_freq / factor) × magnitude``; the magnitude is position 0's cosine.
    Each factor is first estimated from its column's phase slope, then made exact where the caches
    allow: the float32 neighbours of the estimated frequency are recomputed as the writer computes
    them and the one reproducing the stored column bit for bit is taken, then the float32 factor that
    divides the base frequency into exactly that value (the nearest to the estimate when several do).
    Caches that reproduce no candidate (float16 caches, another writer) keep the float32 estimate.
    """
    half = cos.shape[1]
    magnitude = np.float32(cos[0, 0])
    if not magnitude > 0:
        raise FormatError(f"{source}: LongRoPE caches with a non-positive magnitude")
    c64, s64 = cos.astype(np.float64), sin.astype(np.float64)
    estimate = _frequencies(c64, s64)
    base_inv = _writer_inv_freq(base, 2 * half)
    positions = np.arange(cos.shape[0], dtype=np.float32)
    out = np.empty(half, np.float32)
    for j in range(half):
        guess = np.float32(estimate[j])
        if not guess > 0:
            raise FormatError(f"{source}: LongRoPE caches do not look like rotary embeddings (column {j})")
        found = None
        if cos.dtype == np.float32:
            steps = np.arange(-96, 97)
            candidates = (guess.view(np.int32) + steps).astype(np.int32).view(np.float32)
            for inv in candidates[np.argsort(np.abs(steps))]:
                angles = (positions * inv).astype(np.float32).astype(np.float64)
                if (np.array_equal(np.cos(angles).astype(np.float32) * magnitude, cos[:, j])
                        and np.array_equal(np.sin(angles).astype(np.float32) * magnitude, sin[:, j])):
                    found = np.float32(inv)
                    break
        if found is None:
            out[j] = np.float32(float(base_inv[j]) / float(guess))
            continue
        f_guess = np.float32(float(base_inv[j]) / float(found))
        steps = np.arange(-8, 9)
        options = (f_guess.view(np.int32) + steps).astype(np.int32).view(np.float32)
        exact = [f for f in options[np.argsort(np.abs(steps))] if np.float32(base_inv[j] / f) == found]
        out[j] = exact[0] if exact else f_guess
    return out, float(magnitude)


def _llama3_rope(cos: np.ndarray, sin: np.ndarray, eps: float, source: str) -> tuple[float, dict[str, Any]]:
    """(rope base, Llama 3 rope parameters) behind cos/sin caches [positions, dim/2] of
    ``position × base^(-2j/dim) / f_j`` where ``f_j`` are Llama 3.1+'s per-frequency factors (1 for
    short wavelengths, ``factor`` for long ones, a smooth ramp between).

    Where the factor does not change from one frequency to the next (both flat bands, most of them),
    the log frequencies fall by exactly ``2·ln(base)/dim`` per step; the median step gives the base,
    the base every factor, and :func:`slmpkg.architectures.llama3_rope_parameters` the parameters. The
    answer is the first of the nearest power of two and the shortest decimals (500000, 32, 4, 8192)
    whose recomputed caches match the stored ones within ``eps``.
    """
    from ... import architectures

    positions, half = cos.shape
    dim = 2 * half
    inv_freq = _frequencies(cos, sin)
    if half < 4 or not (inv_freq > 0).all():
        raise FormatError(f"{source}: cos/sin caches do not look like Llama 3 rotary embeddings")
    logs = np.log(inv_freq)
    step = float(np.median(logs[:-1] - logs[1:]))
    p = np.arange(positions, dtype=np.float64)

    def matches(base: float, rope: dict[str, Any]) -> bool:
        divisors = architectures.llama3_rope_factors({"rope_parameters": {**rope, "rope_theta": base}}, dim)
        angles = np.outer(p, _writer_inv_freq(base, dim).astype(np.float64) / divisors)
        return bool(np.abs(np.cos(angles) - cos).max() <= eps and np.abs(np.sin(angles) - sin).max() <= eps)

    def decimals(value: float) -> list[float]:
        # the nearest power of two first (every Llama 3.x factor and original context is one: float16
        # caches of a short context cannot tell 32 from 30), then the shortest decimals
        if not value > 0:
            return []
        digits = int(math.floor(math.log10(value)))
        options = [float(2.0 ** round(math.log2(value)))] + [float(round(value, n - 1 - digits)) for n in range(1, 8)]
        return list(dict.fromkeys(options))

    def fitted(base: float) -> Optional[dict[str, Any]]:
        factors = _writer_inv_freq(base, dim).astype(np.float64) / inv_freq
        top = float(np.median(factors[factors >= factors.max() * (1 - 2e-3)]))
        if top <= 1.0:
            return None
        # the flat bands exactly (the caches' rounding off them), so only the ramp is fitted
        clean = np.where(np.abs(factors - 1) <= 2e-3, 1.0, np.where(np.abs(factors - top) <= 2e-3 * top, top, factors))
        try:
            rope = architectures.llama3_rope_parameters(clean, base, dim, source, check=False)
        except FormatError:
            return None
        for factor in decimals(top):
            for high in decimals(rope["high_freq_factor"]):
                for original in dict.fromkeys(int(v) for v in decimals(rope["original_max_position_embeddings"]) if v >= 1):
                    candidate = dict(rope, factor=factor, high_freq_factor=high, original_max_position_embeddings=original)
                    if matches(base, candidate):
                        return candidate
        return None

    for base in decimals(math.exp(step * dim / 2)):
        rope = fitted(base) if base > 0 else None
        if rope is not None:
            return base, rope
    raise FormatError(
        f"{source}: cos_cache/sin_cache are neither plain rotary embeddings nor a Llama 3 rope scaling; "
        "put the model's config.json beside the ONNX file to say which"
    )
