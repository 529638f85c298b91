"""Every input the fuzzers kept (tests/fuzz/corpus/<target>/: the seeds, the inputs that found new coverage,
and each crash once fixed) goes through its reader again: only SlmpkgError may come out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

CASES = sorted((d.name, p) for d in (FUZZ / "corpus").iterdir() if d.is_dir() for p in d.iterdir() if p.is_file())


def test_every_target_has_a_corpus():
    assert {name for name, _ in CASES} == set(targets.TARGETS)


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_corpus_inputs_raise_only_slmpkg_errors(target, tmp_path, monkeypatch):
    monkeypatch.setattr(targets, "WORK", tmp_path)
    inputs = [p for name, p in CASES if name == target]
    for path in inputs:
        try:
            targets.run(target, path.read_bytes())
        except Exception as e:  # noqa: BLE001 - the point: name the input that escaped
            raise AssertionError(f"{target} corpus input {path.name}: {type(e).__name__}: {e}") from e
