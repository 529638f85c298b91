"""Coverage-guided fuzzing of one target of targets.py with atheris (libFuzzer): any exception other than
SlmpkgError is a crash, and libFuzzer writes the input to ``crash-*``; once fixed, copy it into the corpus
as ``crash-<what>``. The dictionary ``slmpkg.dict`` (the file separator of multi-file inputs, format keys)
is passed unless ``-dict=`` is given.

    python tests/fuzz/fuzz.py TARGET CORPUS_DIR [libFuzzer options, e.g. -max_total_time=600]

Minimize a grown corpus into a fresh directory before committing it:

    python tests/fuzz/fuzz.py TARGET NEW_DIR tests/fuzz/corpus/TARGET -merge=1
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _import_all(package) -> None:
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            importlib.import_module(module.name)
        except ImportError:  # an optional dependency that is not installed (that module is not fuzzed)
            pass


# The quantization kernels are numpy arithmetic, not parsers (they are checked byte for byte against ggml
# in the tests): imported before instrumentation, they run uninstrumented. Instrumented, atheris's hooks
# on their array operations grow the process by ~16 KB per input (3 GB in a 10-minute run).
import slmpkg.quant  # noqa: E402

_import_all(slmpkg.quant)

with atheris.instrument_imports(include=["slmpkg"]):
    import slmpkg
    import targets  # noqa: E402

    # the readers import what they use lazily: import every module now, so all of it is instrumented
    _import_all(slmpkg)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        raise SystemExit(f"usage: fuzz.py {{{','.join(targets.TARGETS)}}} CORPUS [libFuzzer options]")
    name = sys.argv.pop(1)
    if not any(a.startswith("-dict=") for a in sys.argv):
        sys.argv.append(f"-dict={HERE / 'slmpkg.dict'}")
    atheris.Setup(sys.argv, lambda data: targets.run(name, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
