"""Byte-identity with ggml: the golden vectors, and live comparisons against ggml's C quantizer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from slmpkg import quant
from slmpkg.errors import QuantizationError
from slmpkg.quant import QuantType as T

QUANT_TYPES = [
    T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
    T.IQ4_NL, T.IQ4_XS,
]
FLOAT_TYPES = [T.F16, T.BF16]
IMATRIX_TYPES = [t for t in QUANT_TYPES if t is not T.Q8_0]
CASES = ["normal", "heavy_tail", "edge", "bf16_weights", "sparse"]


def _first_difference(ours: np.ndarray, ref: np.ndarray) -> str:
    rows, cols = np.nonzero(ours != ref)
    if rows.size == 0:
        return "identical"
    return f"{rows.size} bytes differ; first at row {rows[0]}, byte {cols[0]}: {ours[rows[0], cols[0]]} != {ref[rows[0], cols[0]]}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_golden_without_imatrix(golden, case, qtype):
    ours = quant.quantize(golden[f"{case}/input"], qtype)
    ref = golden[f"{case}/{qtype.name}"]
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), _first_difference(ours, ref)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("qtype", IMATRIX_TYPES, ids=lambda t: t.name)
def test_golden_with_imatrix(golden, case, qtype):
    ours = quant.quantize(golden[f"{case}/input"], qtype, imatrix=golden[f"{case}/imatrix"])
    ref = golden[f"{case}/{qtype.name}+imatrix"]
    assert np.array_equal(ours, ref), _first_difference(ours, ref)


def _fresh(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    rows, cols = shape
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "laplace_scaled":  # per-row scales across many orders of magnitude
        x = rng.laplace(size=shape) * 10.0 ** rng.uniform(-6, 3, (rows, 1))
    elif kind == "uniform_positive":  # all-positive rows: mins clamp to 0
        x = rng.uniform(0.1, 2.0, shape)
    elif kind == "sparse_outliers":  # zeros, signed zeros, lone outliers, bf16-rounded values
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.15)
        x[rng.random(shape) < 0.01] *= 50
        x = np.where(rng.random(shape) < 0.3, -0.0, x)
        x = (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(x, dtype=np.float32)


KINDS = ["normal", "laplace_scaled", "uniform_positive", "sparse_outliers"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_live_against_ggml(ggml, qtype, kind):
    rng = np.random.default_rng([int(qtype), KINDS.index(kind)])
    for shape in [(5, 256), (3, 1536)]:
        x = _fresh(kind, shape, rng)
        ref = ggml.quantize(x, qtype)
        ours = quant.quantize(x, qtype, threads=2)
        assert np.array_equal(ours, ref), f"{shape}: " + _first_difference(ours, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", IMATRIX_TYPES, ids=lambda t: t.name)
def test_live_against_ggml_with_imatrix(ggml, qtype, kind):
    rng = np.random.default_rng([int(qtype), KINDS.index(kind), 1])
    for shape in [(5, 256), (3, 1536)]:
        x = _fresh(kind, shape, rng)
        imatrix = (rng.gamma(0.5, 2.0, shape[1]) * (rng.random(shape[1]) > 0.05)).astype(np.float32)
        ref = ggml.quantize(x, qtype, imatrix)
        ours = quant.quantize(x, qtype, imatrix=imatrix)
        assert np.array_equal(ours, ref), f"{shape}: " + _first_difference(ours, ref)


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_ggml(ggml, qtype):
    rng = np.random.default_rng(int(qtype))
    x = _fresh("laplace_scaled", (6, 512), rng)
    blocks = ggml.quantize(x, qtype)
    ref = ggml.dequantize(blocks, qtype, x.shape)
    ours = quant.dequantize(blocks, qtype, x.shape)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_conversion_of_every_kind_of_float32_like_ggml(ggml, qtype):
    """A million float32 bit patterns spread over the whole range (NaNs with payloads, infinities,
    overflow, subnormals, rounding ties): ggml's fp16/bf16 bits, NaNs included (ggml makes every fp16
    NaN the quiet 0x7E00; numpy's cast would keep payloads)."""
    patterns = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)[: 1024 * 1000]
    x = patterns.view(np.float32).reshape(-1, 1024)
    assert np.array_equal(quant.quantize(x, qtype), ggml.quantize(x, qtype))


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes_matches_ggml(ggml, monkeypatch, qtype):
    """Every bit pattern a block can hold (NaN and infinite scales, every level), across chunk
    boundaries: ggml's ``to_float`` bit for bit."""
    import slmpkg.quant._common as common
    from slmpkg.quant import floats

    monkeypatch.setattr(common, "DEQUANT_CHUNK_ELEMENTS", 2048)
    monkeypatch.setattr(floats, "DEQUANT_CHUNK_ELEMENTS", 2048)
    rng = np.random.default_rng(int(qtype) + 100)
    shape = (7, 1024)
    nbytes = shape[0] * quant.row_bytes(qtype, shape[1])
    data = rng.integers(0, 256, nbytes, dtype=np.uint8)
    if qtype is T.F16:  # every fp16 pattern, signaling NaNs included
        data[: 2 * 4096] = np.arange(0, 65536, 16, dtype=np.uint32).astype(np.uint16).view(np.uint8)
    ref = ggml.dequantize(data, qtype, shape)
    ours = quant.dequantize(data, qtype, shape)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_threads_and_chunks_do_not_change_bytes(monkeypatch):
    x = _fresh("normal", (37, 512), np.random.default_rng(7))
    whole = {t: quant.quantize(x, t, threads=1) for t in (T.Q4_K, T.Q4_0)}
    for qtype, expected in whole.items():  # many small work items over several threads
        monkeypatch.setitem(quant.KERNELS, qtype, dataclasses.replace(quant.KERNELS[qtype], chunk_elements=512))
        assert np.array_equal(quant.quantize(x, qtype, threads=3), expected)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_1, T.Q4_0, T.Q5_0, T.Q3_K, T.Q4_K], ids=lambda t: t.name)
def test_one_row_chunks_with_imatrix(ggml, monkeypatch, qtype):
    """A work item of a single row must still sum that row in C's order (row-wide sigma2)."""
    rng = np.random.default_rng(0)
    x = (rng.laplace(size=(40, 768)) * 10.0 ** rng.uniform(-3, 3, (40, 1))).astype(np.float32)
    imatrix = rng.gamma(0.5, 2.0, 768).astype(np.float32)
    monkeypatch.setitem(quant.KERNELS, qtype, dataclasses.replace(quant.KERNELS[qtype], chunk_elements=1))
    assert np.array_equal(quant.quantize(x, qtype, imatrix=imatrix, threads=1), ggml.quantize(x, qtype, imatrix))


@pytest.mark.parametrize(("src", "dst"), [(T.F16, T.Q4_K), (T.Q5_0, T.Q4_0), (T.Q8_0, T.Q6_K), (T.Q4_K, T.Q3_K)],
                         ids=lambda t: t.name)
def test_convert_in_work_items_matches_ggml(ggml, monkeypatch, src, dst):
    """``quant.convert`` (what the worker processes run: dequantize and quantize one work item at a
    time) gives ggml's bytes for ggml's floats of the source, over many work items (the last one
    short) and with an importance matrix."""
    rng = np.random.default_rng([int(src), int(dst)])
    x = _fresh("laplace_scaled", (23, 512), rng)
    stored = ggml.quantize(x, src)
    floats = ggml.dequantize(stored, src, x.shape)
    monkeypatch.setitem(quant.KERNELS, dst, dataclasses.replace(quant.KERNELS[dst], chunk_elements=3 * 512))
    for imatrix in (None, rng.gamma(0.5, 2.0, 512).astype(np.float32)):
        ours = quant.convert(stored, src, dst, x.shape, imatrix)
        assert np.array_equal(ours, ggml.quantize(floats, dst, imatrix)), _first_difference(ours, ggml.quantize(floats, dst, imatrix))


def test_convert_refuses_a_wrong_byte_count():
    with pytest.raises(QuantizationError, match="needs 36 bytes; got 34"):
        quant.convert(np.zeros(34, np.uint8), "Q4_0", "Q8_0", (2, 32))


def test_rows_not_divisible_by_block():
    with pytest.raises(QuantizationError, match="multiple of 256"):
        quant.quantize(np.zeros((2, 96), np.float32), "Q4_K")


def test_imatrix_of_wrong_length():
    with pytest.raises(QuantizationError, match="importance matrix has 10 values"):
        quant.quantize(np.zeros((2, 256), np.float32), "Q4_K", imatrix=np.ones(10, np.float32))


def test_unknown_type():
    with pytest.raises(QuantizationError, match="unknown quantization type 'Q9_9'"):
        quant.quantize(np.zeros((2, 256), np.float32), "Q9_9")
