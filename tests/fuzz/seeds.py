"""Write the seed inputs of each fuzz target (small valid files of every kind) into tests/fuzz/corpus/.

    python tests/fuzz/seeds.py
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import numpy as np

    from slmpkg.formats import gguf as gguf_format
    from slmpkg.pipeline import convert

    corpus = HERE / "corpus"
    tmp = Path(tempfile.mkdtemp())
    make = _module(REPO / "examples" / "make_tiny_llama.py")

    def put(target: str, name: str, data: bytes) -> None:
        (corpus / target).mkdir(parents=True, exist_ok=True)
        (corpus / target / name).write_bytes(data)

    # a small Llama GGUF (f16, one layer), and the same quantized
    tiny = make.tiny_llama(n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1, n_vocab=300)
    gguf_format.write(tmp / "tiny.gguf", tiny)
    put("gguf", "tiny-f16.gguf", (tmp / "tiny.gguf").read_bytes())
    convert_q = tmp / "tiny-q8.gguf"
    from slmpkg.pipeline import quantize_file
    from slmpkg.presets import QuantOptions

    quantize_file(tmp / "tiny.gguf", convert_q, QuantOptions("Q8_0"), progress=False)
    put("gguf", "tiny-q8_0.gguf", convert_q.read_bytes())

    # safetensors: a GGUF → HF directory's weights, and its index form
    convert(tmp / "tiny.gguf", tmp / "hf", dtype="f16", progress=False)
    put("safetensors", "model.safetensors", (tmp / "hf" / "model.safetensors").read_bytes())
    index = {"metadata": {"total_size": 8}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}
    put("safetensors", "index.json", b"\x01" + json.dumps(index).encode())

    # ONNX: slmpkg's f32 and int4 graphs of the tiny model (weights inline: no external data file)
    for quant in ("f32", "int4"):
        convert(tmp / "tiny.gguf", tmp / f"onnx-{quant}", to="onnx", quant=quant, progress=False)
        put("onnx", f"tiny-{quant}.onnx", _inline(tmp / f"onnx-{quant}"))

    # a SentencePiece model trained here
    sys.path.insert(0, str(REPO / "tests"))
    from test_tokenizer import sentencepiece_model

    spm_dir = sentencepiece_model(tmp / "spm")
    put("spm", "tokenizer.model", (spm_dir / "tokenizer.model").read_bytes())

    # a registry index statement and a manifest, as push writes them
    from slmpkg import signing
    from slmpkg.registry import open_store, push

    priv, _ = signing.generate_keypair(tmp / "k")
    artifact = tmp / "artifact"
    artifact.mkdir()
    (artifact / "model.gguf").write_bytes((tmp / "tiny.gguf").read_bytes()[:4096])
    store = open_store(tmp / "registry")
    result = push(store, "m:1", artifact, "cpu-x86_64", signing.KeySigner(priv))
    bundle = json.loads((tmp / "registry" / "indexes" / "m" / "1.json").read_bytes())
    import base64

    put("index", "index-statement.json", base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    manifest = store.get("blobs/sha256/" + result.manifest_digest.removeprefix("sha256:"))
    assert hashlib.sha256(manifest).hexdigest() == result.manifest_digest.removeprefix("sha256:")
    put("manifest", "manifest.json", manifest)
    shutil.rmtree(tmp)
    print(f"seeds in {corpus}: " + ", ".join(f"{d.name} {len(list(d.iterdir()))}" for d in sorted(corpus.iterdir())))
    del np


def _inline(folder: Path) -> bytes:
    """The model with its external data loaded back into the file."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=True)
    for t in model.graph.initializer:
        t.ClearField("data_location")
        del t.external_data[:]
    return model.SerializeToString()


if __name__ == "__main__":
    main()
