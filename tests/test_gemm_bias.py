"""student_int8.onnx's float-output Gemms (the classifier) given int32 biases: ONNX Runtime then runs
them as integer QGemm kernels instead of dequantizing their weights on every call, with the bias
codes it computes itself for the Gemms it fuses (distill/compress/quant/bias.py)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from distill.compress.quant.bias import bias_codes, quantize_gemm_biases

from .conftest import int32_dot_products

K, N = 48, 24
SX = np.float32(0.02)


def _weights(per_channel: bool, trans_b: bool, k: int = K, n: int = N) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (n, k) if trans_b else (k, n)).astype(np.int8)
    sw = (rng.random(n) * 0.01 + 0.001).astype(np.float32) if per_channel else np.array(0.004, np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return w, sw, bias


def _graph(per_channel: bool = True, trans_b: bool = True, after: str | None = None, beta: float = 1.0,
           shared_bias: bool = False, w_axis: int | None = None, k: int = K, n: int = N, bias_input: bool = False) -> onnx.ModelProto:
    """``input`` -> Q -> DQ -> Gemm (int8 weight behind a DequantizeLinear, a float bias) -> ``logits``,
    ``after`` the Gemm: nothing (float logits), "q" (QuantizeLinear -> DequantizeLinear) or "relu_q"."""
    w, sw, bias = _weights(per_channel, trans_b, k, n)
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
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])]
    if shared_bias:  # another node reads the same bias
        tail.append(helper.make_node("Add", ["y", "b"], ["also"]))
        outputs.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, ["batch", n]))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", k])]
    if bias_input:  # IR < 4 style: the initializer is also a graph input a user may feed
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [n]))
    graph = helper.make_graph(nodes + tail, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    # with every shape recorded, initializers' too, as the exporter writes them: the removed bias's must go
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    if not bias_input:
        model.graph.value_info.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [n]))
    return model


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
    assert "b" in {v.name for v in plain.graph.value_info} and "b" not in {v.name for v in rewritten.graph.value_info}


def _ties() -> onnx.ModelProto:
    """A requantized Gemm (ONNX Runtime fuses it and quantizes the bias itself) of power-of-two scales
    and biases on, and halfway between, their codes: round half to even against half away from zero."""
    proto = _graph(after="q", n=8)
    inits = {i.name: i for i in proto.graph.initializer}
    inits["sx"].CopyFrom(numpy_helper.from_array(np.array(2.0**-6, np.float32), "sx"))
    inits["sw"].CopyFrom(numpy_helper.from_array(np.full(8, 2.0**-8, np.float32), "sw"))
    halves = (np.arange(8) - 4 + 0.5) * 2.0**-14  # codes -3.5 .. 3.5: ties everywhere
    inits["b"].CopyFrom(numpy_helper.from_array(halves.astype(np.float32), "b"))
    return proto


def _onnx_runtimes_bias_codes(proto: onnx.ModelProto, tmp: Path) -> np.ndarray:
    """The int32 bias ONNX Runtime folded into the QGemm it made of ``proto``'s Gemm (QGemm's input 6)."""
    _, ops = _run(proto, _inputs(2)[:, : proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value], tmp, "fused")
    optimized = onnx.load(str(tmp / "fused_optimized.onnx"))
    [qgemm] = [n for n in optimized.graph.node if n.op_type == "QGemm"]
    folded = {i.name: numpy_helper.to_array(i) for i in optimized.graph.initializer}
    return folded[qgemm.input[6]]


@pytest.mark.parametrize("case", ["random", "ties"])
def test_the_bias_codes_are_those_onnx_runtime_computes_for_the_gemms_it_fuses(tmp_path, case):
    proto = _graph(after="q") if case == "random" else _ties()
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    codes, _ = bias_codes(inits["b"], inits["sx"], inits["sw"])
    theirs = _onnx_runtimes_bias_codes(proto, tmp_path)
    np.testing.assert_array_equal(codes, theirs)
    if case == "ties":
        np.testing.assert_array_equal(codes, [-4, -2, -2, 0, 0, 2, 2, 4])  # half to even (half away from zero: -4, -3, ...)
    assert quantize_gemm_biases(proto) == []  # and a requantized Gemm is left to ONNX Runtime


@pytest.mark.skipif(not int32_dot_products(), reason="this CPU adds ONNX Runtime's u8 x s8 products in int16 pairs (no VNNI): "
                    "codes past 127 saturate in QGemm, where the exporter's float Gemm was exact")
def test_beyond_the_trained_ranges_the_rewritten_gemm_still_gives_the_float_logits(tmp_path):
    plain = _graph()
    rewritten = copy.deepcopy(plain)
    quantize_gemm_biases(rewritten)
    x = _inputs() * 2  # codes up to 250
    want, _ = _run(plain, x, tmp_path, "plain")
    got, _ = _run(rewritten, x, tmp_path, "rewritten")
    _, sw, _ = _weights(True, True)
    assert np.abs(got - want).max() <= 0.5 * float(SX * sw.max()) + 1e-5 * float(np.abs(want).max())


@pytest.mark.parametrize("case", ["q", "relu_q", "beta", "shared_bias", "input_axis_scales", "bias_input"])
def test_gemms_it_must_leave_alone(case):
    proto = {"q": lambda: _graph(after="q"), "relu_q": lambda: _graph(after="relu_q"), "beta": lambda: _graph(beta=0.5),
             "shared_bias": lambda: _graph(shared_bias=True),
             # per-channel weight scales along the input axis (a square weight: their count fits either axis)
             "input_axis_scales": lambda: _graph(w_axis=1, k=N, n=N),
             "bias_input": lambda: _graph(bias_input=True)}[case]()
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


def test_a_negative_weight_axis_is_the_same_axis():
    proto = _graph(trans_b=False, w_axis=-1)  # axis -1 of a (K, N) weight: per output, as axis 1
    assert quantize_gemm_biases(proto) == ["fc: bias as int32 codes"]


def test_a_rewrite_that_fails_ships_the_graph_without_it(tmp_path, monkeypatch, caplog):
    from distill.compress import deploy

    def broken(proto):
        raise ValueError("no such node")

    monkeypatch.setattr(deploy, "quantize_gemm_biases", broken)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    with caplog.at_level(logging.WARNING):
        path = deploy.save_onnx(model, torch.zeros(2, 1, 8, 8), tmp_path / "student_int8.onnx", int32_biases=True)
    assert deploy.read_rewrites(path) == () and "biases are not int32 codes (ValueError: no such node)" in caplog.text
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(deploy.OnnxRuntimeModel(path, threads=1)(x), model(x), atol=1e-5)
