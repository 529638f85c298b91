"""Coverage-guided fuzzing of one target of targets.py with atheris (libFuzzer): any exception other than
SlmpkgError is a crash, and libFuzzer writes the input to ``crash-*``; copy it into the corpus once fixed.

    python tests/fuzz/fuzz.py TARGET CORPUS_DIR [libFuzzer options, e.g. -max_total_time=600]
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["slmpkg"]):
    import targets  # noqa: E402

    # the readers import what they parse with lazily; import them now so they are instrumented
    import slmpkg.formats.gguf, slmpkg.formats.onnx_import, slmpkg.formats.safetensors  # noqa: E401,F401
    import slmpkg.registry, slmpkg.tokenizer  # noqa: E401,F401


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        raise SystemExit(f"usage: fuzz.py {{{','.join(targets.TARGETS)}}} CORPUS [libFuzzer options]")
    name = sys.argv.pop(1)
    atheris.Setup(sys.argv, lambda data: targets.run(name, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
