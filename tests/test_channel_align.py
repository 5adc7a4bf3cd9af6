"""The int8 file's first convs padded to a multiple of 4 input channels (distill/compress/quant/channels.py):
the same outputs bit for bit in ONNX Runtime, and nothing touched where the padding does not apply."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from distill.compress.quant.channels import align_input_channels


def _qdq_conv(cin: int = 1, cout: int = 32, weight_zero: int = 0, shared_input: bool = False, group: int = 1) -> onnx.ModelProto:
    """input (float, N x cin x 8 x 8) -> Q -> DQ -> Conv(DQ(int8 W), bias) -> Relu -> Q -> DQ -> output, as
    the exporter writes a QAT student's first layer (per-channel weight scales, per-tensor activations)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (cout, cin // group, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.uniform(0.001, 0.01, cout).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.full(cout, weight_zero, np.int8), "w_zero"),
        numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"), numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"), numpy_helper.from_array(np.array(0, np.uint8), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xdq"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wdq"], name="dq_w", axis=0),
        helper.make_node("Conv", ["xdq", "wdq", "bias"], ["conv"], name="conv0", pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=group),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("QuantizeLinear", ["relu", "y_scale", "y_zero"], ["yq"], name="q_out"),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["logits"], name="dq_out"),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", cout, 8, 8])]
    if shared_input:  # the quantized input read by a second node as well
        nodes.append(helper.make_node("Identity", ["xq"], ["codes"], name="codes"))
        outputs.append(helper.make_tensor_value_info("codes", TensorProto.UINT8, ["N", cin, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cin, 8, 8])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: str | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized:
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


@pytest.mark.parametrize("cin, wide", [(1, 4), (3, 4), (6, 8)])
def test_a_first_conv_gets_zero_channels_up_to_a_multiple_of_4_and_the_same_outputs(cin, wide, tmp_path):
    plain = _qdq_conv(cin)
    aligned = _qdq_conv(cin)
    assert align_input_channels(aligned) == [f"conv0: input channels {cin} -> {wide}"]
    onnx.checker.check_model(aligned, full_check=True)
    weights = {i.name: numpy_helper.to_array(i) for i in aligned.graph.initializer}
    assert weights["w"].shape == (32, wide, 3, 3) and weights["w"].dtype == np.int8
    assert not weights["w"][:, cin:].any()  # the added channels' weights are zero
    np.testing.assert_array_equal(weights["w"][:, :cin], numpy_helper.to_array(plain.graph.initializer[0]))
    x = (np.random.default_rng(1).random((64, cin, 8, 8), dtype=np.float32) * 6 - 1)  # codes clipped at both ends too
    np.testing.assert_array_equal(_run(aligned, x)[0], _run(plain, x)[0])  # exact: zeros times zero weights
    # ONNX Runtime still runs the conv as its integer kernel, on the widened input
    optimized = str(tmp_path / "optimized.onnx")
    _run(aligned, x[:1], optimized)
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert "QLinearConv" in ops and "Conv" not in ops


@pytest.mark.parametrize("case", ["aligned already", "too few output channels", "asymmetric weights", "shared input", "grouped"])
def test_a_conv_the_padding_does_not_apply_to_is_left_as_it_is(case):
    model = {
        "aligned already": lambda: _qdq_conv(cin=4),
        "too few output channels": lambda: _qdq_conv(cout=8),  # MLAS's fast kernels want >= 16, a multiple of 8
        "asymmetric weights": lambda: _qdq_conv(weight_zero=3),
        "shared input": lambda: _qdq_conv(shared_input=True),  # widening the codes would change the other reader's
        "grouped": lambda: _qdq_conv(cin=2, group=2),
    }[case]()
    before = model.SerializeToString()
    assert align_input_channels(model) == []
    assert model.SerializeToString() == before
