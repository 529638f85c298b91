"""HF → ONNX int4: wall time and peak RSS of `slmpkg convert --to onnx` beside onnxruntime-genai's builder.

Uses the TinyLlama-1.1B-shaped bf16 checkpoint of ``convert_speed.py`` (random weights, 2.2 GB), then
runs, each in its own process, measured in this one run:

- ``slmpkg convert DIR -o OUT --to onnx --quant int4`` (block size 32, symmetric)
- ``python -m onnxruntime_genai.models.builder -m DIR -o OUT -p int4 -e cpu`` (the builder loads the
  model with transformers, builds the graph, then quantizes its MatMuls with onnxruntime's
  ``MatMulNBitsQuantizer``)

Both outputs are then loaded by onnxruntime and run on the same prompt, so the table only compares
artifacts that work. The goal (issue 4): slmpkg ≤ 0.5× the builder's time and ≤ 0.25× its peak RSS.

    python benchmarks/onnx_speed.py [--layers 22] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import measure  # noqa: E402  (the same checkpoint and the same measurement)


def logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """Prompt logits from onnxruntime, with an empty KV cache (proves the artifact runs)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]  # the builder leaves them symbolic
    feeds: dict[str, np.ndarray] = {"input_ids": np.array([ids], np.int64),
                                    "attention_mask": np.ones((1, len(ids)), np.int64)}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((1, heads, 0, head_dim), dtype)
    return sess.run(["logits"], feeds)[0][0].astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        sys.exit("onnxruntime-genai is not installed (pip install -e '.[dev]')")
    work = args.keep or Path(tempfile.mkdtemp(prefix="slmpkg-onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "TinyLlama-shaped"
    if not src.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("convert_speed.py")), "--make", str(src),
                        "--layers", str(args.layers)], check=True)
    env = dict(os.environ)
    slmpkg_cli = shutil.which("slmpkg") or sys.exit("the slmpkg command is not installed")
    ours, theirs = work / "slmpkg-int4", work / "builder-int4"
    for out in (ours, theirs):
        shutil.rmtree(out, ignore_errors=True)
    t_ours, rss_ours = measure([slmpkg_cli, "convert", str(src), "-o", str(ours), "--to", "onnx", "--quant", "int4", "-q"], env)
    t_ref, rss_ref = measure([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(src), "-o", str(theirs),
                              "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")], env)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir()) / 1e9
    ids = [1, 450, 4996, 17354, 1701, 432, 17204]
    a, b = logits(ours, ids), logits(theirs, ids)
    agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    header = f"{'tool':<28}{'seconds':>9}{'peak GB':>9}{'size GB':>9}"
    print(header)
    print("-" * len(header))
    print(f"{'slmpkg convert --quant int4':<28}{t_ours:9.1f}{rss_ours:9.2f}{size(ours):9.2f}")
    print(f"{'onnxruntime-genai builder':<28}{t_ref:9.1f}{rss_ref:9.2f}{size(theirs):9.2f}")
    print(f"ratio: time {t_ours / t_ref:.2f}×, peak RSS {rss_ours / rss_ref:.2f}× (goal ≤ 0.5×, ≤ 0.25×); "
          f"both run in onnxruntime, argmax agreement on the prompt {agree:.0%} (random weights)")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
