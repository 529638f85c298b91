"""Whole-model quantization: wall time of slmpkg vs llama.cpp's llama_model_quantize, same F16 GGUF.

Builds a Llama-shaped F16 GGUF with random weights (default ~0.3 B parameters), then times both
quantizers for Q8_0, Q4_0 and Q4_K_M at 1 and 2 threads, in this one run, and checks the outputs are
byte-identical.

    python benchmarks/requantize_speed.py [--layers 6] [--embd 2048] [--ff 5632]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from slmpkg.formats import gguf as gguf_format  # noqa: E402
from slmpkg.pipeline import quantize_file  # noqa: E402
from slmpkg.presets import QuantOptions  # noqa: E402


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs every tensor to stderr; keep the table readable."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def _tiny_llama():
    spec = importlib.util.spec_from_file_location("make_tiny_llama", ROOT / "examples" / "make_tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--embd", type=int, default=2048)
    parser.add_argument("--ff", type=int, default=5632)
    parser.add_argument("--presets", default="Q8_0,Q4_0,Q4_K_M")
    args = parser.parse_args()
    from llama_ref import llama_quantize

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model-f16.gguf"
        ckpt = _tiny_llama()(n_layer=args.layers, n_embd=args.embd, n_ff=args.ff, n_head=16, n_head_kv=4)
        gguf_format.write(src, ckpt)
        n_params = sum(t.n_elements for t in ckpt.tensors)
        print(f"F16 GGUF: {n_params / 1e6:.0f} M parameters, {src.stat().st_size / 1e6:.0f} MB")
        header = f"{'preset':<8}{'threads':>8}{'slmpkg s':>10}{'llama.cpp s':>13}{'ratio':>8}{'identical':>11}"
        print(header)
        print("-" * len(header))
        for preset in args.presets.split(","):
            options = QuantOptions(preset)
            for threads in (1, 2):
                ours, ref = Path(tmp) / "ours.gguf", Path(tmp) / "ref.gguf"
                start = time.perf_counter()
                quantize_file(src, ours, options, threads=threads, progress=False)
                t_ours = time.perf_counter() - start
                start = time.perf_counter()
                with _quiet_stderr():
                    assert llama_quantize(src, ref, options.preset.ftype, nthread=threads) == 0
                t_ref = time.perf_counter() - start
                same = ours.read_bytes() == ref.read_bytes()
                print(f"{preset:<8}{threads:>8}{t_ours:10.2f}{t_ref:13.2f}{t_ours / t_ref:7.2f}×{str(same):>11}")


if __name__ == "__main__":
    main()
