"""Write the seed inputs of each fuzz target (small valid inputs of every kind the reader meets) into
tests/fuzz/corpus/<target>/, each named ``seed-<what>``; the ``spm`` corpus is kept as the fuzzer grew it.

    python tests/fuzz/seeds.py [TARGET ...]

Models are tiny (hidden size 32 to 64, one or two layers, vocabularies of a few hundred tokens), so that
mutations land in headers and graphs rather than in tensor data. Needs the ``dev`` extra (torch,
transformers, tokenizers, sentencepiece) and onnxruntime-genai for the builder's graphs.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

import targets  # noqa: E402

CORPUS = HERE / "corpus"

# the Hugging Face families the model seeds cover: plain, fused projections, sandwich norms and soft-caps, experts
FAMILIES = ("llama", "qwen2", "phi3", "gemma2", "mixtral")


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path, names) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def small_hf(path: Path, family: str) -> Path:
    """test_convert's tiny random model of ``family``, narrowed (hidden 32, 2 heads of 16, FF 64) and in f16,
    with a byte-level BPE of 300 tokens (Gemma's SentencePiece-style BPE for the Gemmas, as their converter needs)."""
    import torch
    import transformers
    from test_convert import _config, _tokenizer

    path.mkdir(parents=True)
    if family.startswith("gemma"):
        _tokenizer(path, family)
    else:
        _byte_level_bpe(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = _config(family, len(tok), tok)
    config.hidden_size, config.intermediate_size = 32, 64
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    if getattr(config, "head_dim", None):
        config.head_dim = 16
    if getattr(config, "query_pre_attn_scalar", None):
        config.query_pre_attn_scalar = 16  # llama.cpp's gemma2 scales by 1/sqrt(head_dim)
    if family == "phi3":  # heads of 32 rotated over 16 (ONNX's GroupQueryAttention rotates multiples of 16)
        config.num_attention_heads, config.num_key_value_heads = 1, 1
        config.rope_parameters["partial_rotary_factor"] = 0.5
        if hasattr(config, "partial_rotary_factor"):
            config.partial_rotary_factor = 0.5
    if family == "mixtral":
        config.num_local_experts = 2
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() >= 2 else p.add_(0.25)
    model.to(torch.float16).save_pretrained(path)
    return path


def _byte_level_bpe(path: Path) -> None:
    """A Llama-3-like byte-level BPE (256 bytes, 40 merges, 4 specials, a bos template)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from test_tokenizer import LLAMA3_REGEX, corpus

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>")
    fast.save_pretrained(str(path))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _inline(model_file: Path) -> bytes:
    """An ONNX model with its external data loaded back into the file."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=True)
    for t in model.graph.initializer:
        t.ClearField("data_location")
        del t.external_data[:]
    return model.SerializeToString()


def gguf_seeds(tmp: Path, hf: dict[str, Path]) -> dict[str, bytes]:
    import numpy as np
    from gguf import GGUFValueType as V
    from gguf.constants import GGML_QUANT_SIZES

    from slmpkg.checkpoint import Checkpoint, LazyTensor, MetaValue
    from slmpkg.formats import gguf as gguf_format
    from slmpkg.pipeline import convert, quantize_file
    from slmpkg.presets import QuantOptions
    from slmpkg.errors import QuantizationError
    from slmpkg.quant import QuantType, dequantize

    make = _module(REPO / "examples" / "make_tiny_llama.py")
    seeds: dict[str, bytes] = {}
    # a Llama GGUF as llama.cpp's converter writes one (SentencePiece vocabulary), f16 and quantized
    tiny = make.tiny_llama(n_layer=1, n_embd=32, n_ff=64, n_head=2, n_head_kv=1, n_vocab=300)
    gguf_format.write(tmp / "tiny.gguf", tiny)
    seeds["tiny-llama-f16.gguf"] = (tmp / "tiny.gguf").read_bytes()
    for preset in ("Q8_0", "Q4_1"):
        quantize_file(tmp / "tiny.gguf", tmp / f"tiny-{preset}.gguf", QuantOptions(preset), progress=False)
        seeds[f"tiny-llama-{preset.lower()}.gguf"] = (tmp / f"tiny-{preset}.gguf").read_bytes()
    # the same split in two (llama.cpp's gguf-split layout: the second shard has only split.* keys)
    shards = gguf_format.write(tmp / "split.gguf", tiny, split_max_size=sum(t.nbytes for t in tiny.tensors) * 2 // 3)
    assert len(shards) == 2, shards
    seeds["tiny-llama-split.gguf"] = targets.SEPARATOR.join(p.read_bytes() for p in shards)
    # every other family, as slmpkg converts it from Hugging Face (byte-level BPE vocabularies, fused and
    # sandwich tensors, experts)
    for family, folder in hf.items():
        out = tmp / f"{family}.gguf"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(folder, out, quant="F16", progress=False)
        seeds[f"{family}-f16.gguf"] = out.read_bytes()
    # one tensor of every ggml type (random blocks: every dequantizer runs on them); the types that have
    # no float values (ggml's dot-product types, integers) in a file of their own, as the first refusal ends a read
    rng = np.random.default_rng(0)
    kinds: dict[str, list[LazyTensor]] = {"every-type.gguf": [], "no-values-types.gguf": []}
    for qtype in QuantType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, 256 // block * size, dtype=np.uint8)
        if qtype.name.startswith(("F", "BF")):
            data = np.zeros_like(data)  # floats: zeros rather than NaN patterns
        try:
            dequantize(data, qtype, (1, 256))
            kind = "every-type.gguf"
        except QuantizationError:
            kind = "no-values-types.gguf"
        kinds[kind].append(LazyTensor(f"t.{qtype.name}", (1, 256), qtype, lambda d=data: d))
    md = {"general.architecture": MetaValue(V.STRING, "llama"), "general.alignment": MetaValue(V.UINT32, 64)}
    for name, tensors in kinds.items():
        gguf_format.write(tmp / name, Checkpoint(md, tensors))
        seeds[name] = (tmp / name).read_bytes()
    return seeds


def safetensors_seeds(tmp: Path, hf: dict[str, Path]) -> dict[str, bytes]:
    import numpy as np

    from slmpkg.formats import safetensors as st_format

    names = targets.LAYOUTS["safetensors"]
    seeds = {f"{family}": targets.join("safetensors", _files(folder, names)) for family, folder in hf.items()}
    # the Llama directory with its weights in an index and two shards
    ckpt = st_format.read(hf["llama"])
    size = sum(t.nbytes for t in ckpt.tensors)
    sharded = tmp / "sharded"
    st_format.write(sharded, ckpt, max_shard_size=size * 2 // 3)
    files = _files(sharded, names)
    assert "model.safetensors.index.json" in files and "model-00002-of-00002.safetensors" in files, sorted(files)
    seeds["llama-sharded"] = targets.join("safetensors", {**_files(hf["llama"], names[1:4]), **files})
    # headers with every dtype the format defines, and with the ones slmpkg reads (a refused dtype ends the
    # read), each with an empty tensor, a scalar and __metadata__
    readable = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")
    sizes = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
    for name, dtypes in (("every-dtype", sizes), ("readable-dtypes", readable)):
        entries, offset = {"__metadata__": {"format": "pt"}}, 0
        for dtype in dtypes:
            entries[f"t.{dtype}"] = {"dtype": dtype, "shape": [2, 2], "data_offsets": [offset, offset + 4 * sizes[dtype]]}
            offset += 4 * sizes[dtype]
        entries["empty"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [offset, offset]}
        entries["scalar"] = {"dtype": "F32", "shape": [], "data_offsets": [offset, offset + 4]}
        offset += 4
        header = json.dumps(entries).encode()
        header += b" " * (-len(header) % 8)
        blob = struct.pack("<Q", len(header)) + header + np.arange(offset, dtype=np.uint8).tobytes()
        seeds[name] = targets.join("safetensors", {"model.safetensors": blob})
    return seeds


def onnx_seeds(tmp: Path, hf: dict[str, Path]) -> dict[str, bytes]:
    import onnx

    from slmpkg.formats import onnx_import
    from slmpkg.pipeline import convert
    from test_onnx_import import _genai_build, _optimum_style

    names = targets.LAYOUTS["onnx"]
    seeds: dict[str, bytes] = {}
    # slmpkg's writer: f32 or f16 with its external data file and without the config it embeds (the graph
    # and genai_config.json say everything), and int4 inline with the embedded config
    for family, precision in (("llama", "f32"), ("phi3", "f32"), ("gemma2", "f16"), ("mixtral", "f16")):
        out = tmp / f"onnx-{family}"
        convert(hf[family], out, to="onnx", quant=precision, progress=False)
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        kept = [p for p in model.metadata_props if p.key != onnx_import.CONFIG_PROPERTY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        files = _files(out, names)
        files["model.onnx"] = model.SerializeToString()
        seeds[f"slmpkg-{family}-{precision}"] = targets.join("onnx", files)
    out = tmp / "onnx-int4"
    convert(hf["llama"], out, to="onnx", quant="int4", progress=False)
    files = _files(out, names)
    files["model.onnx"] = _inline(out / "model.onnx")
    del files["model.onnx.data"]
    seeds["slmpkg-llama-int4"] = targets.join("onnx", files)
    # onnxruntime-genai's builder: fp32 (fused qkv; Qwen2's tied embedding through a Transpose) and int4
    for family, precision in (("llama", "fp32"), ("qwen2", "fp32"), ("llama", "int4"), ("qwen2", "int4")):
        out = _genai_build(hf[family], tmp / f"genai-{family}-{precision}", precision)
        files = _files(out, names)
        files["model.onnx"] = _inline(out / "model.onnx")
        files.pop("model.onnx.data", None)
        seeds[f"genai-{family}-{precision}"] = targets.join("onnx", files)
    # optimum's layout: anonymous MatMul weights named by their node's scope, config.json beside
    out = _optimum_style(hf["llama"], tmp / "optimum")
    files = _files(out, names)
    files["model.onnx"] = _inline(out / "model.onnx")
    files.pop("model.onnx.data", None)
    seeds["optimum-llama"] = targets.join("onnx", files)
    return seeds


def tokenizer_seeds(tmp: Path) -> dict[str, bytes]:
    import test_tokenizer as tt

    names = targets.LAYOUTS["tokenizer"]
    makers: dict[str, Callable[[Path], Path]] = {
        "llama3-bpe": lambda p: tt.byte_level_bpe(p, tt.LLAMA3_REGEX, llama3_style=True),
        "qwen2-bpe": lambda p: tt.byte_level_bpe(p, tt.QWEN2_REGEX, llama3_style=False),
        "gpt2-bpe": lambda p: tt.byte_level_bpe(p, None, llama3_style=False, digits=True),
        "spm-bpe": lambda p: tt.spm_bpe(p),
        "gemma-bpe": lambda p: tt.spm_bpe(p, gemma=True),
        "unigram": tt.unigram,
        "wordpiece": tt.wordpiece,
        "sentencepiece-model": tt.sentencepiece_model,
    }
    seeds = {}
    for name, make in makers.items():
        folder = make(tmp / f"tok-{name}")
        seeds[name] = targets.join("tokenizer", _files(folder, names))
    return seeds


def imatrix_seeds(tmp: Path) -> dict[str, bytes]:
    import numpy as np
    from gguf import GGUFValueType as V

    from slmpkg.checkpoint import Checkpoint, LazyTensor, MetaValue
    from slmpkg.formats import gguf as gguf_format

    rng = np.random.default_rng(1)
    sums = {"blk.0.attn_q.weight": (1, 32), "blk.0.ffn_down_exps.weight": (2, 64)}  # one dense, one with 2 experts
    md = {"general.type": MetaValue(V.STRING, "imatrix"),
          "imatrix.datasets": MetaValue(V.ARRAY, ["calibration.txt"], V.STRING),
          "imatrix.chunk_count": MetaValue(V.UINT32, 7), "imatrix.chunk_size": MetaValue(V.UINT32, 512)}
    tensors = []
    for name, (experts, n) in sums.items():
        tensors.append(LazyTensor.from_array(f"{name}.in_sum2", rng.random((experts, n), np.float32) * 40))
        tensors.append(LazyTensor.from_array(f"{name}.counts", np.array([[3.0]] * experts, np.float32)))
    gguf_format.write(tmp / "imatrix.gguf", Checkpoint(md, tensors))
    legacy = [struct.pack("<i", len(sums))]
    for name, (experts, n) in sums.items():
        values = rng.random(experts * n, np.float32)
        legacy += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", 4, values.size), values.tobytes()]
    legacy += [struct.pack("<ii", 9, len("calibration.txt")), b"calibration.txt"]
    return {"gguf-format": (tmp / "imatrix.gguf").read_bytes(), "legacy-dat-format": b"".join(legacy)}


def recipe_seeds() -> dict[str, bytes]:
    every_option = b'''name = "org/tiny"
version = "2.0-rc1"
source = "hf://org/tiny@main"
targets = ["cpu-x86_64", "cpu-arm64", "cuda-sm75", "cuda-sm80"]

[defaults]
imatrix = "imatrix.dat"
tensor_types = ["attn_v=Q8_0", "ffn_down=Q6_K"]
block_size = 64
max_kld = 0.1

[target.cpu-arm64]
format = "gguf"
quant = "Q4_K_M"
pure = true
leave_output_tensor = false
output_tensor_type = "Q8_0"
token_embedding_type = "Q6_K"

[target.cuda-sm75]
format = "onnx"
quant = "int8"
accuracy_level = 4
asymmetric = true
exact_mins = false
dtype = "f16"
min_top1 = 0.5

[target.cuda-sm80]
format = "safetensors"
quant = "f16"

[quality]
text = "eval.txt"
context = 128
chunks = 2
runtime = true

[publish]
registry = "s3://bucket/models"
endpoint_url = "http://localhost:8333"
key = "~/release.pem"
tags = ["latest", "stable"]
expires_days = 30.5
'''
    return {"example.toml": (REPO / "examples" / "slmpkg.toml").read_bytes(), "every-option.toml": every_option}


def signature_seeds(tmp: Path) -> dict[str, bytes]:
    from slmpkg import signing

    folder = tmp / "signed"
    for rel, content in targets.ARTIFACT.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    signer, _ = targets._trusted()
    signing.sign(folder, signer)
    bundle = (folder / signing.DEFAULT_SIGNATURE_NAME).read_bytes()
    payload = base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"])
    return {"bundle": targets.join("signature", {"model.sig": bundle}),
            "statement": targets.join("signature", {"statement": payload})}


def registry_seeds() -> dict[str, dict[str, bytes]]:
    manifest = targets.manifest_of_artifact()
    index = targets.index_statement(manifest)
    return {
        "index": {"index": targets.join("index", {"index statement": index}),
                  "index-and-tag": targets.join("index", {"index statement": index, "tag statement": targets.tag_statement()})},
        "manifest": {"manifest.json": manifest},
    }


def main() -> None:
    from slmpkg.errors import SlmpkgError

    wanted = set(sys.argv[1:]) or set(targets.TARGETS) - {"spm"}
    tmp = Path(tempfile.mkdtemp())
    targets.WORK = tmp / "work"
    try:
        hf = {f: small_hf(tmp / f"hf-{f}", f) for f in FAMILIES} if wanted & {"gguf", "safetensors", "onnx"} else {}
        made: dict[str, dict[str, bytes]] = {}
        for name, make in (("gguf", lambda: gguf_seeds(tmp, hf)), ("safetensors", lambda: safetensors_seeds(tmp, hf)),
                           ("onnx", lambda: onnx_seeds(tmp, hf)), ("tokenizer", lambda: tokenizer_seeds(tmp)),
                           ("imatrix", lambda: imatrix_seeds(tmp)), ("recipe", recipe_seeds),
                           ("signature", lambda: signature_seeds(tmp))):
            if name in wanted:
                made[name] = make()
        made.update({k: v for k, v in registry_seeds().items() if k in wanted})
        for target, seeds in made.items():
            folder = CORPUS / target
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("seed-*"):
                old.unlink()
            for name, data in seeds.items():
                (folder / f"seed-{name}").write_bytes(data)
                # a seed the reader refuses would only test the refusal: every seed must read
                try:
                    targets.run(target, data)
                    targets.TARGETS[target](data)
                except SlmpkgError as e:
                    print(f"warning: seed {target}/{name} is refused: {e}")
            print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values())) // 1024} KiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
