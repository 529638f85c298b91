"""Sign throughput against plain hashlib on the same files, same process, same run.

    python benchmarks/sign_speed.py [--size-mb 1024] [--files 4] [--repeat 3] [--dir /tmp]

Writes a directory of ``--files`` random files totalling ``--size-mb`` MiB, reads it once so both sides
hash from the page cache, then alternates (best of ``--repeat``):

- hashlib: ``hashlib.file_digest(f, "sha256")`` over each file in turn, one thread (the anchor);
- slmpkg sign, 1 worker: per-core ratio, goal >= 0.9x hashlib;
- slmpkg sign, default workers (one per CPU): files hashed in parallel;
- slmpkg verify, default workers.

Prints MB/s (10^6 bytes/s) and the ratio to hashlib. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from slmpkg import signing


def make_files(root: Path, total: int, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    per = total // n
    chunk = os.urandom(64 << 20)  # random once, written repeatedly: sha256 speed does not depend on data
    for i in range(n):
        with open(root / f"model-{i + 1:05d}-of-{n:05d}.safetensors", "wb") as f:
            left = per
            while left:
                k = min(left, len(chunk))
                f.write(chunk[:k])
                left -= k


def hashlib_pass(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                out[p.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the test files (default: system temp)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slmpkg-sign-bench-", dir=args.dir))
    try:
        model = work / "model"
        total = args.size_mb << 20
        make_files(model, total, args.files)
        total = sum(p.stat().st_size for p in model.iterdir())
        priv, pub = signing.generate_keypair(work / "bench")
        sig = work / "model.sig"
        hashlib_pass(model)  # warm the page cache

        runs = {
            "hashlib.file_digest, 1 thread": lambda: hashlib_pass(model),
            "slmpkg sign, 1 worker": lambda: signing.sign(model, priv, sig, max_workers=1),
            f"slmpkg sign, {os.cpu_count()} workers": lambda: signing.sign(model, priv, sig),
            f"slmpkg verify, {os.cpu_count()} workers": lambda: signing.verify(model, pub, sig),
        }
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeat):
            for name, fn in runs.items():  # alternate, so drift in machine load hits all alike
                best[name] = min(best[name], timed(fn))

        # Same digests both ways, or the speed means nothing.
        assert signing.verify(model, pub, sig).digests == hashlib_pass(model)

        anchor = total / best["hashlib.file_digest, 1 thread"] / 1e6
        print(f"{args.files} files, {total / 1e6:.0f} MB, {os.cpu_count()} CPUs, best of {args.repeat}")
        for name, t in best.items():
            mbs = total / t / 1e6
            print(f"  {name:<36} {mbs:8.0f} MB/s   {mbs / anchor:5.2f}x hashlib")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
