"""An int8 file's activation codes clamped to the integer model's 0..127 (distill/compress/quant/clamp.py):
the clamped file computes with codes of at most 127 where the shipped one lets them reach 255."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from distill.compress.quant.clamp import clamp_activation_codes


def _graph(zero_dtype: int = TensorProto.UINT8) -> onnx.ModelProto:
    """input -> Q (scale 1) -> DQ -> output: the codes themselves come out."""
    zero = np.array(0, np.uint8 if zero_dtype == TensorProto.UINT8 else np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "s"), numpy_helper.from_array(zero, "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_codes_past_127_are_clamped_as_the_integer_model_does():
    x = np.array([[-3.0, 5.0, 127.0, 200.0]], np.float32)
    shipped = _graph()
    clamped = copy.deepcopy(shipped)
    assert clamp_activation_codes(clamped) == ["q: codes clamped to 0..127"]
    onnx.checker.check_model(clamped, full_check=True)
    np.testing.assert_array_equal(_run(shipped, x), [[0, 5, 127, 200]])  # QuantizeLinear saturates at 255 only
    np.testing.assert_array_equal(_run(clamped, x), [[0, 5, 127, 127]])
    other = _graph()
    clamp_activation_codes(other, high=15)  # a 4-bit range
    np.testing.assert_array_equal(_run(other, x), [[0, 5, 15, 15]])


def test_signed_codes_are_left_alone():
    proto = _graph(TensorProto.INT8)
    before = proto.SerializeToString()
    assert clamp_activation_codes(proto) == []
    assert proto.SerializeToString() == before
