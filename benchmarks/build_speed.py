"""`slmpkg build` to five targets against the single commands a release engineer runs by hand.

Builds a TinyLlama-1.1B-shaped bf16 checkpoint with random weights (2.2 GB, see convert_speed.py), and a
recipe for five targets: cpu-x86_64-avx2 and cpu-x86_64-avx512 (both GGUF Q4_K_M), cpu-arm64 (GGUF Q4_0),
cuda-sm75 (ONNX int4 from the Q4_0 blocks) and cuda-sm80 (safetensors bf16). Then, in this one run:

- the anchor: for each target, the commands that make, sign and publish its artifact from the source,
  as one would without a build tool (`slmpkg convert` to the target's preset, for the ONNX target the
  Q4_0 GGUF first, `slmpkg sign`, `slmpkg push`), one process each, wall times summed;
- `slmpkg build --no-eval` (the same work, each artifact once, one float GGUF for both presets);
- optionally (``--eval``) both again with quality measurement: `slmpkg eval` per target vs `slmpkg build`.

The ratio build / single commands is the figure (goal ≤ 0.6). Each variant runs ``--repeat`` times,
alternating, and the fastest and the median are reported (the machine is shared and noisy).

    python benchmarks/build_speed.py [--layers 22] [--repeat 2] [--eval] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import make_checkpoint  # noqa: E402

TARGETS = {"cpu-x86_64-avx2": "Q4_K_M", "cpu-x86_64-avx512": "Q4_K_M", "cpu-arm64": "Q4_0",
           "cuda-sm75": "onnx", "cuda-sm80": "safetensors"}


def run(argv: list[str], cwd: Path, env: dict) -> float:
    t = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
    return time.monotonic() - t


def single_commands(work: Path, src: Path, key: Path, env: dict, evaluate: bool) -> float:
    """Each target made, (measured,) signed and pushed on its own, as by hand."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    registry = work / "registry"
    total = 0.0
    for target, what in TARGETS.items():
        out = work / target
        if what == "safetensors":
            total += run(["slmpkg", "convert", str(src), "-o", str(out), "--to", "safetensors", "--dtype", "bf16", "-q"], work, env)
        elif what == "onnx":
            total += run(["slmpkg", "convert", str(src), "-o", str(work / "q4_0.gguf"), "--quant", "Q4_0", "-q"], work, env)
            total += run(["slmpkg", "convert", str(work / "q4_0.gguf"), "-o", str(out), "--to", "onnx", "-q"], work, env)
        else:
            out.mkdir()
            total += run(["slmpkg", "convert", str(src), "-o", str(out / f"tiny-{what}.gguf"), "--quant", what, "-q"], work, env)
        if evaluate:
            total += run(["slmpkg", "eval", str(out), "--reference", str(src), "--json"], work, env)
        total += run(["slmpkg", "sign", str(out), "--key", str(key)], work, env)
        total += run(["slmpkg", "push", "tiny:1.0", str(out), "--target", target, "--key", str(key), "--registry",
                      str(registry), "-q"], work, env)
    return total


def build(work: Path, src: Path, key: Path, env: dict, evaluate: bool) -> float:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = work / "slmpkg.toml"
    recipe.write_text(f'name = "tiny"\nversion = "1.0"\nsource = "{src}"\ntargets = {list(TARGETS)!r}\n'
                      f'[publish]\nregistry = "{work / "registry"}"\nkey = "{key}"\n'.replace("'", '"'))
    return run(["slmpkg", "build", str(recipe), "-q"] + ([] if evaluate else ["--no-eval"]), work, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--eval", action="store_true", help="also compare with quality measurement on both sides")
    parser.add_argument("--keep", type=Path, help="work in this directory (the checkpoint is reused)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="build-speed-"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "tinyllama"
    if not (src / "config.json").exists():
        n = make_checkpoint(src, args.layers)
        print(f"checkpoint: {n / 1e9:.2f}B parameters in {src}")
    key = root / "release"
    if not (root / "release.pem").exists():
        subprocess.run(["slmpkg", "keygen", "-o", str(key)], check=True, stdout=subprocess.DEVNULL)
    env = {**os.environ, "SLMPKG_HOME": str(root / "home")}
    variants = [("single commands", single_commands, False), ("slmpkg build --no-eval", build, False)]
    if args.eval:
        variants += [("single commands + eval", single_commands, True), ("slmpkg build", build, True)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(args.repeat):
        for name, fn, evaluate in variants:
            shutil.rmtree(root / "home", ignore_errors=True)
            times[name].append(fn(root / "work", src, Path(f"{key}.pem"), env, evaluate))
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    print(f"\n{len(TARGETS)} targets, {args.layers} layers; fastest and median of {args.repeat} runs each\n")
    print("| what | fastest s | median s | ratio (fastest) | ratio (median) |\n|---|---|---|---|---|")
    for name, _, evaluate in variants:
        anchor = times["single commands + eval" if evaluate else "single commands"]
        best, med = min(times[name]), statistics.median(times[name])
        print(f"| {name} | {best:.1f} | {med:.1f} | {best / min(anchor):.2f}x | {med / statistics.median(anchor):.2f}x |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
