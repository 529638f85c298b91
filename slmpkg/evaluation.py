"""How much an artifact differs from its source: per-tensor error, and what its runtime computes.

Two measures, both against a float reference (the source checkpoint):

1. **Tensor error** (numpy only): every weight of the artifact, dequantized, against the source's,
   as ``||W_q - W||₂ / ||W||₂``, per tensor and per layer. It needs no runtime and catches a wrong
   type or a broken mapping, but not how much the model's behaviour moves.
2. **Runtime statistics**, as ``llama-perplexity --kl-divergence`` reports them: the artifact runs in the
   runtime its users run (GGUF in llama.cpp through llama-cpp-python, ONNX in onnxruntime, safetensors
   in transformers) and the reference in its own; both see the same token ids. The text is cut into
   chunks of ``context`` tokens, each starting with BOS when the model adds one, and, as llama.cpp does,
   the second half of each chunk is scored (the first half is context). Per scored position: the
   KL divergence ``Σ p_ref·(log p_ref − log p_q)``, whether the most likely token is the same, and the
   log-likelihood of the actual next token for both models (perplexity). Reported: mean KLD with its
   standard error, median, 90/95/99/99.9th percentiles and maximum, the same-top-1 rate, and both
   perplexities. Everything is computed in float64 from the runtimes' float32 logits (llama-perplexity
   stores the base log-probabilities in 16 bits, so its figures can differ in the last digits).

The runtimes are optional (``pip install 'slmpkg[eval]'``): without them only the tensor error is
reported, unless ``runtime=True`` asks for them, which then fails with one line saying what is missing.

Example:
    >>> report = evaluate("out/tiny-Q4_K_M.gguf", reference="tiny-llama/")      # doctest: +SKIP
    >>> report.runtime.mean_kld, report.runtime.same_top1                        # doctest: +SKIP
    (0.0123, 0.961)
    >>> write_report([report], "report/")                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np

from .errors import SlmpkgError

__all__ = [
    "EvalError", "TensorError", "RuntimeStats", "QualityReport", "builtin_text", "evaluate", "evaluate_many",
    "tensor_errors", "kld_statistics", "write_report", "open_runtime", "detect_format",
]

PathLike = Union[str, "os.PathLike[str]"]


class EvalError(SlmpkgError):
    """An artifact or reference that cannot be evaluated (missing runtime, no shared tokens, bad text)."""


def builtin_text() -> str:
    """The evaluation text used when none is given (public-domain prose, a technical paragraph, code)."""
    return resources.files("slmpkg").joinpath("data/eval.txt").read_text("utf-8")


# ---- what is being compared ---------------------------------------------------------------------


def detect_format(path: PathLike) -> str:
    """``gguf``, ``onnx`` or ``safetensors`` for a model file or directory."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        if p.suffix.lower() == ".onnx":
            return "onnx"
        if p.suffix.lower() == ".safetensors":
            return "safetensors"
    elif p.is_dir():
        if any(p.glob("*.onnx")) and not any(p.glob("*.safetensors")):
            return "onnx"
        if any(p.glob("*.safetensors")):
            return "safetensors"
        ggufs = list(p.glob("*.gguf"))
        if ggufs:
            return "gguf"
    elif not p.exists():
        raise EvalError(f"{p}: no such file or directory")
    raise EvalError(f"{p}: not a GGUF file, an ONNX model or a safetensors directory")


def _gguf_file(path: Path) -> Path:
    """A GGUF artifact given as its file or the directory holding it (the first split)."""
    if path.is_file():
        return path
    files = sorted(p for p in path.glob("*.gguf") if not re.search(r"-0000[2-9]-of-|-000[1-9]\d-of-", p.name))
    if len(files) != 1:
        raise EvalError(f"{path}: expected one GGUF model in the directory, found {len(files)}")
    return files[0]


def _canonical(path: Path):
    """The artifact as a canonical (GGUF-named) checkpoint, tensors lazy."""
    from . import architectures
    from .formats import gguf as gguf_format
    from .formats import onnx_import
    from .formats import safetensors as st_format

    fmt = detect_format(path)
    if fmt == "gguf":
        return gguf_format.read(_gguf_file(path))
    if fmt == "onnx":
        return onnx_import.read(path)
    return architectures.from_hf(st_format.read(path), name=path.name)


# ---- tensor error -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorError:
    name: str
    type: str
    shape: tuple[int, ...]
    bits_per_weight: float
    relative_error: float  # ||W_q - W|| / ||W||
    max_abs_error: float
    squared_error: float  # ||W_q - W||², to aggregate errors over several tensors
    squared_norm: float  # ||W||²


_SLAB_ELEMENTS = 1 << 22


def _sq_norms(artifact, reference) -> tuple[float, float, float]:
    """``(||a - r||², ||r||², max |a - r|)`` over matching row slabs of two lazy tensors."""
    from . import quant

    n_per_row = artifact.shape[-1]
    n_rows = artifact.n_elements // n_per_row
    a_row = quant.row_bytes(artifact.qtype, n_per_row)
    r_row = quant.row_bytes(reference.qtype, n_per_row)
    slab = max(1, _SLAB_ELEMENTS // n_per_row)
    diff = ref = 0.0
    worst = 0.0
    for start in range(0, n_rows, slab):
        stop = min(n_rows, start + slab)
        a = quant.dequantize(artifact.byte_range(start * a_row, (stop - start) * a_row), artifact.qtype,
                             (stop - start, n_per_row)).astype(np.float64)
        r = quant.dequantize(reference.byte_range(start * r_row, (stop - start) * r_row), reference.qtype,
                             (stop - start, n_per_row)).astype(np.float64)
        d = a - r
        diff += float(np.einsum("ij,ij->", d, d))
        ref += float(np.einsum("ij,ij->", r, r))
        worst = max(worst, float(np.abs(d).max()) if d.size else 0.0)
    return diff, ref, worst


def tensor_errors(artifact, reference) -> tuple[list[TensorError], list[str]]:
    """Per-tensor error of ``artifact`` against ``reference`` (canonical checkpoints); also the names
    of the artifact's tensors the reference lacks (or has in another shape), which are left out."""
    from . import quant

    ref = {t.name: t for t in reference.tensors}
    errors, unmatched = [], []
    for t in artifact.tensors:
        r = ref.get(t.name)
        if r is None or tuple(r.shape) != tuple(t.shape) or not t.shape:
            unmatched.append(t.name)
            continue
        diff, norm, worst = _sq_norms(t, r)
        rel = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
        bpw = 8 * quant.row_bytes(t.qtype, t.shape[-1]) / t.shape[-1]
        errors.append(TensorError(t.name, t.qtype.name, tuple(t.shape), bpw, rel, worst, diff, norm))
    return errors, unmatched


def _layer_of(name: str) -> Optional[int]:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ---- runtimes -----------------------------------------------------------------------------------


class Runtime(Protocol):
    """A model loaded in the program its users run it with."""

    name: str

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 ``[len(ids), n_vocab]``: the next-token logits after each prefix."""

    def close(self) -> None: ...


def _need(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EvalError(f"{what} needs {module}, which is not installed (pip install 'slmpkg[eval]')") from None


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class LlamaCppRuntime:
    """A GGUF in llama.cpp (llama-cpp-python), every position's logits kept."""

    name = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int):
        llama_cpp = _need("llama_cpp", f"{path}: running a GGUF")
        self.path = _gguf_file(path)
        try:
            self._llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                        logits_all=True, verbose=False, n_threads=_threads())
        except (ValueError, RuntimeError) as e:
            raise EvalError(f"{self.path}: llama.cpp cannot load it ({e})") from None

    @property
    def n_vocab(self) -> int:
        return self._llm.n_vocab()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self._llm.reset()
        self._llm.eval(list(ids))
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        self._llm.close()


class OnnxRuntime:
    """An ONNX decoder (onnxruntime-genai layout) in onnxruntime, prompt only (empty past)."""

    name = "onnxruntime"

    def __init__(self, path: Path):
        ort = _need("onnxruntime", f"{path}: running an ONNX model")
        model = path / "model.onnx" if path.is_dir() else path
        if not model.is_file():
            found = sorted(path.glob("*.onnx")) if path.is_dir() else []
            if len(found) != 1:
                raise EvalError(f"{path}: no model.onnx to run")
            model = found[0]
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads()
        try:
            self._sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise EvalError(f"{model}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self._past = {}
        for i in self._sess.get_inputs():
            if i.name.startswith("past_key_values."):
                _, kv_heads, _, head_dim = i.shape
                self._past[i.name] = np.zeros((1, kv_heads, 0, head_dim), dtypes[i.type])
        self._inputs = {i.name for i in self._sess.get_inputs()}

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        feeds = {"input_ids": np.array([ids], np.int64), **self._past}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones((1, len(ids)), np.int64)
        (out,) = self._sess.run(["logits"], feeds)
        return out[0].astype(np.float32)

    def close(self) -> None:
        self._sess = None


class TransformersRuntime:
    """A Hugging Face directory in transformers, computing in float32."""

    name = "transformers"

    def __init__(self, path: Path):
        self._torch = _need("torch", f"{path}: running a safetensors model")
        transformers = _need("transformers", f"{path}: running a safetensors model")
        import warnings

        transformers.utils.logging.disable_progress_bar()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self._model = transformers.AutoModelForCausalLM.from_pretrained(
                    path, dtype=self._torch.float32, attn_implementation="eager")
            except (OSError, ValueError, KeyError) as e:
                raise EvalError(f"{path}: transformers cannot load it ({str(e).splitlines()[0]})") from None
        self._model.eval()
        self._torch.set_num_threads(_threads())

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        with self._torch.no_grad():
            out = self._model(self._torch.tensor([list(ids)]))
        return out.logits[0].float().numpy()

    def close(self) -> None:
        self._model = None


def open_runtime(path: PathLike, n_ctx: int) -> Runtime:
    """The runtime that runs ``path``'s format."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "gguf":
        return LlamaCppRuntime(p, n_ctx)
    if fmt == "onnx":
        return OnnxRuntime(p)
    return TransformersRuntime(p)


def _runtime_modules(fmt: str) -> tuple[str, ...]:
    return {"gguf": ("llama_cpp",), "onnx": ("onnxruntime",), "safetensors": ("torch", "transformers")}[fmt]


def runtime_available(fmt: str) -> Optional[str]:
    """None when ``fmt``'s runtime is installed, else what is missing."""
    import importlib.util

    missing = [m for m in _runtime_modules(fmt) if importlib.util.find_spec(m) is None]
    return ", ".join(missing) if missing else None


# ---- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...]  # the text, without special tokens
    bos: Optional[int]  # the token each chunk starts with, when the model adds one
    tokenizer: str  # where the ids came from


def tokenize(reference: Path, text: str) -> Tokens:
    """Token ids of ``text`` from the reference's own tokenizer (transformers for a HF directory or an
    ONNX model directory with tokenizer files; llama.cpp for a GGUF)."""
    fmt = detect_format(reference)
    if fmt == "gguf":
        llama_cpp = _need("llama_cpp", f"{reference}: tokenizing with a GGUF's vocabulary")
        llm = llama_cpp.Llama(model_path=str(_gguf_file(reference)), vocab_only=True, verbose=False)
        try:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            with_bos = llm.tokenize(b"a", add_bos=True, special=False)
            bos = with_bos[0] if len(with_bos) > len(llm.tokenize(b"a", add_bos=False, special=False)) else None
        finally:
            llm.close()
        return Tokens(tuple(ids), bos, "llama.cpp")
    transformers = _need("transformers", f"{reference}: tokenizing with its tokenizer files")
    folder = reference if reference.is_dir() else reference.parent
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise EvalError(f"{folder}: no tokenizer transformers can load ({str(e).splitlines()[0]})") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    probe = tok("a")["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id else None
    return Tokens(tuple(ids), bos, "transformers")


def chunks(tokens: Tokens, context: int, max_chunks: int) -> list[list[int]]:
    """Chunks of ``context`` tokens (fewer when the text is short), the first replaced by BOS when the
    model adds one, as llama-perplexity cuts its text."""
    n = min(context, len(tokens.ids))
    if n < 4:
        raise EvalError(f"the evaluation text has {len(tokens.ids)} tokens; at least 4 are needed")
    out = []
    for i in range(min(max_chunks, len(tokens.ids) // n)):
        chunk = list(tokens.ids[i * n:(i + 1) * n])
        if tokens.bos is not None:
            chunk[0] = tokens.bos
        out.append(chunk)
    return out


# ---- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeStats:
    runtime: str
    reference_runtime: str
    context: int
    chunks: int
    positions: int
    mean_kld: float
    mean_kld_stderr: float
    median_kld: float
    p90_kld: float
    p95_kld: float
    p99_kld: float
    p999_kld: float
    max_kld: float
    same_top1: float  # fraction of positions whose most likely token is the same
    perplexity: float
    reference_perplexity: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def position_statistics(logits: np.ndarray, reference: np.ndarray, next_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: KL divergence (reference ‖ artifact), same top-1, and both models' NLL of ``next_ids``."""
    if logits.shape != reference.shape:
        raise EvalError(f"logits of shape {logits.shape} cannot be compared with the reference's {reference.shape} "
                        "(different vocabularies?)")
    lq, lr = _log_softmax(logits), _log_softmax(reference)
    kld = (np.exp(lr) * (lr - lq)).sum(axis=-1)
    rows = np.arange(len(next_ids))
    return {
        "kld": kld,
        "same_top1": logits.argmax(axis=-1) == reference.argmax(axis=-1),
        "nll": -lq[rows, next_ids],
        "nll_reference": -lr[rows, next_ids],
    }


def kld_statistics(per_position: dict[str, np.ndarray]) -> dict[str, float]:
    """The summary llama-perplexity prints, from :func:`position_statistics` of every scored position."""
    kld = per_position["kld"]
    n = len(kld)
    q = np.quantile(kld, [0.5, 0.9, 0.95, 0.99, 0.999]) if n else [math.nan] * 5
    return {
        "positions": n,
        "mean_kld": float(kld.mean()),
        "mean_kld_stderr": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "median_kld": float(q[0]), "p90_kld": float(q[1]), "p95_kld": float(q[2]),
        "p99_kld": float(q[3]), "p999_kld": float(q[4]), "max_kld": float(kld.max()),
        "same_top1": float(per_position["same_top1"].mean()),
        "perplexity": float(math.exp(per_position["nll"].mean())),
        "reference_perplexity": float(math.exp(per_position["nll_reference"].mean())),
    }


def _scored(chunk_logits: np.ndarray, chunk: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The second half of a chunk: logits at positions first..n-2 and the tokens they predict."""
    n = len(chunk)
    first = n // 2
    return chunk_logits[first:n - 1], np.asarray(chunk[first + 1:n])


# ---- the report ---------------------------------------------------------------------------------


@dataclass
class QualityReport:
    artifact: str
    reference: str
    format: str
    file_type: Optional[str]
    bits_per_weight: float
    size_bytes: int
    tensors: list[TensorError]
    unmatched: list[str]
    runtime: Optional[RuntimeStats] = None
    runtime_skipped: Optional[str] = None  # why there are no runtime statistics
    label: Optional[str] = None  # how reports name it (a build's artifact id)
    targets: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((t.relative_error for t in self.tensors), default=0.0)

    def layer_errors(self) -> dict[int, float]:
        """Relative error of each layer's weights together (``sqrt(Σ||ΔW||² / Σ||W||²)``), by layer index."""
        acc: dict[int, list[float]] = {}
        for t in self.tensors:
            i = _layer_of(t.name)
            if i is not None:
                sums = acc.setdefault(i, [0.0, 0.0])
                sums[0] += t.squared_error
                sums[1] += t.squared_norm
        return {i: math.sqrt(e / n) if n else 0.0 for i, (e, n) in sorted(acc.items())}

    def summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {"artifact": self.label or self.artifact, "format": self.format, "file_type": self.file_type,
                             "bits_per_weight": round(self.bits_per_weight, 4),
                             "max_tensor_relative_error": self.max_relative_error}
        if self.runtime is not None:
            s.update(mean_kld=self.runtime.mean_kld, p99_kld=self.runtime.p99_kld, same_top1=self.runtime.same_top1,
                     perplexity=self.runtime.perplexity, reference_perplexity=self.runtime.reference_perplexity)
        return s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QualityReport":
        """The report :meth:`to_dict` wrote (a build keeps them to skip measuring again)."""
        fields = {k: d[k] for k in ("artifact", "reference", "format", "file_type", "bits_per_weight", "size_bytes",
                                    "unmatched", "runtime_skipped", "label", "targets")}
        tensors = [TensorError(**dict(t, shape=tuple(t["shape"]))) for t in d["tensors"]]
        runtime = RuntimeStats(**d["runtime"]) if d.get("runtime") else None
        return cls(**fields, tensors=tensors, runtime=runtime)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = [dict(asdict(t), shape=list(t.shape)) for t in self.tensors]
        d["layers"] = {str(k): v for k, v in self.layer_errors().items()}
        d["summary"] = self.summary()
        return d


def _file_type(ckpt) -> Optional[str]:
    from .presets import PRESETS

    ftype = ckpt.get("general.file_type")
    if ftype is None:
        return None
    return next((p.name for p in PRESETS.values() if p.ftype == ftype), str(ftype))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    skip = {"model.sig", "provenance.sigstore.json"}
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in skip)


def evaluate(artifact: PathLike, reference: PathLike, **options: Any) -> QualityReport:
    """Measure one artifact against ``reference``; see :func:`evaluate_many` for the options."""
    return evaluate_many([artifact], reference, **options)[0]


def evaluate_many(
    artifacts: Sequence[PathLike],
    reference: PathLike,
    *,
    text: Optional[str] = None,
    context: int = 256,
    max_chunks: int = 4,
    runtime: Optional[bool] = None,
    labels: Optional[Sequence[Optional[str]]] = None,
) -> list[QualityReport]:
    """Measure each artifact against ``reference`` (a HF directory, GGUF or ONNX model: the float
    source). The reference's logits are computed once for all.

    ``runtime``: True requires the runtime statistics (an :class:`EvalError` names what is missing),
    False skips them, None runs them when the runtimes are installed.
    """
    ref_path = Path(reference)
    ref_ckpt = _canonical(ref_path)
    n_params = None
    reports = []
    for i, a in enumerate(artifacts):
        path = Path(a)
        ckpt = _canonical(path)
        errors, unmatched = tensor_errors(ckpt, ref_ckpt)
        n_params = sum(t.n_elements for t in ckpt.tensors)
        size = _size(path)
        reports.append(QualityReport(str(path), str(ref_path), detect_format(path), _file_type(ckpt),
                                     8 * size / max(n_params, 1), size, errors, unmatched,
                                     label=labels[i] if labels else None))
    if runtime is False:
        for r in reports:
            r.runtime_skipped = "not asked for"
        return reports

    formats = {detect_format(ref_path)} | {r.format for r in reports}
    missing = {f: runtime_available(f) for f in formats}
    missing = {f: m for f, m in missing.items() if m}
    if missing:
        what = "; ".join(f"{f} needs {m}" for f, m in sorted(missing.items()))
        if runtime:
            raise EvalError(f"runtime statistics cannot be computed: {what} (pip install 'slmpkg[eval]')")
        for r in reports:
            r.runtime_skipped = f"runtime not installed ({what})"
        return reports

    tokens = tokenize(ref_path, text if text is not None else builtin_text())
    pieces = chunks(tokens, context, max_chunks)
    n_ctx = len(pieces[0])
    ref_rt = open_runtime(ref_path, n_ctx)
    try:
        ref_logits = [ref_rt.logits(c) for c in pieces]
    finally:
        ref_rt.close()
    for r in reports:
        rt = open_runtime(Path(r.artifact), n_ctx)
        try:
            per: dict[str, list[np.ndarray]] = {}
            for chunk, base in zip(pieces, ref_logits):
                got = rt.logits(chunk)
                q, nxt = _scored(got, chunk)
                b, _ = _scored(base, chunk)
                for k, v in position_statistics(q, b, nxt).items():
                    per.setdefault(k, []).append(v)
        finally:
            rt.close()
        stats = kld_statistics({k: np.concatenate(v) for k, v in per.items()})
        r.runtime = RuntimeStats(runtime=rt.name, reference_runtime=ref_rt.name, context=n_ctx, chunks=len(pieces),
                                 **stats)
    return reports


# ---- rendering ----------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return "–" if v is None else str(v)


def _markdown(reports: Sequence[QualityReport], title: str, gate: Optional[dict[str, Any]] = None) -> str:
    lines = [f"# {title}", ""]
    if reports:
        lines.append(f"Reference: `{reports[0].reference}`")
        rt = next((r.runtime for r in reports if r.runtime), None)
        if rt:
            lines.append(f"Runtime statistics: {rt.chunks} chunk(s) of {rt.context} tokens, {rt.positions} scored "
                         f"positions; reference run in {rt.reference_runtime}.")
        lines.append("")
    lines += ["| artifact | targets | format | bpw | max tensor rel. error | mean KLD | p99 KLD | same top-1 | PPL | PPL (ref) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        rt = r.runtime
        cells = [r.label or Path(r.artifact).name, ", ".join(r.targets) or "–", r.file_type or r.format,
                 f"{r.bits_per_weight:.2f}", _fmt(r.max_relative_error)]
        if rt:
            cells += [_fmt(rt.mean_kld), _fmt(rt.p99_kld), f"{100 * rt.same_top1:.1f}%", _fmt(rt.perplexity, 3),
                      _fmt(rt.reference_perplexity, 3)]
        else:
            cells += ["–"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [r for r in reports if r.runtime_skipped]
    if skipped:
        lines += ["", f"No runtime statistics: {skipped[0].runtime_skipped}."]
    if gate:
        lines += ["", "## Gate", ""]
        for row in gate.get("results", []):
            verdict = "pass" if row["passed"] else "FAIL"
            lines.append(f"- {row['target']} ({row['artifact']}): {verdict} — {row['detail']}")
    for r in reports:
        lines += ["", f"## {r.label or Path(r.artifact).name}", "",
                  "| tensor | type | bpw | relative error |", "|---|---|---|---|"]
        for t in sorted(r.tensors, key=lambda t: -t.relative_error)[:12]:
            lines.append(f"| {t.name} | {t.type} | {t.bits_per_weight:.2f} | {_fmt(t.relative_error)} |")
        if len(r.tensors) > 12:
            lines.append(f"| … {len(r.tensors) - 12} more in quality.json | | | |")
        if r.unmatched:
            lines.append(f"\nNot in the reference (not compared): {', '.join(r.unmatched[:8])}")
    return "\n".join(lines) + "\n"


def _plots(reports: Sequence[QualityReport], out: Path) -> list[str]:
    """PNG plots (bpw vs mean KLD; error per layer) when matplotlib is installed; their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    with_rt = [r for r in reports if r.runtime]
    if with_rt:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for r in with_rt:
            ax.scatter(r.bits_per_weight, max(r.runtime.mean_kld, 1e-9))
            ax.annotate(r.label or Path(r.artifact).name, (r.bits_per_weight, max(r.runtime.mean_kld, 1e-9)),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("mean KL divergence vs the source")
        ax.set_yscale("log")
        ax.set_title("size against quality")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "bpw_vs_kld.png")
        plt.close(fig)
        made.append("bpw_vs_kld.png")
    layered = [r for r in reports if r.layer_errors()]
    if layered:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for r in layered:
            layers = r.layer_errors()
            ax.plot(list(layers), list(layers.values()), marker="o", label=r.label or Path(r.artifact).name)
        ax.set_xlabel("layer")
        ax.set_ylabel("relative weight error")
        ax.set_title("weight error per layer")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "layer_error.png")
        plt.close(fig)
        made.append("layer_error.png")
    return made


def _html(markdown: str, images: Sequence[str], title: str) -> str:
    """A self-contained page: the report's tables and the plots, no scripts."""
    body = []
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<p>• {html.escape(line[2:])}</p>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    if in_table:
        body.append("</table>")
    for img in images:
        body.append(f'<p><img src="{html.escape(img)}" alt="{html.escape(img)}"></p>')
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(reports: Sequence[QualityReport], out_dir: PathLike, *, title: str = "Quality report",
                 gate: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """Write ``quality.json``, ``quality.md``, ``quality.html`` and the PNG plots into ``out_dir``;
    return their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = {"title": title, "reports": [r.to_dict() for r in reports]}
    if gate is not None:
        document["gate"] = gate
    paths = {"json": out / "quality.json", "markdown": out / "quality.md", "html": out / "quality.html"}
    text = json.dumps(document, indent=2, default=_json_default) + "\n"
    with contextlib.suppress(OSError):
        if paths["json"].read_text() == text and all(p.exists() for p in paths.values()):
            # the same report again (a build with nothing to do): leave the files as they are
            paths.update({p.stem: p for p in out.glob("*.png")})
            return paths
    paths["json"].write_text(text)
    md = _markdown(reports, title, gate)
    paths["markdown"].write_text(md)
    images = _plots(reports, out)
    paths["html"].write_text(_html(md, images, title))
    for img in images:
        paths[img.removesuffix(".png")] = out / img
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def report_digest(report: QualityReport) -> str:
    """sha256 of the report's canonical JSON (how provenance names it)."""
    data = json.dumps(report.to_dict(), sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(data).hexdigest()
