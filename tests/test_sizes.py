"""One size rule for every option that takes a size: K/M/G/T (with or without B) are powers of 1000,
Ki/Mi/Gi/Ti (with or without B) powers of 1024."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from slmpkg.errors import UsageError
from slmpkg.sizes import parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8G", 8 * 10**9), ("8GB", 8 * 10**9), ("8gb", 8 * 10**9), ("8Gi", 8 * 2**30), ("8GiB", 8 * 2**30),
        ("8gib", 8 * 2**30), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("512M", 512 * 10**6),
        ("512MiB", 512 * 2**20), ("10kb", 10_000), ("10K", 10_000), ("10KiB", 10_240), ("2T", 2 * 10**12),
        ("1TiB", 2**40), ("1.5GB", 1_500_000_000), ("1.5GiB", 3 * 2**29), ("0.5KiB", 512), (".5KB", 500),
        ("4096", 4096), ("4096B", 4096), (" 3 MiB ", 3 * 2**20), (123, 123),
        ("1.1GB", 1_100_000_000),  # exact decimal arithmetic, no float rounding
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "2XB", "8 parsecs", "-1GB", "0", "0.1", 0, -5, "1e9", "8Gib2", True, 1.5, None])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


def test_every_size_option_uses_the_one_rule(monkeypatch, tmp_path):
    """convert's --max-shard-size and --split-max-size, pull's --max-memory: same spelling, same bytes."""
    import slmpkg.pipeline
    from slmpkg import cli
    from slmpkg.formats import safetensors

    assert safetensors.parse_size is parse_size  # the writer reads max_shard_size strings with it too
    seen = {}

    def fake_convert(src, dst, **kw):
        seen.update(kw)
        raise UsageError("stop here")

    monkeypatch.setattr(slmpkg.pipeline, "convert", fake_convert)
    r = CliRunner().invoke(cli.main, ["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf"),
                                      "--max-shard-size", "2G", "--split-max-size", "3Gi"])
    assert "stop here" in r.output
    assert seen["max_shard_size"] == 2 * 10**9 and seen["split_max_size"] == 3 * 2**30
