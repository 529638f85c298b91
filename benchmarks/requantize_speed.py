"""Whole-file quantization: wall time of `slmpkg quantize` vs llama.cpp's llama_model_quantize, same input, same threads.

Builds (see ``real_vocab.py``) a Qwen2.5-0.5B-shaped F16 GGUF with a 152k byte-level BPE vocabulary,
and from it a Q4_K_M made by slmpkg, as on the real model; ``--model llama`` uses instead the
synthetic ~272 M-parameter Llama-shaped F16 GGUF with a tiny vocabulary of earlier versions. Then,
interleaved over --repeat rounds in this one run, quantizes the F16 file to every --presets preset and
re-quantizes the Q4_K_M one (``--allow-requantize``) to every --requantize preset, with slmpkg's
``quantize_file`` and with llama.cpp, each in the same process, and checks the outputs are
byte-identical. Prints the fastest and median seconds and their ratios (slmpkg / llama.cpp; below 1
is faster). ``--baseline DIR`` times another slmpkg source tree (say ``git archive OLD slmpkg | tar -x
-C DIR``) in the same rounds, in a child process that stays up as this one does, and adds the ratio
slmpkg / baseline: before and after measured side by side on the same busy machine.

    python benchmarks/requantize_speed.py [--repeat 3] [--threads 2] [--presets Q8_0,Q4_0,Q4_K_M]
        [--requantize Q8_0,Q4_0] [--cache DIR] [--model qwen|llama] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from open_speed import quiet_stderr  # noqa: E402
from real_vocab import cached_f16  # noqa: E402

from slmpkg.formats import gguf as gguf_format  # noqa: E402
from slmpkg.pipeline import quantize_file  # noqa: E402
from slmpkg.presets import PRESETS, QuantOptions  # noqa: E402


def _tiny_llama():
    spec = importlib.util.spec_from_file_location("make_tiny_llama", ROOT / "examples" / "make_tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_llama


def build(cache: Path, model: str) -> tuple[Path, Path]:
    """The F16 source and the Q4_K_M made from it by slmpkg."""
    if model == "qwen":
        f16 = cached_f16(cache)
    else:
        f16 = cache / "llama-272m-f16.gguf"
        if not f16.exists():
            gguf_format.write(f16, _tiny_llama()(n_layer=6, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=4))
    q4km = f16.with_name(f16.name.replace("-f16", "-Q4_K_M"))
    if not q4km.exists():
        quantize_file(f16, q4km, QuantOptions("Q4_K_M"), progress=False)
    return f16, q4km


class Baseline:
    """``quantize_file`` of another slmpkg source tree, timed in a child process that lives for the
    whole run (its worker pool stays warm, as ours does)."""

    SERVER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from slmpkg.pipeline import quantize_file
from slmpkg.presets import QuantOptions
for line in sys.stdin:
    src, dst, preset, requantize, threads = json.loads(line)
    start = time.perf_counter()
    quantize_file(src, dst, QuantOptions(preset, allow_requantize=requantize), threads=threads, progress=False)
    print(time.perf_counter() - start, flush=True)
"""

    def __init__(self, root: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.SERVER, str(root.resolve())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def time(self, src: Path, dst: Path, preset: str, requantize: bool, threads: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([str(src), str(dst), preset, requantize, threads]) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the baseline failed on {preset}")
        return float(answer)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", default="Q8_0,Q4_0,Q4_K_M", help="from F16; 'all' for every preset")
    parser.add_argument("--requantize", default="Q8_0,Q4_0", help="from the Q4_K_M; 'all' for every preset")
    parser.add_argument("--model", choices=("qwen", "llama"), default="qwen")
    parser.add_argument("--cache", type=Path, help="keep the built GGUFs here (default: a temporary directory)")
    parser.add_argument("--baseline", type=Path, help="another slmpkg source tree to time beside this one")
    args = parser.parse_args()
    from llama_ref import llama_quantize

    def names(spec: str) -> list[str]:
        return [p for p in PRESETS] if spec == "all" else [p for p in spec.split(",") if p]

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        f16, q4km = build(cache, args.model)
        cases = [("F16", f16, p, False) for p in names(args.presets)]
        cases += [("Q4_K_M", q4km, p, True) for p in names(args.requantize)]
        ckpt = gguf_format.read(f16)
        n_params = sum(t.n_elements for t in ckpt.tensors)
        n_vocab = len(ckpt.get("tokenizer.ggml.tokens"))
        ours_out, ref_out, base_out = Path(tmp) / "ours.gguf", Path(tmp) / "ref.gguf", Path(tmp) / "base.gguf"
        baseline: Optional[Baseline] = Baseline(args.baseline) if args.baseline else None
        times: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        base_times: dict[tuple[str, str], list[float]] = {}
        identical: dict[tuple[str, str], bool] = {}
        for round_no in range(args.repeat):
            for source, path, preset, requantize in cases:
                options = QuantOptions(preset, allow_requantize=requantize)

                def ours() -> float:
                    start = time.perf_counter()
                    quantize_file(path, ours_out, options, threads=args.threads, progress=False)
                    return time.perf_counter() - start

                def ref() -> float:
                    start = time.perf_counter()
                    with quiet_stderr():
                        status = llama_quantize(path, ref_out, options.preset.ftype, nthread=args.threads,
                                                allow_requantize=requantize)
                    assert status == 0, f"llama.cpp failed on {preset}"
                    return time.perf_counter() - start

                # alternate who goes first, so neither always meets a warm page cache or a busy neighbour
                if round_no % 2 == 0:
                    t_ours, t_ref = ours(), ref()
                else:
                    t_ref, t_ours = ref(), ours()
                if baseline is not None:
                    base_times.setdefault((source, preset), []).append(
                        baseline.time(path, base_out, preset, requantize, args.threads))
                    if round_no == 0:
                        assert base_out.read_bytes() == ref_out.read_bytes(), f"baseline differs on {preset}"
                mine, theirs = times.setdefault((source, preset), ([], []))
                mine.append(t_ours)
                theirs.append(t_ref)
                if (source, preset) not in identical:
                    identical[(source, preset)] = ours_out.read_bytes() == ref_out.read_bytes()

        if baseline is not None:
            baseline.close()
        print(f"{args.model}: {n_params / 1e6:.0f} M parameters, {n_vocab} tokens; {args.threads} threads each, "
              f"{args.repeat} interleaved rounds; seconds")
        header = (f"{'source':<8}{'preset':<8}{'slmpkg min':>11}{'median':>8}{'llama.cpp min':>14}{'median':>8}"
                  f"{'ratio min':>10}{'median':>8}{'identical':>10}")
        if baseline is not None:
            header += f"{'baseline min':>13}{'median':>8}{'vs base min':>12}{'median':>8}"
        print(header)
        print("-" * len(header))
        for (source, preset), (mine, theirs) in times.items():
            a, b = min(mine), min(theirs)
            am, bm = statistics.median(mine), statistics.median(theirs)
            line = (f"{source:<8}{preset:<8}{a:11.2f}{am:8.2f}{b:14.2f}{bm:8.2f}{a / b:9.2f}×{am / bm:7.2f}×"
                    f"{str(identical[(source, preset)]):>10}")
            if baseline is not None:
                old = base_times[(source, preset)]
                c, cm = min(old), statistics.median(old)
                line += f"{c:13.2f}{cm:8.2f}{a / c:11.2f}×{am / cm:7.2f}×"
            print(line)


if __name__ == "__main__":
    main()
