"""Kernel speed per type, one thread: slmpkg's quantize/dequantize vs ggml's C (ggml_quantize_chunk, to_float).

MB/s of float32 (input of quantize, output of dequantize) on a --size × --size standard-normal
matrix (dequantize reads ggml's own blocks of it). Every kernel of both libraries runs once per
round, rounds interleaved, so a busy neighbour slows both alike; prints the fastest and the median
rate of each and the ratios slmpkg / ggml (above 1 is faster).

    python benchmarks/quant_speed.py [--size 4096] [--repeat 5] [--types Q4_K,Q8_0] [--imatrix]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from slmpkg import quant  # noqa: E402
from slmpkg.quant import QuantType as T  # noqa: E402

TYPES = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
         T.IQ4_NL, T.IQ4_XS]


def rate(fn, nbytes: int) -> float:
    start = time.perf_counter()
    fn()
    return nbytes / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--types", default=",".join(t.name for t in TYPES))
    parser.add_argument("--imatrix", action="store_true", help="quantize with an importance matrix")
    args = parser.parse_args()

    from ggml_ref import GGML, find_library

    ggml = GGML(find_library())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.size, args.size)).astype(np.float32)
    imatrix = rng.gamma(1.0, 1.0, args.size).astype(np.float32) if args.imatrix else None
    types = [quant.parse_type(name) for name in args.types.split(",")]
    blocks = {t: ggml.quantize(x, t) for t in types}
    for t in types:  # the comparison means nothing unless both give the same bytes and floats
        assert np.array_equal(quant.quantize(x, t, imatrix=imatrix, threads=1), ggml.quantize(x, t, imatrix)), t.name
        assert np.array_equal(quant.dequantize(blocks[t], t, x.shape).view(np.uint32),
                              ggml.dequantize(blocks[t], t, x.shape).view(np.uint32)), t.name

    jobs = {
        "quantize": (lambda t: quant.quantize(x, t, imatrix=imatrix, threads=1),
                     lambda t: ggml.quantize(x, t, imatrix)),
        "dequantize": (lambda t: quant.dequantize(blocks[t], t, x.shape),
                       lambda t: ggml.dequantize(blocks[t], t, x.shape)),
    }
    rates: dict[tuple[str, T], tuple[list[float], list[float]]] = {}
    for _ in range(args.repeat):
        for t in types:
            for job, (ours, theirs) in jobs.items():
                mine, ref = rates.setdefault((job, t), ([], []))
                mine.append(rate(lambda: ours(t), x.nbytes))
                ref.append(rate(lambda: theirs(t), x.nbytes))

    print(f"{args.size}×{args.size} float32, one thread, MB/s of float32, {args.repeat} interleaved rounds"
          f"{', quantize with imatrix' if args.imatrix else ''}; ratio = slmpkg / ggml (above 1: faster)")
    header = (f"{'job':<11}{'type':<8}{'slmpkg max':>11}{'median':>8}{'ggml max':>10}{'median':>8}"
              f"{'ratio max':>10}{'median':>8}")
    print(header)
    print("-" * len(header))
    for job, t in [(job, t) for job in jobs for t in types]:
        mine, ref = rates[(job, t)]
        a, b = max(mine), max(ref)
        am, bm = statistics.median(mine), statistics.median(ref)
        print(f"{job:<11}{t.name:<8}{a:11.0f}{am:8.0f}{b:10.0f}{bm:8.0f}{a / b:9.2f}×{am / bm:7.2f}×")


if __name__ == "__main__":
    main()
