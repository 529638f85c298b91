"""HF → GGUF conversion: wall time and peak RSS of `slmpkg convert` beside llama.cpp's own converter.

Builds a TinyLlama-1.1B-shaped bf16 checkpoint with random weights (2.2 GB; a sentencepiece tokenizer
trained here), then runs, each in its own process, measured in this one run:

- ``slmpkg convert DIR -o out.gguf --quant F16 | Q8_0 | Q4_K_M``
- llama.cpp's ``convert_hf_to_gguf.py --outtype f16 | q8_0``, and for Q4_K_M its f16 output then
  ``llama_model_quantize`` (times and peak RSS of the two steps added / maxed).

llama.cpp's converter comes from the llama-cpp-python 0.3.36 sdist (the version the tests use), which
this script downloads from PyPI into ``--cache`` unless ``--llama-cpp-src`` points at a llama.cpp tree.

    python benchmarks/convert_speed.py [--layers 22] [--presets F16,Q8_0,Q4_K_M] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from slmpkg.checkpoint import Checkpoint, LazyTensor
from slmpkg.formats import safetensors as st_format
from slmpkg.quant import QuantType
from slmpkg.quant.floats import to_bf16_bits

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def llama_cpp_source(cache: Path) -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist (downloaded once from PyPI)."""
    tree = cache / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-d", str(cache), LLAMA_CPP_PYTHON], check=True, stdout=subprocess.DEVNULL)
    sdist = next(cache.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tree, members=[m for m in members if m.name], filter="data")
    return tree


def _sentencepiece_model(vocab: int) -> bytes:
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    words = [("".join(rng.choice(list("etaoinshrdlucmfwypvbgkjqxz"), rng.integers(2, 9)))) for _ in range(4000)]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(20000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    return buf.getvalue()


def make_checkpoint(directory: Path, n_layer: int) -> int:
    """Write the random bf16 checkpoint one tensor at a time; returns its parameter count."""
    c = TINYLLAMA
    h, ff, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h), p + "mlp.down_proj.weight": (h, ff),
        })
    rng = np.random.default_rng(1)

    def random_bf16(shape):
        return lambda: to_bf16_bits((rng.standard_normal(shape, dtype=np.float32) * 0.02)).view(np.uint8)

    tensors = [LazyTensor(n, s, QuantType.BF16, random_bf16(s)) for n, s in shapes.items()]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": n_layer,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, **c}
    sidecar = {
        "config.json": json.dumps(config).encode(),
        "tokenizer.model": _sentencepiece_model(1000),
        "tokenizer_config.json": json.dumps({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
                                             "unk_token": "<unk>"}).encode(),
    }
    st_format.write(directory, Checkpoint({}, tensors, sidecar), max_shard_size="1GB")
    return sum(int(np.prod(s)) for s in shapes.values())


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    # stderr to a file, not a pipe: a chatty child (progress bars) would fill a pipe nobody reads and stall
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{log.read().decode(errors='replace')[-2000:]}")
    return seconds, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


QUANTIZE_SNIPPET = """
import sys, ctypes, llama_cpp
p = llama_cpp.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]); p.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--presets", default="F16,Q8_0,Q4_K_M")
    parser.add_argument("--llama-cpp-src", type=Path)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "slmpkg-bench")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        n = make_checkpoint(args.make, args.layers)
        print(f"checkpoint: {n / 1e9:.2f} B parameters, bf16, {sum(f.stat().st_size for f in args.make.iterdir()) / 1e9:.2f} GB")
        return
    from slmpkg.presets import PRESETS

    tree = args.llama_cpp_src or llama_cpp_source(args.cache)
    work = args.keep or Path(tempfile.mkdtemp(prefix="slmpkg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "TinyLlama-shaped"
    if not src.exists():
        # in a child process: a child forked from a big parent would report the parent's pages as its peak RSS
        subprocess.run([sys.executable, __file__, "--make", str(src), "--layers", str(args.layers)], check=True)
    env = dict(os.environ)
    ref_env = dict(env, PYTHONPATH=str(tree / "gguf-py"))
    slmpkg_cli = shutil.which("slmpkg") or sys.exit("the slmpkg command is not installed")
    header = f"{'preset':<8}{'slmpkg s':>10}{'GB':>7}{'llama.cpp s':>13}{'GB':>7}{'time ratio':>12}{'RSS ratio':>11}"
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        out = work / f"ours-{preset}.gguf"
        t_ours, rss_ours = measure([slmpkg_cli, "convert", str(src), "-o", str(out), "--quant", preset, "-q"], env)
        out.unlink()
        ref = work / f"ref-{preset}.gguf"
        outtype = {"F16": "f16", "Q8_0": "q8_0", "BF16": "bf16", "F32": "f32"}.get(preset, "f16")
        t_ref, rss_ref = measure([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(src), "--outfile", str(ref),
                                  "--outtype", outtype], ref_env)
        if preset not in ("F16", "Q8_0", "BF16", "F32"):
            quantized = work / f"ref-{preset}-q.gguf"
            t_q, rss_q = measure([sys.executable, "-c", QUANTIZE_SNIPPET, str(ref), str(quantized),
                                  str(PRESETS[preset].ftype)], env)
            t_ref, rss_ref = t_ref + t_q, max(rss_ref, rss_q)
            quantized.unlink()
        ref.unlink()
        print(f"{preset:<8}{t_ours:10.1f}{rss_ours:7.2f}{t_ref:13.1f}{rss_ref:7.2f}"
              f"{t_ours / t_ref:11.2f}×{rss_ours / rss_ref:10.2f}×")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
