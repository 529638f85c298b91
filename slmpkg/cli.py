"""The ``slmpkg`` command line: a thin layer over the Python API.

Every command prints one machine-readable JSON document with ``--json``; errors print one line on
stderr (``slmpkg: error: FILE: problem``) and exit non-zero, without a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from . import __version__
from .errors import SlmpkgError

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
