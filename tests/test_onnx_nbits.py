"""MatMulNBits weights (slmpkg.formats.onnx_nbits) checked against onnxruntime itself.

Every mapping runs as a one-node ONNX model (MatMulNBits, plus the min-term subgraph where used) on an
identity input, so the output is the weight matrix onnxruntime computes with; it is compared with
ggml's dequantized values (slmpkg.quant.dequantize) and with NBitsWeight.dequantize(). from_float is
also compared byte for byte with onnxruntime's own block quantizer (the C++ kernel behind
onnxruntime.quantization.MatMulNBitsQuantizer).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from slmpkg import quant  # noqa: E402
from slmpkg.checkpoint import LazyTensor  # noqa: E402
from slmpkg.errors import FormatError, UsageError  # noqa: E402
from slmpkg.formats import onnx_nbits as nb  # noqa: E402
from slmpkg.quant import QuantType  # noqa: E402

F32 = np.float32
N, K = 24, 512  # K a multiple of 256 for the K-quants


def _session(model: "onnx.ModelProto") -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # other test processes share the machine
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _model(w: nb.NBitsWeight, accuracy_level: int = 0, dtype=np.float32) -> "onnx.ModelProto":
    """X [M, K] → Y [M, N] through MatMulNBits, minus the min term when ``w`` has one."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(w.packed, "B"), numpy_helper.from_array(w.scales, "scales")]
    inputs = ["X", "B", "scales"]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points, "zero_points"))
        inputs.append("zero_points")
    out = "Y" if w.min_term is None else "Y_nbits"
    nodes = [helper.make_node("MatMulNBits", inputs, [out], domain="com.microsoft", **w.attributes(accuracy_level))]
    if w.min_term is not None:
        inits += [
            numpy_helper.from_array(w.min_term, "min_term"),
            numpy_helper.from_array(np.array([0, w.k // w.min_block, w.min_block], np.int64), "block_shape"),
            numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        ]
        nodes += [
            helper.make_node("Reshape", ["X", "block_shape"], ["X_blocks"]),
            helper.make_node("ReduceSum", ["X_blocks", "last_axis"], ["X_sums"], keepdims=0),
            helper.make_node("MatMul", ["X_sums", "min_term"], ["Y_min"]),
            helper.make_node("Sub", [out, "Y_min"], ["Y"]),
        ]
    graph = helper.make_graph(
        nodes, "nbits", [helper.make_tensor_value_info("X", elem, [None, w.k])],
        [helper.make_tensor_value_info("Y", elem, [None, w.n])], inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def ort_weights(w: nb.NBitsWeight, accuracy_level: int = 0, dtype=np.float32) -> np.ndarray:
    """The ``[N, K]`` weights onnxruntime computes with: its output for X = eye(K), transposed."""
    y = _session(_model(w, accuracy_level, dtype)).run(None, {"X": np.eye(w.k, dtype=dtype)})[0]
    return y.T


def random_weights(seed: int, n: int = N, k: int = K) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # rows of different magnitudes and offsets, so scales and minimums span several binades
    return (rng.standard_normal((n, k)) * rng.uniform(0.01, 4.0, (n, 1)) + rng.uniform(-0.5, 0.5, (n, 1))).astype(F32)


def gguf_tensor(qtype: str, seed: int = 0, n: int = N, k: int = K) -> LazyTensor:
    data = quant.quantize(random_weights(seed, n, k), qtype).reshape(-1)
    return LazyTensor(f"blk.0.{qtype.lower()}.weight", (n, k), quant.parse_type(qtype), lambda: data)


def equal_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float values (``-0.0 == 0.0``: an identity matmul sums signed zeros away)."""
    return a.shape == b.shape and bool(np.array_equal(a, b))


# ---------------------------------------------------------------------------------------------------
# packing


def test_packing_is_lsb_first_along_k():
    assert nb.pack_levels(np.array([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43]]
    assert nb.pack_levels(np.array([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    levels = np.random.default_rng(0).integers(0, 16, (3, 64)).astype(np.uint8)
    assert np.array_equal(nb.unpack_levels(nb.pack_levels(levels, 4), 4), levels)


# ---------------------------------------------------------------------------------------------------
# GGUF blocks → MatMulNBits, verified by onnxruntime


EXACT_LAYOUTS = {  # ggml type: (bits, block_size, zero-point tensor present, min term present)
    "Q4_0": (4, 32, False, False),
    "Q8_0": (8, 32, False, False),
    "Q5_0": (8, 32, False, False),
    "Q3_K": (4, 16, False, False),
    "Q6_K": (8, 16, False, False),
    "Q5_1": (8, 32, False, True),
    "Q5_K": (8, 32, False, True),
}


@pytest.mark.parametrize("qtype", sorted(EXACT_LAYOUTS))
def test_exact_mappings_equal_ggml_bit_for_bit(qtype):
    tensor = gguf_tensor(qtype, seed=1)
    w, carry = nb.from_gguf(tensor)
    bits, block_size, has_zp, has_min = EXACT_LAYOUTS[qtype]
    layout = (w.bits, w.block_size, w.zero_points is not None, w.min_term is not None)
    assert layout == (bits, block_size, has_zp, has_min)
    assert carry == nb.Carry(tensor.name, qtype, "exact", 0.0)
    source = tensor.float32()
    got = ort_weights(w)
    assert equal_bits(got, source)
    assert equal_bits(w.dequantize(), source)


@pytest.mark.parametrize("qtype,bits,block_size", [("Q4_1", 4, 32), ("Q4_K", 4, 32), ("Q2_K", 2, 16)])
def test_float_zero_points_within_one_ulp(qtype, bits, block_size):
    tensor = gguf_tensor(qtype, seed=2)
    w, carry = nb.from_gguf(tensor)
    assert (w.bits, w.block_size, w.zero_points.dtype, w.min_term) == (bits, block_size, np.dtype(F32), None)
    source = tensor.float32()
    got = ort_weights(w)
    # NBitsWeight.dequantize models onnxruntime's float-zero-point arithmetic exactly
    assert equal_bits(got, w.dequantize())
    diff = np.abs(got - source)
    # most blocks find a zero point whose product lands on ggml's minimum: bit-exact there
    assert (diff == 0).mean() > 0.8
    # the rest are one ulp of the block's largest term off
    blocks = np.abs(source).reshape(N, -1, block_size).max(axis=2, keepdims=True)
    assert (diff.reshape(N, -1, block_size) <= np.spacing(blocks)).all()
    assert carry.kind == "within 1 ulp"
    assert carry.max_abs_error == float(diff.max()) > 0


@pytest.mark.parametrize("qtype,bits", [("Q4_1", 4), ("Q4_K", 4), ("Q2_K", 2)])
def test_separate_min_term_is_exact(qtype, bits):
    tensor = gguf_tensor(qtype, seed=3)
    w, carry = nb.from_gguf(tensor, separate_min=True)
    assert w.bits == bits and w.min_term is not None and w.zero_points.dtype == np.uint8
    assert carry.kind == "exact" and carry.max_abs_error == 0.0
    assert equal_bits(ort_weights(w), tensor.float32())


def test_zero_subblock_scales_stay_exact():
    # a sub-block far smaller than its neighbours gets a 6-bit scale of 0 in Q4_K: a constant block
    w = random_weights(4, 8, 256)
    w[:, 32:64] = 1e-6
    w[:, :32] *= 1000
    data = quant.quantize(w, "Q4_K").reshape(-1)
    tensor = LazyTensor("flat", (8, 256), QuantType.Q4_K, lambda: data)
    scales, _ = nb.unpack_scales_k4(nb.as_blocks(data, QuantType.Q4_K)["scales"])
    assert (scales == 0).any(), "the test needs a zero sub-block scale"
    got, carry = nb.from_gguf(tensor)
    source = tensor.float32()
    flat = (scales == 0).reshape(8, -1)
    onnx_values = ort_weights(got).reshape(8, -1, 32)
    assert equal_bits(onnx_values[flat], source.reshape(8, -1, 32)[flat])
    assert carry.kind in ("exact", "within 1 ulp")


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS", "F16", "BF16", "F32"])
def test_other_types_are_requantized_and_say_so(qtype):
    source = random_weights(5)
    if qtype in ("F16", "F32"):
        tensor = LazyTensor.from_array("w", source.astype(np.float16 if qtype == "F16" else F32))
    else:
        data = quant.quantize(source, qtype).reshape(-1)
        tensor = LazyTensor("w", source.shape, quant.parse_type(qtype), lambda: data)
    w, carry = nb.from_gguf(tensor, fallback_bits=4, fallback_block_size=64)
    assert (w.bits, w.block_size) == (4, 64)
    assert carry.kind == "requantized" and carry.source_type == qtype
    values = tensor.float32()
    assert carry.max_abs_error == float(np.abs(w.dequantize() - values).max()) > 0
    assert equal_bits(ort_weights(w), w.dequantize())


@pytest.mark.parametrize(
    "qtype,kind", [("Q4_0", "exact"), ("Q8_0", "exact"), ("Q5_0", "exact"), ("Q6_K", "rounded"), ("Q4_K", "rounded")]
)
def test_float16_scales(qtype, kind):
    tensor = gguf_tensor(qtype, seed=6)
    w, carry = nb.from_gguf(tensor, scale_dtype=np.float16)
    assert w.scales.dtype == np.float16
    assert carry.kind == kind
    source = tensor.float32()
    assert carry.max_abs_error == float(np.abs(w.dequantize() - source).max())
    # a float16 graph: onnxruntime computes in float32 from the float16 scales and rounds the output
    got = ort_weights(w, dtype=np.float16)
    assert equal_bits(got, w.dequantize().astype(np.float16))
    if kind == "exact":
        assert equal_bits(got, source.astype(np.float16))


def test_from_gguf_refuses_overflowed_scales():
    w = random_weights(7, 4, 64)
    w[2, :32] -= 1e5  # beyond float16: the block's minimum is stored as -inf
    data = quant.quantize(w, "Q4_1").reshape(-1)
    tensor = LazyTensor("blk.3.attn_k.weight", (4, 64), QuantType.Q4_1, lambda: data)
    with pytest.raises(FormatError, match="blk.3.attn_k.weight: Q4_1 blocks hold non-finite"):
        nb.from_gguf(tensor)


def test_from_gguf_rejects_non_matrices():
    data = quant.quantize(random_weights(0, 4, 64), "Q4_0").reshape(-1)
    tensor = LazyTensor("blk.0.ffn_gate_exps.weight", (2, 2, 64), QuantType.Q4_0, lambda: data)
    with pytest.raises(FormatError, match="blk.0.ffn_gate_exps.weight"):
        nb.from_gguf(tensor)


# ---------------------------------------------------------------------------------------------------
# floats → MatMulNBits: onnxruntime's own quantizer is the reference


def _ort_quantizer(w: np.ndarray, bits: int, block_size: int, symmetric: bool, dtype) -> tuple[np.ndarray, ...]:
    """onnxruntime's C++ block quantizer, called as MatMulNBitsQuantizer calls it."""
    from onnxruntime.capi import _pybind_state as C

    kernel = {2: C.quantize_matmul_2bits, 4: C.quantize_matmul_4bits, 8: C.quantize_matmul_8bits}[bits]
    n, k = w.shape
    kb = -(-k // block_size)
    b = np.pad(w.T.astype(dtype), ((0, kb * block_size - k), (0, 0)))  # MatMul's B: [K, N], padded
    packed = np.zeros((n, kb, block_size * bits // 8), np.uint8)
    zero_points = np.zeros((n, -(-kb * bits // 8)), np.uint8)
    scales = np.zeros((n, kb), dtype)
    kernel(packed, np.ascontiguousarray(b), scales, zero_points, block_size, n, kb * block_size, symmetric)
    return packed, scales, zero_points


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_from_float_matches_onnxruntime(bits, block_size, symmetric):
    w = random_weights(bits * 1000 + block_size, k=512)
    w[0, :block_size] = 0.0  # an all-zero block: scale 0
    w[1, :block_size] = 0.25
    w[1, 3] = -0.25  # equal magnitudes: the minimum wins, as in MLAS
    q = nb.from_float(w, bits=bits, block_size=block_size, symmetric=symmetric)
    packed, scales, zero_points = _ort_quantizer(w, bits, block_size, symmetric, np.float32)
    assert np.array_equal(q.packed, packed)
    assert np.array_equal(q.scales.view(np.uint32), scales.view(np.uint32))
    if symmetric:
        assert q.zero_points is None
    else:
        assert np.array_equal(q.zero_points, zero_points)

    deq = q.dequantize()
    assert equal_bits(ort_weights(q), deq)
    # round to nearest: half a step within the levels' range, at most one step where a level clamps
    s = np.repeat(q.scales.astype(F32), block_size, axis=1)
    zp = np.repeat(q.integer_zero_points().astype(F32), block_size, axis=1)
    ends = np.stack([(0 - zp) * s, ((1 << bits) - 1 - zp) * s])
    inside = (w >= ends.min(axis=0)) & (w <= ends.max(axis=0))
    err = np.abs(deq - w)
    assert (err[inside] <= np.abs(s[inside]) * F32(0.5001)).all()
    assert (err <= np.abs(s) * F32(1.0001)).all()


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_from_float_float16_scales_and_ragged_k(bits, symmetric):
    # float16 weights, as a float16 model holds them; 200 = 3 blocks of 64 + 8: the last one is padded
    w = random_weights(8, k=200).astype(np.float16).astype(F32)
    q = nb.from_float(w, bits=bits, block_size=64, symmetric=symmetric, scale_dtype=np.float16)
    packed, scales, zero_points = _ort_quantizer(w, bits, 64, symmetric, np.float16)
    assert q.scales.dtype == np.float16 and q.packed.shape == (N, 4, 64 * bits // 8)
    assert np.array_equal(q.scales.view(np.uint16), scales.view(np.uint16))
    # padding codes are never read; compare the levels of the real columns
    assert np.array_equal(q.levels()[:, :200], nb.unpack_levels(packed.reshape(N, -1), bits)[:, :200])
    if not symmetric:
        assert np.array_equal(q.zero_points, zero_points)
    assert q.dequantize().shape == (N, 200)
    assert equal_bits(ort_weights(q, dtype=np.float16), q.dequantize().astype(np.float16))


def test_from_float_rejects_bad_arguments():
    w = np.zeros((4, 64), F32)
    with pytest.raises(UsageError, match="bits"):
        nb.from_float(w, bits=3)
    with pytest.raises(UsageError, match="block_size"):
        nb.from_float(w, block_size=24)
    with pytest.raises(UsageError, match="2-D"):
        nb.from_float(np.zeros(64, F32))


def test_weight_shapes_are_checked():
    q = nb.from_float(random_weights(0, 4, 64))
    with pytest.raises(FormatError, match="scales has shape"):
        nb.NBitsWeight(4, 32, 4, 64, q.packed, q.scales[:, :1])
    with pytest.raises(FormatError, match="zero_points"):
        nb.NBitsWeight(4, 32, 4, 64, q.packed, q.scales, np.zeros((4, 2), np.uint8))


# ---------------------------------------------------------------------------------------------------
# facts about onnxruntime's CPU kernel the mappings rely on (recorded in the module docstring)


def test_accuracy_level_4_quantizes_the_input():
    q = nb.from_float(random_weights(9), bits=4, block_size=32)
    assert equal_bits(ort_weights(q, accuracy_level=1), q.dequantize())
    # level 4 quantizes A to int8 per block: not even an identity input survives it exactly
    assert not equal_bits(ort_weights(q, accuracy_level=4), q.dequantize())


@pytest.mark.parametrize("bits", [2, 4])
def test_float_zero_points_are_b_times_scale_minus_zp_times_scale(bits):
    # arbitrary float32 scales (24-bit mantissas) and zero points: onnxruntime rounds B*scale and
    # zp*scale separately, then subtracts (no fused multiply-add, not (B - zp)*scale)
    rng = np.random.default_rng(bits)
    q = nb.from_float(random_weights(11, 32, 1024), bits, 32, symmetric=False)
    scales = (rng.standard_normal((32, 32)) * 0.1).astype(F32)
    zp = rng.uniform(0, (1 << bits) - 1, (32, 32)).astype(F32)
    w = nb.NBitsWeight(bits, 32, 32, 1024, q.packed, scales, zp)
    got = ort_weights(w)
    assert equal_bits(got, w.dequantize())
    levels = w.levels().reshape(32, 32, 32).astype(F32)
    naive = ((levels - zp[:, :, None]) * scales[:, :, None]).reshape(32, 1024)
    assert not equal_bits(got, naive)


def test_cpu_rejects_8_bit_float_zero_points():
    q = nb.from_float(random_weights(10), bits=8, block_size=32, symmetric=False)
    floats = nb.NBitsWeight(8, 32, q.n, q.k, q.packed, q.scales, q.integer_zero_points().astype(F32))
    with pytest.raises(Exception, match="8-bit weights with floating-point zero points"):
        ort_weights(floats)


# ---------------------------------------------------------------------------------------------------
# MatMulNBits → GGUF


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_symmetric_int4_to_q4_0(block_size):
    q = nb.from_float(random_weights(11), bits=4, block_size=block_size)
    qtype, data = nb.to_gguf(q)
    assert qtype is QuantType.Q4_0 and len(data) == quant.row_bytes(qtype, K) * N
    ggml = quant.dequantize(np.frombuffer(data, np.uint8), qtype, (N, K))
    # exact once the scales are rounded to float16, ggml's scale type
    rounded = nb.NBitsWeight(4, block_size, N, K, q.packed, q.scales.astype(np.float16).astype(F32))
    assert equal_bits(ggml, rounded.dequantize())


@pytest.mark.parametrize("block_size", [32, 128])
def test_asymmetric_int4_to_q4_1(block_size):
    q = nb.from_float(random_weights(12), bits=4, block_size=block_size, symmetric=False)
    qtype, data = nb.to_gguf(q)
    assert qtype is QuantType.Q4_1
    ggml = quant.dequantize(np.frombuffer(data, np.uint8), qtype, (N, K))
    # level*d + m with d = fp16(scale), m = fp16(-zp*scale): off by the two fp16 roundings only
    s = np.repeat(np.abs(q.scales), block_size, axis=1)
    zp = np.repeat(q.integer_zero_points().astype(F32), block_size, axis=1)
    bound = 15 * s * 2.0**-11 + zp * s * 2.0**-11 + np.spacing(F32(1.0)) * 16 * s
    assert (np.abs(ggml - q.dequantize()) <= bound).all()
    assert np.abs(ggml - q.dequantize()).max() > 0  # the roundings are real


@pytest.mark.parametrize(
    "qtype,separate_min",
    [("Q4_0", False), ("Q8_0", False), ("Q5_1", False), ("Q4_1", False), ("Q4_1", True)],
)
def test_gguf_round_trip_is_byte_identical(qtype, separate_min):
    tensor = gguf_tensor(qtype, seed=13)
    w, _ = nb.from_gguf(tensor, separate_min=separate_min)
    back, data = nb.to_gguf(w)
    assert back is tensor.qtype and data == tensor.raw().tobytes()


@pytest.mark.parametrize("qtype,back", [("Q5_K", QuantType.Q5_1), ("Q4_K", QuantType.Q4_1)])
def test_k_quants_with_a_min_term_come_back_as_legacy_blocks(qtype, back):
    tensor = gguf_tensor(qtype, seed=14)
    w, _ = nb.from_gguf(tensor, separate_min=True)
    got, data = nb.to_gguf(w)
    assert got is back
    values = quant.dequantize(np.frombuffer(data, np.uint8), got, (N, K))
    source = tensor.float32()
    # K-quant scales d*sc and minimums dmin*m become float16: off by those two roundings only
    s = np.repeat(np.abs(w.scales), 32, axis=1)
    m = np.repeat(np.abs(w.min_term.T), 32, axis=1)
    top = 31 if back is QuantType.Q5_1 else 15
    assert (np.abs(values - source) <= (top * s + m) * 2.0**-11 + np.spacing(np.abs(source))).all()
    # and exact in every block whose scale and minimum float16 holds (a few, for these weights)
    kept = (w.scales.astype(np.float16) == w.scales) & (w.min_term.T.astype(np.float16) == w.min_term.T)
    assert equal_bits(values.reshape(N, -1, 32)[kept], source.reshape(N, -1, 32)[kept])


def test_q5_0_comes_back_as_q8_0_with_the_same_values():
    tensor = gguf_tensor("Q5_0", seed=14)
    w, _ = nb.from_gguf(tensor)
    back, data = nb.to_gguf(w)
    assert back is QuantType.Q8_0
    assert equal_bits(quant.dequantize(np.frombuffer(data, np.uint8), back, (N, K)), tensor.float32())


def test_sixteen_value_blocks_need_equal_scale_pairs():
    w, _ = nb.from_gguf(gguf_tensor("Q6_K", seed=15))
    with pytest.raises(FormatError, match="blk.0.attn_q.weight: block size 16 has two scales"):
        nb.to_gguf(w, name="blk.0.attn_q.weight")
    # pairs that agree are one ggml block
    q = nb.from_float(np.tile(random_weights(15, k=32)[:, :16], (1, 2)), bits=4, block_size=16)
    qtype, data = nb.to_gguf(q)
    assert qtype is QuantType.Q4_0
    rounded = nb.NBitsWeight(4, 16, N, 32, q.packed, q.scales.astype(np.float16).astype(F32))
    assert equal_bits(quant.dequantize(np.frombuffer(data, np.uint8), qtype, (N, 32)), rounded.dequantize())


def test_two_bit_symmetric_to_q4_0():
    q = nb.from_float(random_weights(15), bits=2, block_size=64)
    qtype, data = nb.to_gguf(q)
    assert qtype is QuantType.Q4_0
    rounded = nb.NBitsWeight(2, 64, N, K, q.packed, q.scales.astype(np.float16).astype(F32))
    assert equal_bits(quant.dequantize(np.frombuffer(data, np.uint8), qtype, (N, K)), rounded.dequantize())


def test_to_gguf_refusals_name_the_tensor():
    name = "model.layers.0.mlp.down_proj.MatMul.weight_Q4"
    q8 = nb.from_float(random_weights(16), bits=8, symmetric=False)
    floats = nb.NBitsWeight(8, 32, q8.n, q8.k, q8.packed, q8.scales, q8.integer_zero_points().astype(F32))
    with pytest.raises(FormatError, match=f"{name}: 8-bit weights with float zero points"):
        nb.to_gguf(floats, name=name)
    positive = nb.from_float(np.abs(random_weights(16)), bits=8, symmetric=False)  # zero point 0: levels to 255
    with pytest.raises(FormatError, match="int8"):
        nb.to_gguf(positive, name=name)
    # a min term with 8-bit levels beyond Q5_1's 0..31
    sym8 = nb.from_float(random_weights(16), bits=8)
    wide = nb.NBitsWeight(8, 32, N, K, sym8.packed, sym8.scales, None, np.zeros((K // 32, N), F32), 32)
    with pytest.raises(FormatError, match="leave 0..31; Q5_1"):
        nb.to_gguf(wide, name=name)
    ragged = nb.from_float(random_weights(17, k=48), bits=4, block_size=16)
    with pytest.raises(FormatError, match="not a multiple of 32"):
        nb.to_gguf(ragged, name=name)
