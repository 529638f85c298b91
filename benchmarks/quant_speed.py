"""Quantization speed per type: slmpkg (1 thread, all threads) vs gguf.quants and ggml's C reference.

MB/s of float32 input on a 4096×4096 standard-normal matrix, best of --repeat runs, all measured in
this one run; ratios are slmpkg (1 thread) over each anchor.

    python benchmarks/quant_speed.py [--size 4096] [--repeat 3] [--types Q4_K,Q8_0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from slmpkg import quant  # noqa: E402
from slmpkg.quant import QuantType as T  # noqa: E402

TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
GGUF_PY_TYPES = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}


def best_rate(fn, nbytes: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return nbytes / 1e6 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--types", default=",".join(t.name for t in TYPES))
    parser.add_argument("--imatrix", action="store_true", help="also pass an importance matrix")
    args = parser.parse_args()

    from ggml_ref import GGML, find_library
    import gguf.quants as gguf_quants

    lib = find_library()
    ggml = GGML(lib) if lib else None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.size, args.size)).astype(np.float32)
    imatrix = rng.gamma(1.0, 1.0, args.size).astype(np.float32) if args.imatrix else None
    threads = quant.default_threads()
    print(f"{args.size}×{args.size} float32, MB/s of input, best of {args.repeat}; {threads} cores"
          f"{', with imatrix' if args.imatrix else ''}")
    header = f"{'type':<8}{'slmpkg 1t':>11}{f'slmpkg {threads}t':>11}{'gguf-py':>10}{'ggml C 1t':>11}{'vs gguf-py':>12}{'vs C 1t':>9}"
    print(header)
    print("-" * len(header))
    for name in args.types.split(","):
        t = quant.parse_type(name)
        ours1 = best_rate(lambda: quant.quantize(x, t, imatrix=imatrix, threads=1), x.nbytes, args.repeat)
        ours_n = best_rate(lambda: quant.quantize(x, t, imatrix=imatrix, threads=threads), x.nbytes, args.repeat)
        gguf_rate = (best_rate(lambda: gguf_quants.quantize(x, t), x.nbytes, args.repeat)
                     if t in GGUF_PY_TYPES and imatrix is None else None)
        c_rate = best_rate(lambda: ggml.quantize(x, t, imatrix), x.nbytes, args.repeat) if ggml else None
        cell = lambda v: f"{v:10.0f}" if v else f"{'—':>10}"  # noqa: E731
        ratio = lambda a, b: f"{a / b:8.2f}×" if b else f"{'—':>9}"  # noqa: E731
        print(f"{t.name:<8}{ours1:11.0f}{ours_n:11.0f}{cell(gguf_rate)}{cell(c_rate):>11}"
              f"{ratio(ours1, gguf_rate):>12}{ratio(ours1, c_rate)}")


if __name__ == "__main__":
    main()
