"""File-level jobs: reader → transforms → writer, with progress and a result to report.

Example:
    >>> from slmpkg.pipeline import quantize_file
    >>> from slmpkg.presets import QuantOptions
    >>> result = quantize_file("tiny-f16.gguf", "tiny-Q4_K_M.gguf", QuantOptions("Q4_K_M"))  # doctest: +SKIP
    >>> result.output_bytes < result.input_bytes                                              # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ._progress import ProgressBar
from .errors import FormatError, UsageError
from .imatrix import ImportanceMatrix
from .presets import QuantOptions
from .transforms import TensorChange, quantize_checkpoint

__all__ = ["QuantizeResult", "quantize_file", "ConvertResult", "size_label", "convert"]

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .formats.onnx import LinearWeights
    from .formats.onnx_nbits import Carry

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class QuantizeResult:
    input: Path
    output: Path
    preset: str
    input_bytes: int
    output_bytes: int
    seconds: float
    tensors: list[TensorChange] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "preset": self.preset,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 3),
            "tensors": [
                {"name": c.name, "shape": list(c.shape), "from": c.source_type.name,
                 "to": c.target_type.name, "imatrix": c.imatrix}
                for c in self.tensors
            ],
        }


def quantize_file(
    src: PathLike,
    dst: PathLike,
    options: QuantOptions,
    imatrix: Optional[PathLike] = None,
    threads: Optional[int] = None,
    progress: Optional[bool] = None,
) -> QuantizeResult:
    """Quantize a GGUF file with a llama.cpp preset; the output matches ``llama-quantize`` byte for byte.

    ``progress``: None shows a bar only on a terminal. Nothing is written at ``dst`` on failure.
    """
    from .formats import gguf as gguf_format

    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise UsageError(f"{dst}: output would overwrite the input")
    start = time.monotonic()
    ckpt = gguf_format.read(src)
    matrix = ImportanceMatrix.load(imatrix) if imatrix is not None else None
    out, changes = quantize_checkpoint(
        ckpt, options, matrix, threads, imatrix_label=str(imatrix) if imatrix is not None else None
    )
    total = sum(t.nbytes for t in ckpt.tensors)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with ProgressBar(total, f"quantize {options.preset.name}", enabled=progress) as bar:
        sizes = {t.name: t.nbytes for t in ckpt.tensors}
        gguf_format.write(dst, out, on_tensor=lambda t: bar.advance(sizes[t.name], t.name))
    return QuantizeResult(src, dst, options.preset.name, os.path.getsize(src), os.path.getsize(dst),
                          time.monotonic() - start, changes)


# ---- convert -----------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    input: Path
    output: Path
    format: str
    files: list[Path]
    output_bytes: int
    seconds: float
    # ONNX output: how each MatMulNBits weight was carried over (exact / within 1 ulp / requantized)
    carried: list["Carry"] = field(default_factory=list)

    def carried_summary(self) -> dict[str, int]:
        """How many weights were carried each way, e.g. ``{"exact": 14, "requantized": 1}``."""
        counts: dict[str, int] = {}
        for c in self.carried:
            counts[c.kind] = counts.get(c.kind, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        document = {
            "input": str(self.input),
            "output": str(self.output),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 3),
        }
        if self.carried:
            document["weights"] = [
                {"name": c.name, "source_type": c.source_type, "carried": c.kind, "max_abs_error": c.max_abs_error}
                for c in self.carried
            ]
        return document


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _is_onnx(path: Path) -> bool:
    """An ONNX source: a ``.onnx`` file, or a directory holding one (or an ``onnx/`` folder of them, the
    Hugging Face layout) and no safetensors weights."""
    if path.is_file():
        return path.suffix.lower() == ".onnx"
    if path.is_dir():
        return (any(path.glob("*.onnx")) or any(path.glob("onnx/*.onnx"))) and not any(path.glob("*.safetensors"))
    return False


def size_label(n_params: int) -> str:
    """llama.cpp's size label: ``1.1B``, ``135M``, ``8B``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= scale:
            value = f"{n_params / scale:.1f}".rstrip("0").rstrip(".")
            return f"{value}{suffix}"
    return str(n_params)


def _default_gguf_name(src: Path, ckpt: "Checkpoint", preset: str) -> str:
    name = ckpt.get("general.name") or (src.stem if src.is_file() else src.name)
    name = "-".join(str(name).split())
    n_params = sum(t.n_elements for t in ckpt.tensors)
    return f"{name}-{size_label(n_params)}-{preset}.gguf"


def convert(
    src: PathLike,
    dst: PathLike,
    to: Optional[str] = None,
    quant: Optional[Union[str, QuantOptions]] = None,
    imatrix: Optional[PathLike] = None,
    dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = 5 * 10**9,
    split_max_size: Optional[int] = None,
    threads: Optional[int] = None,
    progress: Optional[bool] = None,
    linear_weights: Optional["LinearWeights"] = None,
    mmproj: Optional[PathLike] = None,
) -> ConvertResult:
    """Convert between a Hugging Face directory and GGUF, streaming one tensor at a time; an ONNX decoder
    (a model directory or ``.onnx`` file: slmpkg's, onnxruntime-genai's or optimum's) converts to either.

    ``to`` is ``"gguf"`` or ``"safetensors"``; by default it follows ``dst`` (``*.gguf`` → GGUF, else a
    Hugging Face directory). HF or ONNX → GGUF takes any preset of :mod:`slmpkg.presets` (default: keep
    the source's float type); GGUF → HF dequantizes to ``dtype`` (``bf16`` default, ``f16``, ``f32``);
    ONNX → HF keeps the source's float type unless ``dtype`` says otherwise; HF → HF casts the float
    tensors to ``dtype`` (default: as stored) and keeps every other file, config.json's dtype updated.
    When ``dst`` is an existing directory and the target is GGUF, the file inside it is named as
    llama.cpp names its files (``Name-Size-PRESET.gguf``); ``split_max_size`` splits GGUF output into
    ``NAME-00001-of-0000N.gguf`` files of at most that many bytes of tensor data. ``mmproj``: for a
    multimodal HF checkpoint converted to GGUF, also write its vision tower as llama.cpp's projector
    GGUF there (:mod:`slmpkg.mmproj`).
    """
    from . import architectures
    from .formats import gguf as gguf_format
    from .formats import onnx_import
    from .formats import safetensors as st_format
    from .quant import QuantType

    src, dst = Path(src), Path(dst)
    start = time.monotonic()
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory")
    source_is_gguf = _is_gguf(src)
    source_is_onnx = not source_is_gguf and _is_onnx(src)
    if to is None:
        # a GGUF or ONNX source goes to a directory unless the output is named *.gguf; a HF directory goes to GGUF
        target = "safetensors" if (source_is_gguf or source_is_onnx) and dst.suffix.lower() != ".gguf" else "gguf"
    else:
        target = to.lower()
    if target not in ("gguf", "safetensors", "onnx"):
        raise UsageError(f"unknown output format {to!r} (gguf, safetensors, onnx)")
    if target == "onnx" and source_is_onnx:
        raise UsageError(f"{src}: already ONNX; convert it to GGUF or safetensors")
    if target == "onnx":
        return _convert_to_onnx(src, dst, source_is_gguf, quant, dtype, linear_weights, progress, start)

    if target == "gguf":
        if source_is_gguf:
            raise UsageError(f"{src}: already GGUF; use `slmpkg quantize` to change its types")
        if source_is_onnx:
            canonical = _naming(src, lambda: onnx_import.read(src))
        elif mmproj is not None:
            from . import mmproj as mmproj_format

            hf = st_format.read(src)
            vision = _naming(src, lambda: mmproj_format.from_hf(hf, name=src.name))
            with warnings.catch_warnings():  # the vision tower is not left out: it goes to the mmproj file
                warnings.filterwarnings("ignore", message=".*vision tower.*")
                canonical = _naming(src, lambda: architectures.from_hf(hf, name=src.name))
        else:
            canonical = _naming(src, lambda: architectures.from_hf(st_format.read(src), name=src.name))
        if mmproj is not None and source_is_onnx:
            raise UsageError("--mmproj takes a multimodal Hugging Face checkpoint")
        if isinstance(quant, QuantOptions):
            options = quant
        elif quant is None and source_is_onnx:
            options = _keep_types(canonical)
        else:
            options = QuantOptions(quant or _auto_preset(canonical))
        matrix = ImportanceMatrix.load(imatrix) if imatrix is not None else None
        out, _ = quantize_checkpoint(canonical, options, matrix, threads,
                                     imatrix_label=str(imatrix) if imatrix is not None else None)
        if dst.is_dir():
            dst = dst / _default_gguf_name(src, canonical, options.preset.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        total = sum(t.nbytes for t in out.tensors)
        with ProgressBar(total, f"convert → {dst.name}", enabled=progress) as bar:
            files = gguf_format.write(dst, out, on_tensor=lambda t: bar.advance(t.nbytes, t.name),
                                      split_max_size=split_max_size)
        if mmproj is not None:
            try:
                files.append(gguf_format.write(Path(mmproj), vision)[0])
            except BaseException:
                for f in files:  # both files or neither
                    f.unlink(missing_ok=True)
                raise
        return ConvertResult(src, files[0], "gguf", files, sum(f.stat().st_size for f in files),
                             time.monotonic() - start)

    if quant is not None or imatrix is not None:
        raise UsageError("--quant and --imatrix apply to GGUF output; safetensors output takes --dtype")
    if not source_is_gguf and not source_is_onnx:
        hf = _recast_hf(st_format.read(src), dtype, src)
        total = sum(t.nbytes for t in hf.tensors)
        with ProgressBar(total, f"convert → {dst.name}", enabled=progress) as bar:
            files = st_format.write(dst, hf, max_shard_size=max_shard_size, on_tensor=lambda t: bar.advance(t.nbytes, t.name))
        return ConvertResult(src, dst, "safetensors", files, sum(f.stat().st_size for f in files), time.monotonic() - start)
    if source_is_onnx:
        source = _naming(src, lambda: onnx_import.read(src))
        # an ONNX source keeps its float type by default (its weights are usually f32 or f16, not bf16)
        dtype = dtype or _auto_preset(source).lower()
    else:
        source = _naming(src, lambda: gguf_format.read(src))
    float_type = {"bf16": QuantType.BF16, "f16": QuantType.F16, "f32": QuantType.F32}.get((dtype or "bf16").lower())
    if float_type is None:
        raise UsageError(f"unknown --dtype {dtype!r} (bf16, f16, f32)")
    hf = _naming(src, lambda: architectures.to_hf(source, float_type))
    total = sum(t.nbytes for t in hf.tensors)
    with ProgressBar(total, f"convert → {dst.name}", enabled=progress) as bar:
        files = st_format.write(dst, hf, max_shard_size=max_shard_size, on_tensor=lambda t: bar.advance(t.nbytes, t.name))
    size = sum(f.stat().st_size for f in files)
    return ConvertResult(src, dst, "safetensors", files, size, time.monotonic() - start)


def _recast_hf(hf: "Checkpoint", dtype: Optional[str], src: Path) -> "Checkpoint":
    """A Hugging Face checkpoint with its float tensors in ``dtype`` (default: as stored), as
    ``model.to(dtype).save_pretrained()`` would write it: config.json's dtype follows, every other
    file is kept as it is."""
    import json

    from .checkpoint import Checkpoint
    from .quant import QuantType

    if dtype is None:
        return hf
    names = {"bf16": ("BF16", "bfloat16"), "f16": ("F16", "float16"), "f32": ("F32", "float32")}
    if dtype.lower() not in names:
        raise UsageError(f"unknown --dtype {dtype!r} (bf16, f16, f32)")
    qname, torch_name = names[dtype.lower()]
    target = QuantType[qname]
    floats = (QuantType.F32, QuantType.F16, QuantType.BF16)
    tensors = [t.converted(target) if t.qtype in floats else t for t in hf.tensors]
    sidecar = dict(hf.sidecar)
    if "config.json" in sidecar:
        try:
            config = json.loads(sidecar["config.json"])
        except ValueError:
            raise FormatError(f"{src / 'config.json'}: not JSON") from None
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = torch_name
        sidecar["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return Checkpoint(dict(hf.metadata), tensors, sidecar)


# tokenizer files onnxruntime-genai loads from the model directory
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja")


def _convert_to_onnx(
    src: Path, dst: Path, source_is_gguf: bool, quant: Optional[Union[str, QuantOptions]], dtype: Optional[str],
    linear_weights: Optional["LinearWeights"], progress: Optional[bool], start: float,
) -> ConvertResult:
    """HF directory or GGUF → an onnxruntime(-genai) model directory.

    ``quant``: ``f32``/``f16`` float weights (a quantized GGUF is dequantized); ``int4``/``int8``
    MatMulNBits linears (float weights quantized block-wise; a GGUF's quantized blocks carried over);
    None: a quantized GGUF keeps its blocks (never rounded twice), float sources stay float.
    ``dtype`` (f32, f16) is the activation type of int4/int8 graphs; ``linear_weights`` the block
    options (its ``bits``/``carry_quantized`` are set from ``quant``).
    """
    from . import architectures
    from .formats import gguf as gguf_format
    from .formats import onnx as onnx_format
    from .formats import safetensors as st_format
    from .formats.onnx_nbits import REQUANTIZED
    from .tokenizer import hf_tokenizer_files

    choice = str(quant).lower() if quant is not None else None
    if choice not in (None, "f32", "f16", "int4", "int8"):
        raise UsageError(f"ONNX output takes --quant f32, f16, int4 or int8, not {quant!r}")
    if choice in ("f32", "f16"):
        if dtype is not None and dtype.lower() != choice:
            raise UsageError(f"--quant {choice} is already the float type; --dtype {dtype} contradicts it")
        precision, bits, carry = choice, None, False
    else:
        precision = (dtype or "f32").lower()
        if precision not in onnx_format.PRECISIONS:
            raise UsageError(f"ONNX activations are f32 or f16, not --dtype {dtype}")
        bits, carry = {"int4": 4, "int8": 8, None: None}[choice], True
    base = linear_weights or onnx_format.LinearWeights()
    options = dataclasses.replace(base, bits=bits, carry_quantized=carry)
    if source_is_gguf:
        canonical = _naming(src, lambda: gguf_format.read(src))
        tokenizer = hf_tokenizer_files(canonical.metadata)
    else:
        hf = st_format.read(src)
        canonical = _naming(src, lambda: architectures.from_hf(hf, name=src.name))
        tokenizer = {k: v for k, v in hf.sidecar.items() if k in _TOKENIZER_FILES}
    canonical.sidecar = tokenizer
    carried: list[Carry] = []
    total = sum(t.nbytes for t in canonical.tensors)
    with ProgressBar(total, f"convert → {dst.name}", enabled=progress) as bar:
        files = _naming(src, lambda: onnx_format.write(dst, canonical, precision,
                                                      on_tensor=lambda t: bar.advance(t.nbytes, t.name),
                                                      linear_weights=options, on_carry=carried.append))
    requantized = [c for c in carried if c.kind == REQUANTIZED and c.source_type not in ("F32", "F16", "BF16")]
    if requantized:
        worst = max(requantized, key=lambda c: c.max_abs_error)
        warnings.warn(f"{src}: {len(requantized)} {'/'.join(sorted({c.source_type for c in requantized}))} weights "
                      f"have no MatMulNBits form and were re-quantized (largest error {worst.max_abs_error:.3g} in "
                      f"{worst.name})", stacklevel=2)
    return ConvertResult(src, dst, "onnx", files, sum(f.stat().st_size for f in files), time.monotonic() - start,
                         carried)


def _naming(src: Path, step: "Callable[[], Checkpoint]") -> "Checkpoint":
    """Run a mapping step whose errors speak of files inside ``src``; make them name ``src`` too."""
    try:
        return step()
    except FormatError as e:
        if str(e).startswith(str(src)):
            raise
        raise FormatError(f"{src}: {e}") from None


def _auto_preset(ckpt: "Checkpoint") -> str:
    """Keep the source precision: BF16 or F16 if the weights are stored so, else F32."""
    from .quant import QuantType

    types = {t.qtype for t in ckpt.tensors if len(t.shape) >= 2}
    for t in (QuantType.BF16, QuantType.F16):
        if t in types:
            return t.name
    return "F32"


def _keep_types(ckpt: "Checkpoint") -> QuantOptions:
    """Options that write every tensor in the type it has (an int4 ONNX's Q4_0 blocks stay Q4_0, no
    second rounding); the preset, which names the file type, is the most common quantized type."""
    import re

    from .quant import QuantType

    counts: dict[QuantType, int] = {}
    for t in ckpt.tensors:
        if len(t.shape) >= 2 and t.qtype not in (QuantType.F32, QuantType.F16, QuantType.BF16):
            counts[t.qtype] = counts.get(t.qtype, 0) + t.n_elements
    if not counts:
        return QuantOptions(_auto_preset(ckpt))
    keep = tuple((f"^{re.escape(t.name)}$", t.qtype) for t in ckpt.tensors if len(t.shape) >= 2)
    return QuantOptions(max(counts, key=counts.__getitem__).name, pure=True, tensor_type_overrides=keep)
