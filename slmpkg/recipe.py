"""Build recipes: ``slmpkg.toml`` names a model, its source, the hardware targets to build for and how to
publish them; :func:`load_recipe` parses and checks one.

A recipe::

    name = "tiny-llama"                 # registry name
    version = "1.0"
    source = "tiny-llama"               # a HF directory, GGUF or ONNX (relative to the recipe), or hf://org/repo@rev
    targets = ["cpu-x86_64-avx2", "cpu-arm64", "cuda-sm80"]   # default: every target of the catalog

    [defaults]                          # options for every target (a target's own table overrides them)
    imatrix = "imatrix.gguf"

    [target.cuda-sm75]                  # how one target differs from the catalog's choice
    format = "onnx"
    quant = "int4"

    [quality]                           # the gate: a build that misses it publishes nothing
    max_kld = 0.05
    min_top1 = 0.90

    [publish]
    registry = "s3://models/registry"
    key = "release.pem"
    tags = ["latest"]

Each target gets the catalog's format and quantization (:data:`slmpkg.targets.TARGETS`) unless the
recipe says otherwise. Targets whose settings are equal share one :class:`ArtifactSpec`, so a build
makes each distinct artifact once.

Example:
    >>> r = parse_recipe({"name": "m", "version": "1", "source": "hf://org/m", "targets": ["cpu-x86_64", "cpu-arm64"]})
    >>> [(a.id, a.targets) for a in r.artifacts()]
    [('gguf-Q4_0', ('cpu-x86_64', 'cpu-arm64'))]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import SlmpkgError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ArtifactSpec", "Publish", "Quality", "Recipe", "RecipeError", "load_recipe", "parse_recipe",
           "FORMATS", "ONNX_QUANTS", "FLOAT_DTYPES"]

PathLike = Union[str, "os.PathLike[str]"]

FORMATS = ("gguf", "onnx", "safetensors")
ONNX_QUANTS = ("f32", "f16", "int4", "int8")  # besides GGUF presets, whose blocks are carried over
FLOAT_DTYPES = ("BF16", "F16", "F32")

# options a target may set, and the formats each applies to
_GGUF_KEYS = {"imatrix", "pure", "leave_output_tensor", "output_tensor_type", "token_embedding_type", "tensor_types"}
_ONNX_KEYS = {"block_size", "accuracy_level", "asymmetric", "exact_mins", "dtype"}
_GATE_KEYS = {"max_kld", "min_top1"}
_TARGET_KEYS = {"format", "quant"} | _GGUF_KEYS | _ONNX_KEYS | _GATE_KEYS
_TOP_KEYS = {"name", "version", "source", "targets", "defaults", "target", "quality", "publish"}
_QUALITY_KEYS = {"max_kld", "min_top1", "text", "context", "chunks", "runtime"}
_PUBLISH_KEYS = {"registry", "key", "tags", "endpoint_url", "expires_days"}


# how long signed registry metadata may stay valid: 100 years (a date past year 9999 has no form)
MAX_EXPIRES_DAYS = 36525


class RecipeError(SlmpkgError):
    """A recipe that cannot be built as written; the message names the file and the key."""


@dataclass(frozen=True)
class ArtifactSpec:
    """One distinct artifact: a format, a quantization and the options that change its bytes.

    ``quant`` is a GGUF preset name (``Q4_K_M``) for GGUF; for ONNX either a GGUF preset (that GGUF's
    blocks are carried onto MatMulNBits) or one of :data:`ONNX_QUANTS`; for safetensors a float dtype.
    ``options`` are sorted ``(key, value)`` pairs (paths already resolved against the recipe).
    """

    format: str
    quant: str
    options: tuple[tuple[str, Any], ...] = ()
    targets: tuple[str, ...] = field(default=(), compare=False)

    @property
    def id(self) -> str:
        """A stable job name: ``gguf-Q4_K_M``, ``onnx-int4``, plus a short hash when options are set."""
        base = f"{self.format}-{self.quant}"
        if not self.options:
            return base
        digest = hashlib.sha256(json.dumps(self.options, default=str).encode()).hexdigest()[:8]
        return f"{base}-{digest}"

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    @property
    def carries_gguf(self) -> bool:
        """An ONNX artifact made from a GGUF of preset ``quant`` (its blocks carried over)."""
        return self.format == "onnx" and self.quant not in ONNX_QUANTS

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "format": self.format, "quant": self.quant,
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in self.options},
                "targets": list(self.targets)}


@dataclass(frozen=True)
class Quality:
    """How artifacts are measured and the gate they must pass (None: no limit)."""

    max_kld: Optional[float] = None
    min_top1: Optional[float] = None
    text: Optional[Path] = None
    context: int = 256
    chunks: int = 4
    runtime: Optional[bool] = None  # None: run the runtimes when installed (required when a gate is set)

    @property
    def gated(self) -> bool:
        return self.max_kld is not None or self.min_top1 is not None


@dataclass(frozen=True)
class Publish:
    registry: Optional[str] = None
    key: Optional[Path] = None
    tags: tuple[str, ...] = ()
    endpoint_url: Optional[str] = None
    expires_days: Optional[float] = None


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe; :meth:`artifacts` groups its targets into distinct artifacts."""

    name: str
    version: str
    source: str  # a local path (absolute) or an hf:// URL
    targets: dict[str, dict[str, Any]]  # target -> resolved settings (format, quant, options, gate)
    quality: Quality = Quality()
    publish: Publish = Publish()
    path: Optional[Path] = None
    document: dict[str, Any] = field(default_factory=dict, compare=False)  # the TOML as written

    def artifacts(self) -> list[ArtifactSpec]:
        """Distinct artifacts in the order of their first target, each with the targets it serves."""
        groups: dict[ArtifactSpec, list[str]] = {}
        for target, s in self.targets.items():
            spec = ArtifactSpec(s["format"], s["quant"], s["options"])
            groups.setdefault(spec, []).append(target)
        return [ArtifactSpec(a.format, a.quant, a.options, tuple(ts)) for a, ts in groups.items()]

    def gate(self, target: str) -> tuple[Optional[float], Optional[float]]:
        """``(max_kld, min_top1)`` for ``target``: its own limits, else the recipe's."""
        s = self.targets[target]
        return s.get("max_kld", self.quality.max_kld), s.get("min_top1", self.quality.min_top1)

    @property
    def source_is_hub(self) -> bool:
        return self.source.startswith("hf://")


def load_recipe(path: PathLike) -> Recipe:
    """Read and check ``path`` (TOML). Raises :class:`RecipeError` naming the file and key.

    Example:
        >>> recipe = load_recipe("examples/slmpkg.toml")   # doctest: +SKIP
        >>> recipe.name, [a.id for a in recipe.artifacts()]   # doctest: +SKIP
        ('tiny-llama', ['gguf-Q4_K_M', 'gguf-Q4_0', 'onnx-Q4_0', 'safetensors-BF16'])
    """
    p = Path(path)
    if p.is_dir():
        p = p / "slmpkg.toml"
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        document = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as e:  # RecursionError: arrays/tables nested too deep
        raise RecipeError(f"{p}: not valid TOML ({e})") from None
    return parse_recipe(document, p)


def parse_recipe(document: Mapping[str, Any], path: Optional[PathLike] = None) -> Recipe:
    """Check a recipe given as a dict (what TOML parses to); relative paths are taken from ``path``'s folder."""
    from .presets import PRESETS
    from .registry import parse_ref
    from .targets import TARGETS, TARGETS_BY_NAME

    where = str(path) if path is not None else "recipe"
    base = Path(path).resolve().parent if path is not None else Path.cwd()

    def bad(key: str, problem: str) -> RecipeError:
        return RecipeError(f"{where}: {key}: {problem}")

    def table(value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad(key, "must be a table")
        return value

    def unknown(keys: set[str], allowed: set[str], prefix: str) -> None:
        extra = sorted(set(keys) - allowed)
        if extra:
            raise bad(f"{prefix}{extra[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def string(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise bad(key, "must be a non-empty string")
        return value

    def local_path(value: Any, key: str) -> Path:
        if "\x00" in string(value, key):
            raise bad(key, "a path cannot hold a NUL character")
        return (base / os.path.expanduser(value)).resolve()

    unknown(set(document), _TOP_KEYS, "")
    for key in ("name", "version", "source"):
        if key not in document:
            raise bad(key, "missing (a recipe needs name, version and source)")
    name, version = string(document["name"], "name"), string(document["version"], "version")
    try:
        parse_ref(f"{name}:{version}")
    except SlmpkgError as e:
        raise bad("name/version", str(e)) from None
    source = string(document["source"], "source")
    if not source.startswith("hf://"):
        if "://" in source:
            raise bad("source", f"{source!r}: a local path or hf://org/repo[@revision]")
        source = str(local_path(source, "source"))

    chosen = document.get("targets")
    if chosen is None:
        chosen = [t.name for t in TARGETS]
    if not isinstance(chosen, list) or not chosen or not all(isinstance(t, str) for t in chosen):
        raise bad("targets", "must be a non-empty list of target names")
    for t in chosen:
        if t not in TARGETS_BY_NAME:
            raise bad("targets", f"unknown target {t!r} (see `slmpkg targets`)")
    if len(set(chosen)) != len(chosen):
        raise bad("targets", "lists a target twice")

    defaults = table(document.get("defaults"), "defaults")
    unknown(set(defaults), _TARGET_KEYS, "defaults.")
    overrides = table(document.get("target"), "target")
    for t in overrides:
        if t not in chosen:
            raise bad(f"target.{t}", "sets options for a target the recipe does not build (add it to targets)")

    targets: dict[str, dict[str, Any]] = {}
    for t in chosen:
        own = table(overrides.get(t), f"target.{t}")
        unknown(set(own), _TARGET_KEYS, f"target.{t}.")
        merged = {**defaults, **own}

        def key_of(key: str) -> str:
            return f"target.{t}.{key}" if key in own else f"defaults.{key}"

        entry = TARGETS_BY_NAME[t]
        fmt = string(merged.get("format", entry.format), key_of("format")).lower()
        if fmt not in FORMATS:
            raise bad(key_of("format"), f"{fmt!r} is not one of {', '.join(FORMATS)}")
        # A default quantization applies to the targets whose format it fits; a target's own must fit.
        quant = None
        for value, key_where in ((own.get("quant"), f"target.{t}.quant"), (defaults.get("quant"), "defaults.quant")):
            if value is None:
                continue
            quant = _quant_for(fmt, string(value, key_where))
            if quant is None and key_where.startswith("target."):
                choices = {"gguf": ", ".join(PRESETS), "onnx": ", ".join((*ONNX_QUANTS, "a GGUF preset")),
                           "safetensors": ", ".join(FLOAT_DTYPES)}[fmt]
                raise bad(key_where, f"{value!r} is not a {fmt} quantization ({choices})")
            if quant is not None:
                break
        if quant is None:
            quant = _quant_for(fmt, entry.quantization) if fmt == entry.format else None
            quant = quant or {"gguf": "Q4_K_M", "onnx": "int4", "safetensors": "BF16"}[fmt]

        options: dict[str, Any] = {}
        for key, value in merged.items():
            if key in ("format", "quant") or key in _GATE_KEYS:
                continue
            applies = fmt == "gguf" if key in _GGUF_KEYS else fmt == "onnx"
            if fmt == "onnx" and quant not in ONNX_QUANTS and key in ("block_size", "asymmetric"):
                applies = False  # the GGUF's blocks are carried as they are
            if not applies:
                if key in own:
                    raise bad(key_of(key), f"does not apply to {fmt} {quant} artifacts")
                continue  # a default for other formats
            options[key] = _option(key, value, local_path, bad, key_of(key))
        settings: dict[str, Any] = {"format": fmt, "quant": quant, "options": tuple(sorted(options.items()))}
        for key in _GATE_KEYS:
            if key in merged:
                settings[key] = _fraction_or_float(merged[key], bad, key_of(key), key)
        targets[t] = settings

    q = table(document.get("quality"), "quality")
    unknown(set(q), _QUALITY_KEYS, "quality.")
    quality = Quality(
        max_kld=_fraction_or_float(q["max_kld"], bad, "quality.max_kld", "max_kld") if "max_kld" in q else None,
        min_top1=_fraction_or_float(q["min_top1"], bad, "quality.min_top1", "min_top1") if "min_top1" in q else None,
        text=local_path(q["text"], "quality.text") if "text" in q else None,
        context=_positive_int(q.get("context", 256), bad, "quality.context"),
        chunks=_positive_int(q.get("chunks", 4), bad, "quality.chunks"),
        runtime=_bool(q["runtime"], bad, "quality.runtime") if "runtime" in q else None,
    )
    if quality.runtime is False and (quality.gated or any(_GATE_KEYS & set(s) for s in targets.values())):
        raise bad("quality.runtime", "is false, but max_kld/min_top1 need the runtimes")

    pub = table(document.get("publish"), "publish")
    unknown(set(pub), _PUBLISH_KEYS, "publish.")
    tags = pub.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
        raise bad("publish.tags", "must be a list of strings")
    for tag in tags:
        try:
            parse_ref(f"{name}:{tag}")
        except SlmpkgError as e:
            raise bad("publish.tags", str(e)) from None
        if tag == version:
            raise bad("publish.tags", f"{tag!r} is the version itself")
    registry = pub.get("registry")
    if registry is not None:
        registry = string(registry, "publish.registry")
        if "://" not in registry:
            registry = str(local_path(registry, "publish.registry"))
    expires = pub.get("expires_days")
    if expires is not None and (not isinstance(expires, (int, float)) or isinstance(expires, bool)
                                or not 0 < expires <= MAX_EXPIRES_DAYS):
        raise bad("publish.expires_days", f"must be a positive number of days, at most {MAX_EXPIRES_DAYS}")
    publish = Publish(
        registry=registry,
        key=local_path(pub["key"], "publish.key") if "key" in pub else None,
        tags=tuple(tags),
        endpoint_url=string(pub["endpoint_url"], "publish.endpoint_url") if "endpoint_url" in pub else None,
        expires_days=expires,
    )
    return Recipe(name, version, source, targets, quality, publish, Path(path).resolve() if path else None,
                  dict(document))


def _quant_for(fmt: str, value: str) -> Optional[str]:
    """``value`` spelled canonically if it is a quantization of ``fmt``, else None."""
    from .presets import get_preset

    if fmt == "safetensors":
        return value.upper() if value.upper() in FLOAT_DTYPES else None
    if fmt == "onnx" and value.lower() in ONNX_QUANTS:
        return value.lower()
    try:
        return get_preset(value).name
    except SlmpkgError:
        return None


def _option(key: str, value: Any, local_path: Any, bad: Any, where: str) -> Any:
    from .presets import parse_ggml_type, parse_tensor_type_override

    try:
        if key == "imatrix":
            p = local_path(value, where)
            return p
        if key in ("pure", "leave_output_tensor", "asymmetric", "exact_mins"):
            return _bool(value, bad, where)
        if key in ("output_tensor_type", "token_embedding_type"):
            return parse_ggml_type(value if isinstance(value, str) else "", key.replace("_", " ")).name
        if key == "tensor_types":
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise bad(where, 'must be a list of "REGEX=TYPE" strings')
            for x in value:
                parse_tensor_type_override(x)
            return tuple(value)
        if key == "block_size":
            n = _positive_int(value, bad, where)
            if n < 16 or n > 256 or n & (n - 1):
                raise bad(where, f"{n} is not a power of two from 16 to 256")
            return n
        if key == "accuracy_level":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 4:
                raise bad(where, "must be an integer from 0 to 4")
            return value
        if key == "dtype":
            v = str(value).lower()
            if v not in ("f32", "f16"):
                raise bad(where, "ONNX activations are f32 or f16")
            return v
    except RecipeError:
        raise
    except SlmpkgError as e:
        raise bad(where, str(e)) from None
    raise AssertionError(key)


def _bool(value: Any, bad: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise bad(where, "must be true or false")
    return value


def _positive_int(value: Any, bad: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad(where, "must be a positive integer")
    return value


def _fraction_or_float(value: Any, bad: Any, where: str, key: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
        raise bad(where, "must be a non-negative number")
    if key == "min_top1" and value > 1:
        raise bad(where, f"{value} is a fraction from 0 to 1 (0.9 means 90% of positions)")
    return float(value)
