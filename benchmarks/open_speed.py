"""Opening a real-vocabulary GGUF: slmpkg's reader and `slmpkg inspect` vs llama.cpp's vocab-only load.

Builds Qwen2.5-0.5B-shaped F16 GGUFs with 152k and 256k byte-level BPE vocabularies (see
``real_vocab.py``), then times, interleaved over --repeat rounds in this one run:

- llama.cpp: ``llama_model_load_from_file`` with ``vocab_only`` (reads the header, builds the vocabulary), the anchor;
- slmpkg ``formats.gguf.read`` (the header: metadata, tensor infos);
- slmpkg ``inspect_file(...).to_dict()`` (what ``slmpkg inspect --json`` computes);
- the ``slmpkg inspect --json`` command in a fresh process (Python start-up and imports included);
- with --gguf-py, gguf-py's ``GGUFReader`` (what slmpkg used before) once.

Prints the fastest and the median of each and their ratios to llama.cpp's (lower is faster).

    python benchmarks/open_speed.py [--repeat 5] [--vocab 151936,256000] [--cache DIR] [--gguf-py]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_vocab import cached_f16  # noqa: E402

from slmpkg.formats import gguf as gguf_format  # noqa: E402
from slmpkg.inspection import inspect_file  # noqa: E402


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs the whole vocabulary load to stderr; keep the table readable."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def llama_vocab_only(path: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with quiet_stderr():
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the vocabulary of {path}")
    llama_cpp.llama_model_free(model)


def cli_inspect(path: Path) -> None:
    subprocess.run([str(Path(sys.executable).with_name("slmpkg")), "inspect", "--json", str(path)],
                   check=True, stdout=subprocess.DEVNULL)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--vocab", default="151936,256000")
    parser.add_argument("--cache", type=Path, help="keep the built GGUFs here (default: a temporary directory)")
    parser.add_argument("--gguf-py", action="store_true", help="also time gguf-py's GGUFReader once")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        files = {int(v): cached_f16(cache, int(v)) for v in args.vocab.split(",")}
        llama_vocab_only(next(iter(files.values())))  # load llama.cpp's libraries before timing
        cli_inspect(next(iter(files.values())))  # warm the page cache and bytecode
        jobs = {
            "llama.cpp vocab_only": llama_vocab_only,
            "slmpkg read": gguf_format.read,
            "slmpkg inspect (API)": lambda p: inspect_file(p).to_dict(),
            "slmpkg inspect (CLI)": cli_inspect,
        }
        times: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.repeat):
            for n_vocab, path in files.items():
                for name, job in jobs.items():
                    times.setdefault((n_vocab, name), []).append(timed(lambda: job(path)))
        if args.gguf_py:
            from gguf import GGUFReader

            for n_vocab, path in files.items():
                times[(n_vocab, "gguf-py GGUFReader (once)")] = [timed(lambda: GGUFReader(path))]

        print(f"Qwen2.5-0.5B-shaped F16 GGUF, {args.repeat} interleaved rounds; seconds and ratio to llama.cpp")
        header = f"{'vocab':>7}  {'job':<28}{'fastest':>9}{'median':>9}{'ratio fastest':>15}{'ratio median':>14}"
        print(header)
        print("-" * len(header))
        for n_vocab, path in files.items():
            anchor = times[(n_vocab, "llama.cpp vocab_only")]
            a_min, a_med = min(anchor), statistics.median(anchor)
            for (v, name), ts in times.items():
                if v != n_vocab:
                    continue
                t_min, t_med = min(ts), statistics.median(ts)
                print(f"{v:>7}  {name:<28}{t_min:9.3f}{t_med:9.3f}{t_min / a_min:14.2f}×{t_med / a_med:13.2f}×")


if __name__ == "__main__":
    main()
