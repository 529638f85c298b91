"""Fuzz targets: every reader of untrusted bytes, each a function of one input that may raise only
:class:`slmpkg.errors.SlmpkgError`. Run one coverage-guided with atheris (``pip install 'slmpkg[fuzz]'``)::

    python tests/fuzz/fuzz.py gguf tests/fuzz/corpus/gguf -max_total_time=600

and every corpus file is replayed by ``tests/test_fuzz_corpus.py`` in the test suite, so a crash that was
found and fixed stays fixed.

A reader that takes a directory gets its files from one input: the files, in the order the target's
:data:`LAYOUTS` names them, joined by :data:`SEPARATOR` (an empty or missing part is a file that is not
there). :func:`join` makes such an input; the separator is in the fuzzing dictionary (``slmpkg.dict``), so
mutations keep the files apart. Each target goes as far as the command that reads the input does:

- ``gguf``: a GGUF model, or the shards of a split one (``model-0000N-of-0000M.gguf``): the header, every
  small tensor's bytes and values (every quantized type is dequantized), ``slmpkg inspect``, and the
  GGUF → Hugging Face mapping (config.json from the metadata, tokenizer files from ``tokenizer.*``);
- ``safetensors``: a Hugging Face directory (one ``model.safetensors``, or an index and two shards; with
  config.json and the tokenizer): the headers, the tensors, and the mapping to llama.cpp's names and
  metadata (the GGUF header it makes is encoded);
- ``onnx``: an ONNX decoder directory (``model.onnx``, its external data, genai_config.json, config.json),
  as slmpkg's writer, onnxruntime-genai's builder and optimum lay it out, read back as a checkpoint (and
  its GGUF header encoded);
- ``spm``: a SentencePiece ``tokenizer.model``;
- ``tokenizer``: the tokenizer files of a Hugging Face directory → GGUF ``tokenizer.*`` keys (encoded as a
  GGUF header) → back to Hugging Face tokenizer files;
- ``imatrix``: an importance matrix (llama.cpp's GGUF or legacy ``.dat``);
- ``recipe``: a build recipe (``slmpkg.toml``) and the artifacts it plans;
- ``signature``: a ``model.sig`` bundle checked against a small signed directory, or (second part) the
  statement it carries, signed here with the trusted key (its root digest recomputed, as a signer would) so
  the check reaches the comparison with the files;
- ``index``: the in-toto statement of a registry index (and, second part, of a tag), signed with the trusted
  key (its subject digest recomputed, as a signer would), then pulled from a registry holding a valid
  manifest and its blobs;
- ``manifest``: an artifact manifest referenced by a valid signed index, then pulled (its blobs are there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from slmpkg.errors import SlmpkgError

WORK = Path(os.environ.get("SLMPKG_FUZZ_DIR") or tempfile.mkdtemp(prefix="slmpkg-fuzz-"))
# tensors up to this size have their bytes read and their values computed
SMALL_TENSOR = 1 << 20

SEPARATOR = b"\n--slmpkg-fuzz-next-file--\n"

LAYOUTS: dict[str, tuple[str, ...]] = {
    "gguf": ("shard 1", "shard 2", "shard 3", "shard 4"),
    "safetensors": ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                    "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors"),
    "onnx": ("model.onnx", "model.onnx.data", "genai_config.json", "config.json"),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                  "tokenizer.model", "generation_config.json", "chat_template.jinja", "added_tokens.json"),
    "signature": ("model.sig", "statement"),
    "index": ("index statement", "tag statement"),
}


def join(target: str, files: dict[str, bytes]) -> bytes:
    """The input of ``target`` that gives these files (by the names of its layout)."""
    names = LAYOUTS[target]
    unknown = set(files) - set(names)
    assert not unknown, f"{target} has no file {sorted(unknown)}"
    parts = [files.get(n, b"") for n in names]
    while parts and not parts[-1]:
        parts.pop()
    return SEPARATOR.join(parts)


def split(target: str, data: bytes) -> dict[str, bytes]:
    """The files an input of ``target`` holds (the inverse of :func:`join`)."""
    names = LAYOUTS[target]
    parts = data.split(SEPARATOR, len(names) - 1)
    return {name: part for name, part in zip(names, parts) if part}


def _folder(name: str, files: dict[str, bytes]) -> Path:
    """A fresh directory ``WORK/name`` holding ``files``."""
    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    return folder


def _gguf_header(ckpt) -> None:
    """The GGUF header a conversion of ``ckpt`` would write (every metadata value must be writable)."""
    from slmpkg.formats import gguf as gguf_format

    gguf_format.encode_header(ckpt.metadata, ckpt.tensors, gguf_format.alignment_of(ckpt.metadata))


def _touch_tensors(ckpt) -> None:
    """Read every small tensor's bytes and compute its values (dequantized when quantized; a type that has
    no float values is refused on its own, and the next tensor is read)."""
    from slmpkg.errors import QuantizationError

    for t in ckpt.tensors:
        if 0 < t.nbytes <= SMALL_TENSOR and t.n_elements <= SMALL_TENSOR:
            t.raw()
            with contextlib.suppress(QuantizationError):
                t.float32()


# ---- model files --------------------------------------------------------------------------------


def gguf(data: bytes) -> None:
    from slmpkg import architectures
    from slmpkg.formats import gguf as gguf_format
    from slmpkg.inspection import inspect_file
    from slmpkg.quant import QuantType

    shards = [part for part in data.split(SEPARATOR, len(LAYOUTS["gguf"]) - 1)]
    folder = _folder("gguf", {})
    if len(shards) == 1:
        paths = [folder / "model.gguf"]
    else:
        paths = [gguf_format.split_path(folder / "model.gguf", i, len(shards)) for i in range(len(shards))]
    for path, shard in zip(paths, shards):
        path.write_bytes(shard)
    ckpt = gguf_format.read(paths[0])
    _touch_tensors(ckpt)
    inspect_file(paths[0])
    _touch_tensors(architectures.to_hf(ckpt, QuantType.F32))


def safetensors(data: bytes) -> None:
    from slmpkg import architectures
    from slmpkg.formats import safetensors as st_format

    ckpt = st_format.read(_folder("safetensors", split("safetensors", data)))
    _touch_tensors(ckpt)
    canonical = architectures.from_hf(ckpt)
    _gguf_header(canonical)
    _touch_tensors(canonical)


def onnx(data: bytes) -> None:
    from slmpkg.formats import onnx_import

    canonical = onnx_import.read(_folder("onnx", split("onnx", data)))
    _gguf_header(canonical)
    _touch_tensors(canonical)


def spm(data: bytes) -> None:
    from slmpkg.tokenizer import parse_sentencepiece_model

    parse_sentencepiece_model(data, "tokenizer.model")


def tokenizer(data: bytes) -> None:
    from slmpkg.tokenizer import gguf_tokenizer_metadata, hf_tokenizer_files

    from slmpkg.checkpoint import Checkpoint

    metadata = gguf_tokenizer_metadata(split("tokenizer", data))
    _gguf_header(Checkpoint(metadata, []))
    hf_tokenizer_files(metadata)


def imatrix(data: bytes) -> None:
    from slmpkg.imatrix import ImportanceMatrix

    path = _folder("imatrix", {"imatrix.dat": data}) / "imatrix.dat"
    matrix = ImportanceMatrix.load(path)
    matrix.check_finite()
    for name, values in matrix.values.items():
        matrix.for_tensor(name, (1, values.size))


def recipe(data: bytes) -> None:
    from slmpkg.recipe import load_recipe

    for artifact in load_recipe(_folder("recipe", {"slmpkg.toml": data})).artifacts():
        artifact.to_dict()


# ---- signatures and the registry ----------------------------------------------------------------

_KEYS: dict[str, Any] = {}

# the artifact every registry and signed directory of these targets holds (a sub-directory included)
ARTIFACT = {"model.gguf": b"GGUF\x03\x00\x00\x00" + bytes(16), "tok/tokenizer.json": b'{"model": {"type": "BPE"}}'}
FAR_FUTURE = "2999-01-01T00:00:00Z"


def _trusted():
    """The signer and verifier of one fixed P-256 key pair (the same in every process, so a bundle in the
    corpus verifies)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from slmpkg import signing

    if not _KEYS:
        key = ec.derive_private_key(0x5EED, ec.SECP256R1())
        _KEYS.update(signer=signing.KeySigner(key), verifier=signing.KeyVerifier(key.public_key()))
    return _KEYS["signer"], _KEYS["verifier"]


def _signed(payload: bytes) -> bytes:
    """``payload`` signed with the trusted key, as a bundle file holds it."""
    return json.dumps(_trusted()[0].sign(payload)).encode()


def signature(data: bytes) -> None:
    from slmpkg import signing

    files = split("signature", data)
    bundle = _signed(_root_digest_fixed(files["statement"])) if "statement" in files else files.get("model.sig", b"")
    folder = _folder("signed", {})
    for rel, content in ARTIFACT.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    (folder / signing.DEFAULT_SIGNATURE_NAME).write_bytes(bundle)
    signing.verify(folder, _trusted()[1])


def _root_digest_fixed(data: bytes) -> bytes:
    """A model-signing statement with its subject digest recomputed from its resources (sha256 over their
    digests in order), when it has both: the signer computes it, a fuzzer cannot."""
    try:
        doc = json.loads(data)
        root = hashlib.sha256()
        for resource in doc["predicate"]["resources"]:
            root.update(bytes.fromhex(resource["digest"]))
        doc["subject"][0]["digest"] = {"sha256": root.hexdigest()}
        return json.dumps(doc).encode()
    except (ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError):
        return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_of_artifact() -> bytes:
    """The manifest of :data:`ARTIFACT` as ``m:1`` for ``cpu-x86_64`` (what push stores)."""
    from slmpkg.registry.manifest import MANIFEST_MEDIA_TYPE

    files = [{"path": p, "digest": f"sha256:{_sha256(b)}", "size": len(b), "mediaType": "application/octet-stream"}
             for p, b in sorted(ARTIFACT.items())]
    doc = {"schemaVersion": 1, "mediaType": MANIFEST_MEDIA_TYPE, "name": "m", "release": "1", "target": "cpu-x86_64",
           "format": "gguf", "quant": None, "bitsPerWeight": None, "files": files, "provenance": {}}
    return json.dumps(doc, indent=1).encode()


def statement(predicate_type: str, subject: str, predicate: dict[str, Any]) -> bytes:
    """An in-toto statement v1 of ``predicate`` (what push and tag sign)."""
    from slmpkg.registry.signed import STATEMENT_TYPE, canonical

    return json.dumps({"_type": STATEMENT_TYPE,
                       "subject": [{"name": subject, "digest": {"sha256": _sha256(canonical(predicate))}}],
                       "predicateType": predicate_type, "predicate": predicate}, indent=1).encode()


def index_statement(manifest: bytes) -> bytes:
    """The statement of the index of ``m:1`` listing ``manifest`` for ``cpu-x86_64``, valid until 2999."""
    from slmpkg.registry import INDEX_PREDICATE

    target = {"digest": f"sha256:{_sha256(manifest)}", "size": len(manifest),
              "mediaType": "application/vnd.slmpkg.manifest.v1+json"}
    return statement(INDEX_PREDICATE, "m:1", {"name": "m", "release": "1", "version": 1,
                                               "updated": "2025-01-01T00:00:00Z", "expires": FAR_FUTURE,
                                               "targets": {"cpu-x86_64": target}})


def tag_statement() -> bytes:
    """The statement of the tag ``m:stable`` → ``m:1``, valid until 2999."""
    from slmpkg.registry.signed import TAG_PREDICATE

    return statement(TAG_PREDICATE, "m:stable", {"name": "m", "tag": "stable", "release": "1", "version": 1,
                                                  "updated": "2025-01-01T00:00:00Z", "expires": FAR_FUTURE})


def _subject_fixed(data: bytes) -> bytes:
    """The statement with its subject digest recomputed from its predicate, when it has both (a
    signer computes it: a fuzzer cannot, and would otherwise never get past that check)."""
    from slmpkg.registry.signed import canonical

    try:
        doc = json.loads(data)
        subject = doc["subject"][0]
        subject["digest"] = {"sha256": _sha256(canonical(doc["predicate"]))}
        return json.dumps(doc).encode()
    except (ValueError, RecursionError, KeyError, IndexError, TypeError):
        return data


def _registry(blobs: list[bytes], documents: dict[str, bytes]) -> Path:
    """A fresh local registry holding ``blobs`` and the signed ``documents`` (by key)."""
    registry = _folder("registry", {})
    for p in (WORK / "out", WORK / "cache", WORK / "trust.json"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for blob in blobs:
        path = registry / "blobs" / "sha256" / _sha256(blob)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    for key, document in documents.items():
        path = registry / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_signed(document))
    return registry


def _pull(registry: Path, ref: str) -> None:
    from slmpkg.registry import open_store, pull

    pull(open_store(registry), ref, "cpu-x86_64", WORK / "out", _trusted()[1], cache_dir=WORK / "cache",
         state=WORK / "trust.json")


def index(data: bytes) -> None:
    files = split("index", data)
    documents = {"indexes/m/1.json": _subject_fixed(files.get("index statement", b""))}
    if "tag statement" in files:
        documents["tags/m/stable.json"] = _subject_fixed(files["tag statement"])
    registry = _registry([manifest_of_artifact(), *ARTIFACT.values()], documents)
    _pull(registry, "m:stable" if "tag statement" in files else "m:1")


def manifest(data: bytes) -> None:
    registry = _registry([data, *ARTIFACT.values()], {"indexes/m/1.json": index_statement(data)})
    _pull(registry, "m:1")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "gguf": gguf, "safetensors": safetensors, "onnx": onnx, "spm": spm, "tokenizer": tokenizer,
    "imatrix": imatrix, "recipe": recipe, "signature": signature, "index": index, "manifest": manifest,
}


def run(target: str, data: bytes) -> None:
    """Feed ``data`` to ``target``; a :class:`SlmpkgError` is an answer, anything else escapes (a bug).
    Warnings (a tokenizer llama.cpp reads a little differently) are answers too."""
    with contextlib.suppress(SlmpkgError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TARGETS[target](data)
