"""The int8 file's first convs padded to a multiple of 4 input channels (distill/compress/quant/channels.py):
the same outputs bit for bit in ONNX Runtime, and nothing touched where the padding does not apply."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from distill.compress.quant.channels import align_input_channels, generic_int8_convs


def _qdq_conv(cin: int = 1, cout: int = 32, weight_zero: int = 0, shared_input: bool = False, group: int = 1,
              tied: bool = False, scale_axis: int = 0) -> onnx.ModelProto:
    """input (float, N x cin x 8 x 8) -> Q -> DQ -> Conv(DQ(int8 W), bias) -> Relu -> Q -> DQ -> output, as
    the exporter writes a QAT student's first layer (per-channel weight scales, per-tensor activations)."""
    rng = np.random.default_rng(0)
    # weights within +-64: two products of codes up to 255 fit in int16, so ONNX Runtime's kernels add
    # them exactly on every CPU (without VNNI, MLAS adds u8 x s8 products in int16 pairs: see conftest)
    w = rng.integers(-64, 65, (cout, cin // group, 3, 3)).astype(np.int8)
    scales = w.shape[scale_axis]  # per output channel (axis 0), as QAT writes them, or along the input channels
    inits = [
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.uniform(0.001, 0.01, scales).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.full(scales, weight_zero, np.int8), "w_zero"),
        numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"), numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"), numpy_helper.from_array(np.array(0, np.uint8), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xdq"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wdq"], name="dq_w", axis=scale_axis),
        helper.make_node("Conv", ["xdq", "wdq", "bias"], ["conv"], name="conv0", pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=group),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("QuantizeLinear", ["relu", "y_scale", "y_zero"], ["yq"], name="q_out"),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["logits"], name="dq_out"),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", cout, 8, 8])]
    if shared_input:  # the quantized input read by a second node as well
        nodes.append(helper.make_node("Identity", ["xq"], ["codes"], name="codes"))
        outputs.append(helper.make_tensor_value_info("codes", TensorProto.UINT8, ["N", cin, 8, 8]))
    if tied:  # a second conv, on its own quantized copy of the input, reads the same dequantized weight
        nodes.append(helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["xq2"], name="q_in2"))
        nodes.append(helper.make_node("DequantizeLinear", ["xq2", "x_scale", "x_zero"], ["xdq2"], name="dq_in2"))
        nodes.append(helper.make_node("Conv", ["xdq2", "wdq"], ["conv2"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        outputs.append(helper.make_tensor_value_info("conv2", TensorProto.FLOAT, ["N", cout, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cin, 8, 8])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    # with every intermediate shape recorded, as the exporter writes them: the ones the padding changes must go
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
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
    assert {v.name for v in aligned.graph.value_info} >= {"conv", "relu"}  # the shapes it did not change stay
    x = (np.random.default_rng(1).random((64, cin, 8, 8), dtype=np.float32) * 7 - 1)  # codes clipped at both ends too
    assert (x / 0.02 >= 255).any() and (x < 0).any()
    np.testing.assert_array_equal(_run(aligned, x)[0], _run(plain, x)[0])  # exact: zeros times zero weights
    if cin == 1:  # one real channel: an inf or NaN stays in it (the padded ones meet zero weights)
        x[0, 0, 2, 3], x[1, 0, 4, 4], x[2, 0, 0, 0] = np.inf, -np.inf, np.nan
        np.testing.assert_array_equal(_run(aligned, x)[0], _run(plain, x)[0])
    # ONNX Runtime still runs the conv as its integer kernel, on the widened input
    optimized = str(tmp_path / "optimized.onnx")
    _run(aligned, x[:1], optimized)
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert "QLinearConv" in ops and "Conv" not in ops


@pytest.mark.parametrize("case", ["aligned already", "too few output channels", "asymmetric weights", "shared input", "grouped",
                                  "tied weight", "scales along the input channels"])
def test_a_conv_the_padding_does_not_apply_to_is_left_as_it_is(case):
    model = {
        "aligned already": lambda: _qdq_conv(cin=4),
        "too few output channels": lambda: _qdq_conv(cout=8),  # MLAS's fast kernels want >= 16, a multiple of 8
        "asymmetric weights": lambda: _qdq_conv(weight_zero=3),
        "shared input": lambda: _qdq_conv(shared_input=True),  # widening the codes would change the other reader's
        "grouped": lambda: _qdq_conv(cin=2, group=2),
        "tied weight": lambda: _qdq_conv(tied=True),  # the other conv would read a widened weight on a narrow input
        "scales along the input channels": lambda: _qdq_conv(cin=2, scale_axis=1),  # they would have to grow too
    }[case]()
    before = model.SerializeToString()
    assert align_input_channels(model) == []
    assert model.SerializeToString() == before


def test_the_convs_left_on_onnx_runtimes_generic_path_are_named():
    assert generic_int8_convs(_qdq_conv(cin=1)) == ["conv0 (1 -> 32 channels)"]
    assert generic_int8_convs(_qdq_conv(cin=4, cout=8)) == ["conv0 (4 -> 8 channels)"]
    aligned = _qdq_conv(cin=1)
    align_input_channels(aligned)
    assert generic_int8_convs(aligned) == [] and generic_int8_convs(_qdq_conv(cin=8, cout=24)) == []


def test_a_padding_that_fails_ships_the_exporters_graph(tmp_path, monkeypatch, caplog):
    from distill.compress import deploy

    def broken(proto):
        raise ValueError("no such node")

    monkeypatch.setattr(deploy, "align_input_channels", broken)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(16 * 64, 4))
    with caplog.at_level(logging.WARNING):
        path = deploy.save_onnx(model, torch.zeros(2, 1, 8, 8), tmp_path / "student_int8.onnx", align_channels=True)
    assert deploy.read_rewrites(path) == () and "not padded (ValueError: no such node)" in caplog.text
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(deploy.OnnxRuntimeModel(path, threads=1)(x), model(x), atol=1e-5, rtol=1e-5)
