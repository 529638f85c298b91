"""The ``slmpkg`` command line: a thin layer over the Python API.

Every command prints one machine-readable JSON document with ``--json``; errors print one line on
stderr (``slmpkg: error: FILE: problem``) and exit non-zero, without a traceback.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import click

from . import __version__
from ._progress import ProgressBar
from .errors import SlmpkgError, UsageError

__all__ = ["main", "handle_errors", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"slmpkg: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line and an exit code; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SlmpkgError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # the reader went away (`slmpkg inspect x | head`): nothing left to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}")

    return wrapper


def _emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="slmpkg")
def main() -> None:
    """Package small language models: convert, quantize, sign and publish them per hardware target."""
    warnings.showwarning = _show_warning


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Warnings are for the user, not the developer: one line, no source location."""
    click.echo(f"slmpkg: warning: {message}", err=True)


# ---- inspect ------------------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


@main.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def inspect_command(file: Path, as_json: bool) -> None:
    """Show a model file's architecture, metadata and tensors (name, shape, type, bits per weight)."""
    from .inspection import inspect_file

    summary = inspect_file(file)
    if as_json:
        _emit_json(summary.to_dict())
        return
    click.echo(f"file:          {summary.path}")
    click.echo(f"format:        {summary.format}")
    click.echo(f"architecture:  {summary.architecture or '(none)'}")
    click.echo(f"parameters:    {summary.n_parameters:,}")
    click.echo(f"size:          {_human_bytes(summary.file_size)} ({summary.bits_per_weight:.2f} bits per weight)")
    click.echo("\nmetadata:")
    for key, value in summary.metadata.items():
        if isinstance(value, dict) and "length" in value:
            shown = f"[{value['length']} × {value['item_type']}]"
        else:
            shown = repr(value) if isinstance(value, str) else str(value)
        click.echo(f"  {key:<48} {shown[:80]}")
    click.echo(f"\ntensors ({len(summary.tensors)}):")
    width = max((len(t.name) for t in summary.tensors), default=10)
    for t in summary.tensors:
        shape = "×".join(str(s) for s in t.shape)
        click.echo(f"  {t.name:<{width}}  {shape:<16} {t.type:<7} {t.bits_per_weight:6.2f} bpw  {_human_bytes(t.nbytes):>10}")


# ---- quantize -----------------------------------------------------------------------------------


def _preset_names() -> str:
    from .presets import PRESETS

    return ", ".join(PRESETS)


def _tensor_type_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The per-tensor options of llama.cpp's quantizer, for every command that writes a GGUF preset."""
    for option in reversed([
        click.option("--pure", is_flag=True, help="Every quantizable tensor at the preset's type (no k-quant mixture)."),
        click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                     help="Type for tensors whose name matches REGEX (repeatable; first match wins)."),
        click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight as it is."),
        click.option("--output-tensor-type", metavar="TYPE", help="Type for output.weight."),
        click.option("--token-embedding-type", metavar="TYPE", help="Type for token_embd.weight."),
    ]):
        fn = option(fn)
    return fn


def _tensor_type_choices(pure: bool, tensor_types: tuple[str, ...], leave_output_tensor: bool,
                         output_tensor_type: Optional[str], token_embedding_type: Optional[str]) -> dict[str, Any]:
    return dict(pure=pure, leave_output_tensor=leave_output_tensor, output_tensor_type=output_tensor_type,
                token_embedding_type=token_embedding_type, tensor_type_overrides=tensor_types)


@main.command("quantize")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path), help="Output GGUF file.")
@click.option("--quant", "preset", required=True, metavar="PRESET",
              help="llama.cpp preset: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L "
                   "Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K IQ4_NL IQ4_XS.")
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix (llama-imatrix GGUF or legacy .dat).")
@click.option("--allow-requantize", is_flag=True, help="Allow re-quantizing tensors that are already quantized.")
@_tensor_type_options
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads (default: every core).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document describing the result.")
@handle_errors
def quantize_command(
    src: Path, dst: Path, preset: str, imatrix: Optional[Path], allow_requantize: bool, pure: bool,
    tensor_types: tuple[str, ...], leave_output_tensor: bool, output_tensor_type: Optional[str],
    token_embedding_type: Optional[str], threads: Optional[int], quiet: bool, as_json: bool,
) -> None:
    """Quantize a GGUF file; the output equals llama.cpp's llama-quantize byte for byte."""
    from .pipeline import quantize_file
    from .presets import QuantOptions

    options = QuantOptions(preset, allow_requantize=allow_requantize, **_tensor_type_choices(
        pure, tensor_types, leave_output_tensor, output_tensor_type, token_embedding_type))
    result = quantize_file(src, dst, options, imatrix=imatrix, threads=threads, progress=False if quiet else None)
    if as_json:
        _emit_json(result.to_dict())
    elif not quiet:
        click.echo(
            f"{result.output}: {options.preset.name}, {result.input_bytes / 1e6:.1f} MB → "
            f"{result.output_bytes / 1e6:.1f} MB in {result.seconds:.1f} s"
        )


# ---- convert ------------------------------------------------------------------------------------


@main.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path),
              help="Output: a .gguf file, a directory for GGUF (named Name-Size-PRESET.gguf), or a HF directory.")
@click.option("--to", "to", type=click.Choice(["gguf", "safetensors", "onnx"]), help="Output format (default: from the output name).")
@click.option("--quant", "preset", metavar="PRESET",
              help="GGUF preset (F32 F16 BF16 Q8_0 ... Q4_K_M ...; default keeps the source's float type); "
                   "ONNX: f32, f16, int4 or int8 (default: float, or a quantized GGUF's blocks carried over).")
@click.option("--block-size", type=int, help="ONNX int4/int8: MatMulNBits block size, a power of two 16-256 (default 32).")
@click.option("--accuracy-level", type=click.IntRange(0, 4),
              help="ONNX int4/int8: MatMulNBits accuracy_level (default 0, float activations; 4 = int8 activations, faster on CPU).")
@click.option("--asymmetric", is_flag=True, help="ONNX int4/int8: quantize float weights with zero points.")
@click.option("--exact-mins", is_flag=True,
              help="ONNX from Q4_1/Q4_K/Q2_K: carry minimums as an exact separate term instead of float zero points (within 1 ulp).")
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix for GGUF presets.")
@click.option("--allow-requantize", is_flag=True,
              help="GGUF output from a quantized source (an int4 ONNX): allow re-quantizing its blocks to another type.")
@_tensor_type_options
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]),
              help="Float type of safetensors output (from GGUF: default bf16; from ONNX or HF: the source's float type).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--mmproj", type=click.Path(path_type=Path),
              help="Multimodal HF source to GGUF: also write the vision tower as llama.cpp's mmproj GGUF here.")
@click.option("--split-max-size", metavar="SIZE", help="Split GGUF output into NAME-0000i-of-0000N.gguf files of at most SIZE (e.g. 2G).")
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads (default: every core).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document describing the result.")
@handle_errors
def convert_command(
    src: Path, dst: Path, to: Optional[str], preset: Optional[str], block_size: Optional[int],
    accuracy_level: Optional[int], asymmetric: bool, exact_mins: bool, imatrix: Optional[Path],
    allow_requantize: bool, pure: bool, tensor_types: tuple[str, ...], leave_output_tensor: bool,
    output_tensor_type: Optional[str], token_embedding_type: Optional[str], dtype: Optional[str],
    max_shard_size: str, mmproj: Optional[Path], split_max_size: Optional[str], threads: Optional[int], quiet: bool,
    as_json: bool,
) -> None:
    """Convert a Hugging Face directory to GGUF (any preset, one pass) or ONNX, a GGUF to a HF directory or ONNX,
    or an ONNX decoder (a model directory or .onnx file: slmpkg's, onnxruntime-genai's or optimum's) to GGUF or a
    HF directory."""
    from .pipeline import convert
    from .sizes import parse_size

    linear_weights = None
    if block_size is not None or accuracy_level is not None or asymmetric or exact_mins:
        if to != "onnx":
            raise UsageError("--block-size, --accuracy-level, --asymmetric and --exact-mins apply to --to onnx")
        from .formats.onnx import LinearWeights

        linear_weights = LinearWeights(block_size=block_size or 32, accuracy_level=accuracy_level or 0,
                                       symmetric=not asymmetric, separate_min=exact_mins)
    quant: Any = preset
    choices = _tensor_type_choices(pure, tensor_types, leave_output_tensor, output_tensor_type, token_embedding_type)
    if allow_requantize or any(choices.values()):
        if preset is None or to in ("onnx", "safetensors"):
            raise UsageError("--allow-requantize and the per-tensor type options need --quant PRESET and GGUF output")
        from .presets import QuantOptions

        quant = QuantOptions(preset, allow_requantize=allow_requantize, **choices)
    result = convert(src, dst, to=to, quant=quant, imatrix=imatrix, dtype=dtype,
                     max_shard_size=parse_size(max_shard_size),
                     split_max_size=parse_size(split_max_size) if split_max_size else None,
                     threads=threads, progress=False if quiet else None, linear_weights=linear_weights,
                     mmproj=mmproj)
    if as_json:
        _emit_json(result.to_dict())
    elif not quiet:
        carried = ", ".join(f"{n} {kind}" for kind, n in result.carried_summary().items())
        click.echo(f"{result.output}: {result.format}, {result.output_bytes / 1e6:.1f} MB in {result.seconds:.1f} s"
                   + (f"; MatMulNBits weights: {carried}" if carried else ""))


# ---- keys and signatures ------------------------------------------------------------------------


@main.command("keygen")
@click.option("-o", "--output", "name", required=True, metavar="NAME",
              help="Writes NAME.pem (private, mode 0600) and NAME.pub.pem.")
@click.option("--overwrite", is_flag=True, help="Replace an existing key pair.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def keygen_command(name: str, overwrite: bool, as_json: bool) -> None:
    """Create an ECDSA P-256 signing key pair (the key type OpenSSF model signing verifies)."""
    from .signing import generate_keypair

    private, public = generate_keypair(name, overwrite=overwrite)
    if as_json:
        _emit_json({"private_key": str(private), "public_key": str(public)})
    else:
        click.echo(f"private key: {private}\npublic key:  {public}")


@main.command("sign")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(path_type=Path), help="Private key (PEM).")
@click.option("-o", "--signature", "signature", type=click.Path(path_type=Path),
              help="Signature file (default: DIR/model.sig, or FILE.sig beside a file).")
@click.option("--ignore", "ignore", multiple=True, type=click.Path(path_type=Path), help="Path to leave out (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def sign_command(path: Path, key: Path, signature: Optional[Path], ignore: tuple[Path, ...], as_json: bool) -> None:
    """Sign a model file or directory: an OpenSSF model-signing v1.0 bundle (`model_signing verify key` accepts it)."""
    from .signing import sign

    sig = sign(path, key, signature, ignore_paths=ignore)
    if as_json:  # `slmpkg verify --json` reports the digests without hashing twice here
        _emit_json({"path": str(path), "signature": str(sig)})
    else:
        click.echo(f"{path}: signed → {sig}")


@main.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--pub", "pub", required=True, type=click.Path(path_type=Path), help="Public key (PEM).")
@click.option("--sig", "signature", type=click.Path(path_type=Path),
              help="Signature file (default: DIR/model.sig, or FILE.sig beside a file).")
@click.option("--ignore", "ignore", multiple=True, type=click.Path(path_type=Path), help="Path left out when signing.")
@click.option("--provenance", "check_provenance", is_flag=True,
              help="Also check the build provenance (provenance.sigstore.json): signed by this key, naming these files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def verify_command(path: Path, pub: Path, signature: Optional[Path], ignore: tuple[Path, ...], check_provenance: bool,
                   as_json: bool) -> None:
    """Check a signature: every file's digest, no file added or missing, signed by this key. Exit 1 if not."""
    from .signing import KeyVerifier, verify

    verifier = KeyVerifier(pub)
    result = verify(path, verifier, signature, ignore_paths=ignore)
    prov = None
    if check_provenance:
        from .provenance import verify_provenance

        prov = verify_provenance(path, verifier)
    if as_json:
        document = {"path": str(path), "verified": True, "signature": str(result.signature_path),
                    "root_digest": result.root_digest, "files": [r.name for r in result.resources]}
        if prov is not None:
            document["provenance"] = prov.summary()
        _emit_json(document)
    else:
        click.echo(f"{path}: verified ({len(result.resources)} files, signed by {result.signer or pub})")
        if prov is not None:
            summary = prov.summary()
            artifact = summary["artifact"] or {}
            click.echo(f"provenance: {artifact.get('id', '?')} for {', '.join(summary['targets'] or [])}, built from "
                       f"{summary['source']} by {summary['builder']} (slmpkg {summary['slmpkg']}, {summary['finished']})")


# ---- hardware targets ---------------------------------------------------------------------------


@main.command("targets")
@click.option("--detect", is_flag=True, help="Probe this host and rank the targets it runs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def targets_command(detect: bool, as_json: bool) -> None:
    """List the hardware targets artifacts are published for; with --detect, which ones this host runs."""
    from .targets import TARGETS, compatible_targets, detect_host, targets_document

    host = detect_host() if detect else None
    if as_json:
        _emit_json(targets_document(host))
        return
    ranks = {t.name: i + 1 for i, t in enumerate(compatible_targets(host))} if host else {}
    if host:
        click.echo(f"host: {host.describe()}\n")
    for t in TARGETS:
        mark = f"#{ranks[t.name]}" if t.name in ranks else ("  " if not host else " -")
        click.echo(f"{mark:>3} {t.name:<20} {t.format:<12} {t.quantization:<8} {t.description}")


# ---- registry -----------------------------------------------------------------------------------

EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a command SIGTERM ended


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, `timeout`, a CI job cancelled): unwinds like Ctrl-C, so every
    cleanup runs (staging directories, temporary files); resumable transfers keep what they moved."""


def _stops_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a registry command with SIGTERM raised as :class:`_Terminated` in the main thread (unless
    SIGTERM is ignored, as for a command started with nohup-like wrappers), then exit 143."""
    import signal
    import threading

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
            return fn(*args, **kwargs)

        def terminate(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; let the cleanup finish
            raise _Terminated

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            return fn(*args, **kwargs)
        except _Terminated:
            _fail("terminated", EXIT_TERMINATED)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


_registry_option = click.option(
    "--registry", "registry", envvar="SLMPKG_REGISTRY", metavar="URL",
    help="A directory or file:// URL (default $SLMPKG_HOME/registry), or s3://bucket/prefix.",
)
_endpoint_option = click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", help="S3 endpoint (e.g. a local SeaweedFS/MinIO).")
_expires_option = click.option(
    "--expires-in", "expires_days", type=click.FloatRange(min=0, min_open=True), default=365.0, show_default=True,
    metavar="DAYS", help="The signed index/tag expires this many days from now (pulls refuse expired metadata).",
)


def _store(registry: Optional[str], endpoint_url: Optional[str], quiet: bool = False):
    from .registry import open_store

    url = str(registry or "")
    if quiet and url.startswith("hf://"):
        # huggingface_hub draws its own bars for uploads and downloads; -q and --json mean none at all
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    options = {"endpoint_url": endpoint_url} if endpoint_url and url.startswith("s3://") else {}
    return open_store(registry or None, **options)


@main.command("push")
@click.argument("ref", metavar="NAME:VERSION")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="Hardware target this artifact is made for (see `slmpkg targets`).")
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Private key that signs the index.")
@click.option("--tag", "tags", multiple=True, help="Also point NAME:TAG at this version (repeatable).")
@click.option("--force", is_flag=True, help="Replace this target's artifact if the version already has a different one.")
@_expires_option
@_registry_option
@_endpoint_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
@_stops_cleanly
def push_command(ref: str, artifact: Path, target: str, key: Path, tags: tuple[str, ...], force: bool,
                 expires_days: float, registry: Optional[str], endpoint_url: Optional[str], quiet: bool,
                 as_json: bool) -> None:
    """Publish a file or directory as NAME:VERSION for one hardware target, signed."""
    from .registry import push
    from .signing import KeySigner
    from .targets import get_target

    get_target(target)
    quant, bpw = _artifact_quant(artifact)
    files = [artifact] if artifact.is_file() else [p for p in artifact.rglob("*") if p.is_file()]
    with ProgressBar(sum(p.stat().st_size for p in files), "push", enabled=False if quiet or as_json else None) as bar:
        result = push(_store(registry, endpoint_url, quiet or as_json), ref, artifact, target, KeySigner(key),
                      quant=quant, bits_per_weight=bpw, tags=tags, force=force,
                      expires_in=datetime.timedelta(days=expires_days), progress=bar.advance)
    if as_json:
        _emit_json(dataclasses.asdict(result))
    elif not quiet:
        click.echo(f"{result.name}:{result.release} [{result.target}] → index v{result.index_version}, "
                   f"{result.uploaded_bytes / 1e6:.1f} MB uploaded, {result.existing_bytes / 1e6:.1f} MB already there")


def _artifact_quant(artifact: Path) -> tuple[Optional[str], Optional[float]]:
    """Type and bits per weight of a single GGUF artifact, for the manifest (None for anything else)."""
    ggufs = [artifact] if artifact.is_file() else sorted(artifact.glob("*.gguf"))
    if len(ggufs) != 1 or ggufs[0].suffix != ".gguf":
        return None, None
    from .inspection import inspect_file
    from .presets import PRESETS

    summary = inspect_file(ggufs[0])
    ftype = summary.metadata.get("general.file_type")
    name = next((p.name for p in PRESETS.values() if p.ftype == ftype), None)
    return name, round(summary.bits_per_weight, 3)


@main.command("pull")
@click.argument("ref", metavar="NAME:VERSION|NAME:TAG")
@click.option("--target", default="auto", show_default=True, help="A target name, or auto: the best one this host runs.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Directory to install into.")
@click.option("--pub", required=True, type=click.Path(path_type=Path), help="Public key the index must be signed with.")
@click.option("--max-memory", metavar="SIZE",
              help="Memory budget for --target auto (8GB = 8e9 bytes, 8GiB = 8 * 2**30; default: what this host has).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@_registry_option
@_endpoint_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
@_stops_cleanly
def pull_command(ref: str, target: str, out: Path, pub: Path, max_memory: Optional[str], overwrite: bool,
                 registry: Optional[str], endpoint_url: Optional[str], quiet: bool, as_json: bool) -> None:
    """Fetch the artifact made for this host (or --target), verify every signature and digest, install it."""
    from .registry import pull
    from .signing import KeyVerifier
    from .targets import get_target

    store = _store(registry, endpoint_url, quiet or as_json)
    verifier = KeyVerifier(pub)
    chosen: Any = target
    if target == "auto":
        from .sizes import parse_size
        from .targets import choose_artifact, detect_host

        # pull calls it with the artifact sizes of the very release it installs (the tag is read once)
        chosen = functools.partial(choose_artifact, detect_host(),
                                   max_memory=parse_size(max_memory) if max_memory else None)
    else:
        get_target(target)
    with ProgressBar(None, "pull", enabled=False if quiet or as_json else None) as bar:
        result = pull(store, ref, chosen, out, verifier, overwrite=overwrite, progress=bar.advance)
    if as_json:
        _emit_json(dataclasses.asdict(result))
    elif not quiet:
        click.echo(f"{result.name}:{result.release} [{result.target}] → {result.out_dir} "
                   f"({result.downloaded_bytes / 1e6:.1f} MB downloaded, {result.resumed_bytes / 1e6:.1f} MB resumed, "
                   f"{result.cached_bytes / 1e6:.1f} MB from cache)")


@main.command("ls")
@click.argument("ref", required=False, metavar="[NAME[:VERSION]]")
@_registry_option
@_endpoint_option
@handle_errors
@_stops_cleanly
def ls_command(ref: Optional[str], registry: Optional[str], endpoint_url: Optional[str]) -> None:
    """List names, a name's versions and tags, or one version's targets (always JSON)."""
    from .registry import ls

    _emit_json(ls(_store(registry, endpoint_url, quiet=True), ref))


@main.command("tag")
@click.argument("source", metavar="NAME:VERSION")
@click.argument("tag_ref", metavar="NAME:TAG")
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Private key that signs the tag.")
@_expires_option
@_registry_option
@_endpoint_option
@handle_errors
@_stops_cleanly
def tag_command(source: str, tag_ref: str, key: Path, expires_days: float, registry: Optional[str],
                endpoint_url: Optional[str]) -> None:
    """Point NAME:TAG at NAME:VERSION (a signed tag, moved by compare-and-swap)."""
    from .registry import parse_ref, tag
    from .signing import KeySigner

    name, release = parse_ref(source)
    if parse_ref(tag_ref)[0] != name:
        raise UsageError(f"{tag_ref}: a tag names the same model as {source}")
    version = tag(_store(registry, endpoint_url, quiet=True), tag_ref, release, KeySigner(key),
                  expires_in=datetime.timedelta(days=expires_days))
    click.echo(f"{tag_ref} → {source} (tag v{version})")


@main.command("refresh")
@click.argument("ref", metavar="NAME[:VERSION|:TAG]")
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Private key that signed the metadata.")
@_expires_option
@_registry_option
@_endpoint_option
@handle_errors
@_stops_cleanly
def refresh_command(ref: str, key: Path, expires_days: float, registry: Optional[str],
                    endpoint_url: Optional[str]) -> None:
    """Re-sign a version's index, a tag, or all of NAME's, with a new expiry (content unchanged; always JSON).

    Run it (e.g. weekly from a scheduled job) so releases that should stay installable never expire."""
    from .registry import refresh
    from .signing import KeySigner

    done = refresh(_store(registry, endpoint_url, quiet=True), ref, KeySigner(key),
                   expires_in=datetime.timedelta(days=expires_days))
    _emit_json([dataclasses.asdict(r) for r in done])


@main.command("gc")
@click.option("--grace-hours", default=24.0, show_default=True, help="Keep blobs written within this many hours.")
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@_registry_option
@_endpoint_option
@handle_errors
@_stops_cleanly
def gc_command(grace_hours: float, dry_run: bool, registry: Optional[str], endpoint_url: Optional[str]) -> None:
    """Delete blobs no index references (never one younger than the grace period)."""
    from .registry import gc

    result = gc(_store(registry, endpoint_url, quiet=True), grace=datetime.timedelta(hours=grace_hours),
                dry_run=dry_run)
    _emit_json(dataclasses.asdict(result))


# ---- build and eval -----------------------------------------------------------------------------


@main.command("build")
@click.argument("recipe", required=False, type=click.Path(path_type=Path), default=Path("slmpkg.toml"))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Build directory (default: slmpkg-build beside the recipe).")
@click.option("--plan", "show_plan", is_flag=True, help="Print the jobs and the commands they run; build nothing.")
@click.option("--only", metavar="JOB", help="Run one job (an artifact id or a target name) and what it needs.")
@click.option("--no-publish", is_flag=True, help="Build, measure and sign, but push nothing.")
@click.option("--no-eval", is_flag=True, help="Skip the quality report (and the gate).")
@click.option("--check", is_flag=True, help="Rebuild from scratch and compare digests with the published artifacts.")
@click.option("--key", type=click.Path(path_type=Path), help="Signing key (default: the recipe's publish.key).")
@click.option("--pub", type=click.Path(path_type=Path), help="Public key for --check (default: from --key).")
@_registry_option
@_endpoint_option
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads (default: every core).")
@click.option("-q", "--quiet", is_flag=True, help="No step lines.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def build_command(recipe: Path, out: Optional[Path], show_plan: bool, only: Optional[str], no_publish: bool,
                  no_eval: bool, check: bool, key: Optional[Path], pub: Optional[Path], registry: Optional[str],
                  endpoint_url: Optional[str], threads: Optional[int], quiet: bool, as_json: bool) -> None:
    """Build every target of a recipe (slmpkg.toml): convert, quantize, measure, sign, publish."""
    from .build import Builder
    from .recipe import load_recipe

    r = load_recipe(recipe)
    out = out or r.path.parent / "slmpkg-build"
    log = None if quiet else (lambda line: click.echo(line, err=True))
    builder = Builder(r, out, key=key, registry=registry, endpoint_url=endpoint_url, threads=threads, log=log)
    if show_plan:
        _print_plan(builder, only, as_json)
        return
    if check:
        checked = builder.check(pub=pub)
        if as_json:
            _emit_json(checked.to_dict())
        else:
            for target, row in checked.targets.items():
                verdict = "reproducible" if row["match"] else (
                    "not published" if not row["published"] else f"DIFFERS: {', '.join(row['differ'][:4])}")
                click.echo(f"{target:<20} {row['artifact']:<22} {verdict}")
        if not checked.reproducible:
            sys.exit(EXIT_ERROR)
        return
    result = builder.run(only, publish=not no_publish, evaluate=not no_eval)
    if as_json:
        _emit_json(result.to_dict())
        return
    if quiet:
        return
    built = sum(s.status == "built" for s in result.steps)
    click.echo(f"{r.name}:{r.version}: {built} step(s) run, {len(result.steps) - built} up to date, "
               f"{result.seconds:.1f} s")
    for artifact_id, directory in result.artifacts.items():
        q = result.reports.get(artifact_id, {})
        quality = (f"mean KLD {q['mean_kld']:.4g}, top-1 {100 * q['same_top1']:.1f}%" if "mean_kld" in q
                   else f"max tensor error {q['max_tensor_relative_error']:.3g}" if q else "")
        targets = ", ".join(builder.plan.nodes[artifact_id].targets)
        click.echo(f"  {artifact_id:<22} {quality:<32} {targets}")
    if result.report_files:
        click.echo(f"quality report: {result.report_files.get('html')}")
    for p in result.published:
        click.echo(f"published {r.name}:{r.version} [{p['target']}] (index v{p['index_version']})")
    if result.tags:
        click.echo(f"tagged {', '.join(result.tags)}")


def _print_plan(builder, only: Optional[str], as_json: bool) -> None:
    plan = builder.plan
    jobs = [plan.job(only)] if only else plan.jobs
    document = {
        "name": builder.recipe.name, "version": builder.recipe.version, "source": builder.recipe.source,
        "jobs": [{**n.spec.to_dict(), "needs": [d for d in plan.closure([n.id]) if d != n.id],
                  "commands": [s.command for s in builder.commands(n.id)]} for n in jobs],
        "commands": [s.command for s in builder.commands(only)],
        "matrix": {"include": [{"job": n.id} for n in jobs]},
    }
    if as_json:
        _emit_json(document)
        return
    click.echo(f"{document['name']}:{document['version']} from {document['source']}")
    for job in document["jobs"]:
        click.echo(f"\njob {job['id']}: {', '.join(job['targets'])}")
        for command in job["commands"]:
            click.echo(f"  {command}")


@main.command("eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The float source: a HF directory, GGUF or ONNX model.")
@click.option("--text", type=click.Path(path_type=Path), help="Evaluation text (default: a built-in text).")
@click.option("--context", default=256, show_default=True, type=click.IntRange(min=4), help="Tokens per chunk.")
@click.option("--chunks", default=4, show_default=True, type=click.IntRange(min=1), help="Chunks at most.")
@click.option("--runtime/--no-runtime", default=None,
              help="Require (or skip) the runtime statistics; default: when the runtimes are installed.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path),
              help="Also write quality.json, quality.md, quality.html and plots into this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def eval_command(artifact: Path, reference: Path, text: Optional[Path], context: int, chunks: int,
                 runtime: Optional[bool], report_dir: Optional[Path], as_json: bool) -> None:
    """Measure an artifact against its float source: per-tensor error and, with the runtimes installed,
    KL divergence, same-top-1 rate and perplexity (llama-perplexity --kl-divergence's statistics)."""
    from .evaluation import evaluate, write_report

    body = None
    if text is not None:
        try:
            body = text.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{text}: cannot read the text ({getattr(e, 'strerror', None) or e})") from None
    report = evaluate(artifact, reference, text=body, context=context, max_chunks=chunks, runtime=runtime)
    if report_dir is not None:
        write_report([report], report_dir, title=f"{artifact.name} against {reference.name}")
    if as_json:
        _emit_json(report.to_dict())
        return
    click.echo(f"{artifact}: {report.file_type or report.format}, {report.bits_per_weight:.2f} bits per weight")
    worst = sorted(report.tensors, key=lambda t: -t.relative_error)[:3]
    click.echo("largest tensor errors: " + ", ".join(f"{t.name} {t.relative_error:.3g} ({t.type})" for t in worst))
    rt = report.runtime
    if rt is None:
        click.echo(f"runtime statistics: none ({report.runtime_skipped})")
        return
    click.echo(f"{rt.positions} positions ({rt.chunks} chunks of {rt.context}), {rt.runtime} vs {rt.reference_runtime}")
    click.echo(f"mean KLD {rt.mean_kld:.6f} ± {rt.mean_kld_stderr:.6f}   median {rt.median_kld:.6f}   "
               f"p99 {rt.p99_kld:.6f}   max {rt.max_kld:.6f}")
    click.echo(f"same top-1 {100 * rt.same_top1:.2f}%   PPL {rt.perplexity:.4f} (reference {rt.reference_perplexity:.4f})")
