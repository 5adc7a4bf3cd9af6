"""student_int8.onnx's float-output Gemms (the classifier) given int32 biases: ONNX Runtime then runs
them as integer QGemm kernels instead of dequantizing their weights on every call, with the bias
codes it computes itself for the Gemms it fuses (distill/compress/quant/bias.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from distill.compress.quant.bias import bias_codes, quantize_gemm_biases

K, N = 48, 24
SX = np.float32(0.02)


def _weights(per_channel: bool, trans_b: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (N, K) if trans_b else (K, N)).astype(np.int8)
    sw = (rng.random(N) * 0.01 + 0.001).astype(np.float32) if per_channel else np.array(0.004, np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    return w, sw, bias


def _graph(per_channel: bool = True, trans_b: bool = True, after: str | None = None, beta: float = 1.0,
           shared_bias: bool = False, w_axis: int | None = None) -> onnx.ModelProto:
    """``input`` -> Q -> DQ -> Gemm (int8 weight behind a DequantizeLinear, a float bias) -> ``logits``,
    ``after`` the Gemm: nothing (float logits), "q" (QuantizeLinear -> DequantizeLinear) or "relu_q"."""
    w, sw, bias = _weights(per_channel, trans_b)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(sw.shape, np.int8), "zw"),
             numpy_helper.from_array(SX, "sx"), numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             numpy_helper.from_array(bias, "b"), numpy_helper.from_array(np.array(0.05, np.float32), "sy")]
    axis = w_axis if w_axis is not None else (0 if trans_b else 1)
    nodes = [helper.make_node("QuantizeLinear", ["input", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], **({"axis": axis} if per_channel else {})),
             helper.make_node("Gemm", ["xd", "wd", "b"], ["y"], name="fc", transB=int(trans_b), beta=beta)]
    tail = {None: [helper.make_node("Identity", ["y"], ["logits"])],
            "q": [helper.make_node("QuantizeLinear", ["y", "sy", "zx"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "sy", "zx"], ["logits"])],
            "relu_q": [helper.make_node("Relu", ["y"], ["r"]), helper.make_node("QuantizeLinear", ["r", "sy", "zx"], ["yq"]),
                       helper.make_node("DequantizeLinear", ["yq", "sy", "zx"], ["logits"])]}[after]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N])]
    if shared_bias:  # another node reads the same bias
        tail.append(helper.make_node("Add", ["y", "b"], ["also"]))
        outputs.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, ["batch", N]))
    graph = helper.make_graph(nodes + tail, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", K])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _inputs(n: int = 64, seed: int = 1) -> np.ndarray:
    # inside [0, 127 * SX]: activation codes of at most 127, as a QAT student's x86 activations are
    return np.random.default_rng(seed).uniform(0, 2.5, (n, K)).astype(np.float32)


def _run(proto: onnx.ModelProto, x: np.ndarray, tmp: Path, name: str) -> tuple[np.ndarray, list[str]]:
    path = tmp / f"{name}.onnx"
    onnx.save(proto, str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp / f"{name}_optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0], [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize(("per_channel", "trans_b"), [(True, True), (True, False), (False, True)])
def test_a_float_output_gemm_runs_as_an_integer_qgemm_with_the_same_logits(tmp_path, per_channel, trans_b):
    plain = _graph(per_channel, trans_b)
    rewritten = copy.deepcopy(plain)
    assert quantize_gemm_biases(rewritten) == ["fc: bias as int32 codes"]
    onnx.checker.check_model(rewritten, full_check=True)
    x = _inputs()
    want, plain_ops = _run(plain, x, tmp_path, "plain")
    got, ops = _run(rewritten, x, tmp_path, "rewritten")
    # as exported, ONNX Runtime dequantizes the int8 weight on every call and runs a float Gemm
    assert "Gemm" in plain_ops and "DequantizeLinear" in plain_ops and "QGemm" not in plain_ops
    assert "QGemm" in ops and "Gemm" not in ops and "DequantizeLinear" not in ops
    # the bias's rounding (half a code of s_x * s_w at most) and the order of float additions apart
    w, sw, bias = _weights(per_channel, trans_b)
    codes, scale = bias_codes(bias, SX, sw)
    assert np.abs(got - want).max() <= 0.5 * float(scale.max()) + 1e-5 * float(np.abs(want).max())
    # and exactly the integer product: (codes_x . codes_w + bias codes) * s_x * s_w
    xq = np.clip(np.round(x / SX), 0, 255).astype(np.int64)
    acc = xq @ (w.astype(np.int64).T if trans_b else w.astype(np.int64)) + codes
    np.testing.assert_allclose(got, acc * scale.astype(np.float64), rtol=1e-6, atol=1e-6)
    assert not {i.name for i in rewritten.graph.initializer} & {"b"}  # the float bias is gone from the file


def test_the_bias_codes_are_those_onnx_runtime_computes_for_the_gemms_it_fuses(tmp_path):
    # DQ -> Gemm -> Q: ONNX Runtime fuses it and quantizes the float bias itself; the same graph with the
    # bias given as our codes must give the same outputs bit for bit
    plain = _graph(after="q")
    ours = copy.deepcopy(plain)
    inits = {i.name: i for i in ours.graph.initializer}
    codes, scale = bias_codes(numpy_helper.to_array(inits["b"]), numpy_helper.to_array(inits["sx"]), numpy_helper.to_array(inits["sw"]))
    ours.graph.initializer.extend([numpy_helper.from_array(codes, "bq"), numpy_helper.from_array(scale, "bs")])
    gemm = next(n for n in ours.graph.node if n.op_type == "Gemm")
    gemm.input[2] = "bd"
    ours.graph.node.insert(list(ours.graph.node).index(gemm), helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0))
    # biases of many codes' worth and some halfway between two codes
    x = np.concatenate([_inputs(256, 2), np.zeros((1, K), np.float32)])
    want, ops = _run(plain, x, tmp_path, "ort")
    got, _ = _run(ours, x, tmp_path, "ours")
    assert "QGemm" in ops
    np.testing.assert_array_equal(got, want)
    assert quantize_gemm_biases(copy.deepcopy(plain)) == []  # and a requantized Gemm is left to ONNX Runtime


@pytest.mark.parametrize("case", ["q", "relu_q", "beta", "shared_bias", "input_axis_scales"])
def test_gemms_it_must_leave_alone(case):
    proto = {"q": lambda: _graph(after="q"), "relu_q": lambda: _graph(after="relu_q"), "beta": lambda: _graph(beta=0.5),
             "shared_bias": lambda: _graph(shared_bias=True),
             # per-channel weight scales along the input axis: no one scale per output for the bias
             "input_axis_scales": lambda: _graph(w_axis=1)}[case]()
    before = proto.SerializeToString()
    assert quantize_gemm_biases(proto) == []
    assert proto.SerializeToString() == before


def test_a_bias_beyond_int32_codes_stays_float():
    proto = _graph()
    [bias] = [i for i in proto.graph.initializer if i.name == "b"]
    bias.CopyFrom(numpy_helper.from_array(np.full(N, 1e9, np.float32), "b"))  # 1e9 / (0.02 * 0.01) > 2^31
    assert quantize_gemm_biases(proto) == []
    codes, _ = bias_codes(np.full(N, 1e9, np.float32), SX, np.full(N, 0.01, np.float32))
    assert codes is None
