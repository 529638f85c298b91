"""Fuzz targets: every reader of untrusted bytes, each a function of one input that may raise only
:class:`slmpkg.errors.SlmpkgError`. Run one coverage-guided with atheris (``pip install 'slmpkg[fuzz]'``)::

    python tests/fuzz/fuzz.py gguf tests/fuzz/corpus/gguf -max_total_time=600

and every corpus file is replayed by ``tests/test_fuzz_corpus.py`` in the test suite, so a crash that was
found and fixed stays fixed.

Targets:
- ``gguf``: a GGUF file (header, metadata, tensor infos; the bytes of every small tensor are read);
- ``safetensors``: a ``.safetensors`` file, or (first byte odd) an index JSON naming shards;
- ``onnx``: ``model.onnx`` in a model directory (slmpkg's, onnxruntime-genai's or optimum's layouts);
- ``spm``: a SentencePiece ``tokenizer.model``;
- ``index``: the in-toto statement of a registry index, signed with the trusted key, then pulled;
- ``manifest``: an artifact manifest referenced by a valid signed index, then pulled.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from slmpkg.errors import SlmpkgError

WORK = Path(os.environ.get("SLMPKG_FUZZ_DIR") or tempfile.mkdtemp(prefix="slmpkg-fuzz-"))
SMALL_TENSOR = 1 << 20


def _file(name: str, data: bytes) -> Path:
    path = WORK / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _touch_tensors(ckpt) -> None:
    for t in ckpt.tensors:
        if 0 < t.nbytes <= SMALL_TENSOR:
            t.raw()


def gguf(data: bytes) -> None:
    from slmpkg.formats import gguf as gguf_format
    from slmpkg.inspection import inspect_file

    path = _file("model.gguf", data)
    _touch_tensors(gguf_format.read(path))
    inspect_file(path)


def safetensors(data: bytes) -> None:
    from slmpkg.formats import safetensors as st_format

    folder = WORK / "st"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if data[:1] and data[0] & 1:
        (folder / "model.safetensors.index.json").write_bytes(data[1:])
        (folder / "model-00001-of-00001.safetensors").write_bytes(_SHARD)
    else:
        (folder / "model.safetensors").write_bytes(data)
    _touch_tensors(st_format.read(folder))


# the shard an index names: one F32 tensor "w" of 2 values
_HEADER = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
_SHARD = len(_HEADER).to_bytes(8, "little") + _HEADER + bytes(8)


def onnx(data: bytes) -> None:
    from slmpkg.formats import onnx_import

    folder = WORK / "onnx"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(data)
    _touch_tensors(onnx_import.read(folder))


def spm(data: bytes) -> None:
    from slmpkg.tokenizer import parse_sentencepiece_model

    parse_sentencepiece_model(data, "tokenizer.model")


_KEYS: dict[str, object] = {}


def _trusted():
    """A fixed key pair (made once per process) and a fresh local registry."""
    from slmpkg import signing

    if not _KEYS:
        priv, pub = signing.generate_keypair(WORK / "keys" / "release", overwrite=True)
        _KEYS.update(signer=signing.KeySigner(priv), verifier=signing.KeyVerifier(pub))
    registry = WORK / "registry"
    shutil.rmtree(registry, ignore_errors=True)
    for p in (WORK / "out", WORK / "cache", WORK / "trust.json"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return _KEYS["signer"], _KEYS["verifier"], registry


def _pull(registry: Path, verifier) -> None:
    from slmpkg.registry import open_store, pull

    pull(open_store(registry), "m:1", "cpu-x86_64", WORK / "out", verifier, cache_dir=WORK / "cache",
         state=WORK / "trust.json")


def index(data: bytes) -> None:
    signer, verifier, registry = _trusted()
    _file_at(registry / "indexes" / "m" / "1.json", json.dumps(signer.sign(data)).encode())
    _pull(registry, verifier)


def manifest(data: bytes) -> None:
    from slmpkg.registry import INDEX_PREDICATE  # noqa: F401 - the predicate type the index carries

    signer, verifier, registry = _trusted()
    digest = hashlib.sha256(data).hexdigest()
    _file_at(registry / "blobs" / "sha256" / digest, data)
    now = dt.datetime.now(dt.timezone.utc)
    predicate = {"name": "m", "release": "1", "version": 1,
                 "updated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "expires": (now + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "targets": {"cpu-x86_64": {"digest": f"sha256:{digest}", "size": len(data),
                                            "mediaType": "application/vnd.slmpkg.manifest.v1+json"}}}
    canonical = json.dumps(predicate, sort_keys=True, separators=(",", ":")).encode()
    statement = {"_type": "https://in-toto.io/Statement/v1",
                 "subject": [{"name": "m:1", "digest": {"sha256": hashlib.sha256(canonical).hexdigest()}}],
                 "predicateType": INDEX_PREDICATE, "predicate": predicate}
    _file_at(registry / "indexes" / "m" / "1.json", json.dumps(signer.sign(json.dumps(statement).encode())).encode())
    _pull(registry, verifier)


def _file_at(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "gguf": gguf, "safetensors": safetensors, "onnx": onnx, "spm": spm, "index": index, "manifest": manifest,
}


def run(target: str, data: bytes) -> None:
    """Feed ``data`` to ``target``; a :class:`SlmpkgError` is an answer, anything else escapes (a bug)."""
    with contextlib.suppress(SlmpkgError):
        TARGETS[target](data)
