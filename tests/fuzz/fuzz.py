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

with atheris.instrument_imports(include=["slmpkg"]):
    import slmpkg
    import targets  # noqa: E402

    # the readers import what they use lazily: import every module now, so all of it is instrumented
    for module in pkgutil.walk_packages(slmpkg.__path__, "slmpkg."):
        try:
            importlib.import_module(module.name)
        except ImportError:  # an optional dependency that is not installed (that module is not fuzzed)
            pass


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
