"""student_int8.onnx: the QAT student as QuantizeLinear / DequantizeLinear nodes carrying the learned
scales, int8 weights per channel, run by ONNX Runtime as integer kernels, agreeing with PyTorch's
integer model; its fp32 form is the trained weights conv-BN folded."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from distill.compress.deploy import OnnxRuntimeModel, export_artifacts, read_rewrites, save_onnx
from distill.compress.quant import backend as quant_backend
from distill.compress.quant.channels import align_input_channels
from distill.compress.quant.onnx_index import GraphIndex
from distill.compress.quant.qdq import QDQModels, qdq_models
from distill.compress.technique import QuantizedDeployable

from .conftest import int32_dot_products

pytestmark = pytest.mark.xdist_group("qdq")  # its module fixture converts and exports a trained student per flow


class Net(nn.Module):
    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        # bn=False where the test is not about BatchNorm: PT2E's conversion of a conv-BN student
        # takes tens of seconds here (torchao exports its conv-BN fold patterns on every call).
        # 16 output channels in the first conv: the least ONNX Runtime's fast int8 conv kernels take,
        # so the shipped file pads its single input channel to 4 (distill/compress/quant/channels.py)
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16) if bn else nn.Identity(),
                                      nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 4


FLOWS = ["pt2e", "fx"]


def _prepared(bits: int, flow: str = "pt2e", bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    prepared = quant_backend.prepare_qat(Net(bn), bits, True, _data(1, 0), flow=flow)
    assert quant_backend.flow_of(prepared) == flow
    for i in range(10):  # "training": the observers set the scales
        prepared(_data(64, i))
    prepared.eval()
    quant_backend.set_observers(prepared, False)
    return prepared


def _graph(prepared: nn.Module) -> torch.fx.GraphModule:
    return prepared.graph_module if isinstance(prepared, quant_backend.ExportedQAT) else prepared


def _output_step(prepared: nn.Module) -> tuple[float, bool]:
    """One step of the logits, and whether the output itself is quantized: the scale of the model's
    output (FX: its last fake quantizer's), or, where the output stays float (PT2E's X86 quantizer
    leaves a linear's output unquantized), what one code of the last linear's input moves an output
    by (input scale x largest weight). Rounding differences in earlier layers are not bounded by it:
    the tests bound the mean and how many logits agree exactly."""
    graph = _graph(prepared)
    [output] = [n for n in graph.graph.nodes if n.op == "output"]
    result = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    if result.op == "call_module" and hasattr(getattr(graph, result.target), "scale"):
        return float(getattr(graph, result.target).scale), True
    assert result.target == torch.ops.aten.linear.default, result.target
    act, weight = (getattr(graph, arg.target) for arg in result.args[:2])
    return float(act.scale) * float((weight.scale * weight.quant_max).max()), False


def _activation_scales(prepared: nn.Module) -> set[float]:
    return {round(float(m.scale), 6) for m in quant_backend.fake_quant_modules(prepared) if m.scale.numel() == 1}


def _forms(prepared: nn.Module, bits: int, bn: bool = True):
    return qdq_models(prepared, _data(32, 99), bits, float_student=Net(bn))


@dataclass
class Int8:
    prepared: nn.Module
    integer: nn.Module  # its integer model (converted once: PT2E's conversion is the slow step)
    forms: QDQModels
    path: Path  # student_int8.onnx, as a run ships it (its first conv given 4 input channels, a float-output Gemm int32 biases)
    fp32_path: Path  # student.onnx
    plain_path: Path  # student_int8.onnx as the exporter wrote it (export.align_int8_channels=false, export.int32_biases=false)
    flow: str


@pytest.fixture(scope="module", params=FLOWS)
def int8(request, tmp_path_factory) -> Int8:
    prepared = _prepared(8, request.param)
    integer = quant_backend.convert(prepared)
    forms = qdq_models(prepared, _data(32, 99), 8, integer=integer if request.param == "pt2e" else None, float_student=Net())
    out = tmp_path_factory.mktemp("qdq")
    return Int8(prepared, integer, forms,
                save_onnx(forms.qdq, _data(2, 0), out / "student_int8.onnx", align_channels=True, int32_biases=True),
                save_onnx(forms.fp32, _data(2, 0), out / "student.onnx"), save_onnx(forms.qdq, _data(2, 0), out / "plain_int8.onnx"),
                request.param)


# PT2E's X86 quantizer leaves the classifier's output float: its bias becomes int32 codes (FX quantizes the output)
BIAS_REWRITES = {"pt2e": ("node_linear_1: bias as int32 codes",), "fx": ()}


def test_the_file_carries_the_learned_scales_and_int8_weights(int8):
    prepared, path, fp32_path = int8.prepared, int8.path, int8.fp32_path
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 4 and "DequantizeLinear" in ops
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # every Conv / Gemm weight is an int8 tensor read through DequantizeLinear; no float weight is left
    int8_weights = [a for a in inits.values() if a.dtype == np.int8 and a.ndim >= 2]
    assert sorted(a.shape for a in int8_weights) == sorted([(16, 4, 3, 3), (16, 16, 3, 3), (32, 16), (5, 32)])
    # no float weight is left: the one float matrix spreads the image over the first conv's 4 input channels
    [spread] = [k for k, a in inits.items() if a.dtype == np.float32 and a.ndim >= 2]
    np.testing.assert_array_equal(inits[spread], [[1, 0, 0, 0]])
    # the activation scales in the file are those QAT learned (its fake quantizers')
    scales = {round(float(inits[n.input[1]]), 6) for n in graph.node if n.op_type == "QuantizeLinear"}
    assert scales == _activation_scales(prepared)
    stored = {p: sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(p)).graph.initializer) for p in (path, fp32_path)}
    assert stored[path] < 0.5 * stored[fp32_path]  # the weights' bytes (this tiny net's graph is larger than them)


def test_the_first_conv_padded_to_4_input_channels_gives_the_exported_outputs_exactly(int8, tmp_path):
    assert read_rewrites(int8.path) == ("node_conv2d: input channels 1 -> 4", *BIAS_REWRITES[int8.flow])
    assert read_rewrites(int8.plain_path) == ()
    aligned, plain = OnnxRuntimeModel(_padded(int8, tmp_path), threads=1), OnnxRuntimeModel(int8.plain_path, threads=1)
    shipped = OnnxRuntimeModel(int8.path, threads=1)
    x = _data(256, 12) * 0.5  # activations inside the trained ranges: codes of at most 127
    assert torch.equal(aligned(x), plain(x))
    if not BIAS_REWRITES[int8.flow]:
        assert torch.equal(shipped(x), plain(x))
    else:  # the shipped file's int32 classifier bias: its rounding apart, half a code of s_x * s_w per logit at most
        step = _bias_step(int8.plain_path)
        assert (shipped(x) - plain(x)).abs().max() <= 0.5 * step + 1e-5 * float(plain(x).abs().max())


@pytest.mark.skipif(not int32_dot_products(), reason="this CPU adds ONNX Runtime's u8 x s8 products in int16 pairs (no VNNI): "
                    "codes past 127 saturate differently on the padded and the generic conv path")
def test_the_padded_first_conv_gives_the_exported_outputs_beyond_the_trained_ranges_too(int8, tmp_path):
    x = _data(256, 13) * 3
    assert torch.equal(OnnxRuntimeModel(_padded(int8, tmp_path), threads=1)(x), OnnxRuntimeModel(int8.plain_path, threads=1)(x))


def _padded(int8: Int8, tmp_path: Path) -> Path:
    """The exporter's int8 file with only its first conv padded (no int32 biases)."""
    padded = onnx.load(str(int8.plain_path))
    assert align_input_channels(padded) == ["node_conv2d: input channels 1 -> 4"]
    onnx.save(padded, str(tmp_path / "padded.onnx"))
    return tmp_path / "padded.onnx"


def _bias_step(path: Path) -> float:
    """The largest bias code step ``s_x * s_w`` of the classifier (the last Gemm) in an int8 file."""
    graph = onnx.load(str(path)).graph
    index = GraphIndex.of(graph)
    gemm = [n for n in graph.node if n.op_type == "Gemm"][-1]
    x_dq, w_dq = index.producer[gemm.input[0]], index.producer[gemm.input[1]]
    scale = {name: numpy_helper.to_array(index.initializers[name]) for name in (x_dq.input[1], w_dq.input[1])}
    return float(scale[x_dq.input[1]]) * float(scale[w_dq.input[1]].max())


def test_onnx_runtime_runs_it_as_integer_kernels_and_agrees_with_pytorch(int8, tmp_path):
    prepared, path = int8.prepared, int8.path
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    # int8 kernels, no float conv or Gemm (PT2E's float-output classifier too, given its int32 bias)
    assert {"QLinearConv", "QGemm"} <= optimized and not {"Conv", "Gemm"} & optimized

    x = _data(256, 7)
    session = OnnxRuntimeModel(path, threads=1)
    integer = int8.integer
    in_range = _data(256, 8) * 0.5  # activations inside the trained ranges: no code reaches the x86 clamp at 127
    with torch.no_grad():
        fake_quant, theirs, ours = prepared(in_range), integer(x), session(in_range)
        ours_x = session(x)
    # ONNX Runtime and fake quantization each round intermediate results their own way (a code off by
    # one in a layer moves the next): most logits equal, none more than a few output steps apart.
    # fbgemm requantizes with its own fixed-point multipliers (and saturates x86 activations at 127,
    # which the file does not): further apart, the same on average.
    step, output_quantized = _output_step(prepared)
    if output_quantized:
        assert (ours - fake_quant).abs().max() <= 4.01 * step
    else:  # a code flipped in an earlier layer moves a float output by more than a step, not by much
        assert (ours - fake_quant).abs().max() <= 0.05 * float(fake_quant.max() - fake_quant.min())
    assert ((ours - fake_quant).abs() < 0.5 * step).float().mean() >= 0.8
    assert (ours - fake_quant).abs().mean() < step
    assert (ours_x - theirs).abs().mean() < step
    assert (ours_x.argmax(1) == theirs.argmax(1)).float().mean() >= 0.95


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("bits", [4, 7])
def test_a_student_of_fewer_than_8_bits_keeps_its_activation_range_in_the_file(tmp_path, bits, flow):
    # QuantizeLinear saturates at 0..255: the 0..15 (0..127) range must be kept by a Clip on the codes
    prepared = _prepared(bits, flow, bn=False)
    forms = _forms(prepared, bits, bn=False)
    path = save_onnx(forms.qdq, _data(2, 0), tmp_path / "student_int8.onnx")
    x = _data(128, 3) * 3  # inputs beyond the calibrated range: unclamped codes would pass 15
    with torch.no_grad():
        want = prepared(x)
    got = OnnxRuntimeModel(path, threads=1)(x)
    step, output_quantized = _output_step(prepared)
    if output_quantized:
        assert (got - want).abs().max() <= 2.01 * step
    else:  # 16 levels at 4 bits: one flipped code is a larger share of the logits' range
        assert (got - want).abs().max() <= 0.15 * float(want.max() - want.min())
    assert (got - want).abs().mean() <= step  # unclamped codes would be off by many steps
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    graph = onnx.load(str(path)).graph
    assert "Clip" in [n.op_type for n in graph.node]


@pytest.mark.parametrize("flow", FLOWS)
def test_building_the_forms_leaves_the_qat_model_as_it_was(flow):
    prepared = _prepared(8, flow, bn=False)
    quant_backend.set_observers(prepared, True)
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    qdq_models(prepared, _data(32, 99) * 10, 8, float_student=Net(bn=False))  # data far outside the ranges: observers that ran would move
    after = prepared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.observer_enabled[0] == 1 for m in quant_backend.fake_quant_modules(prepared))


def test_the_fp32_form_is_the_trained_weights_folded(int8):
    prepared, fp32_path = int8.prepared, int8.fp32_path
    float_view = copy.deepcopy(prepared)
    quant_backend.set_fake_quant(float_view, False)
    x = _data(64, 5)
    with torch.no_grad():
        want = float_view(x)
    got = OnnxRuntimeModel(fp32_path, threads=1)(x)
    assert torch.allclose(got, want, atol=1e-4)
    ops = {n.op_type for n in onnx.load(str(fp32_path)).graph.node}
    assert not {"QuantizeLinear", "DequantizeLinear", "BatchNormalization", "ReduceMean"} & ops  # BN folded into the conv
    assert "GlobalAveragePool" in ops


def test_export_records_the_int8_file_against_the_integer_model(int8, tmp_path):
    forms, integer = int8.forms, int8.integer
    x = _data(48, 11)
    with torch.no_grad():
        labels = integer(x).argmax(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=16)
    quantized = QuantizedDeployable(integer=integer, bits=8, qdq=forms.qdq, fp32=forms.fp32)
    records = export_artifacts(forms.fp32, ["onnx_int8"], tmp_path, loader, (1, 8, 8), latency_batch=8, threads=1,
                               max_acc_drop=5.0, quantized=quantized)
    by = {r.format: r for r in records}
    assert list(by) == ["pytorch", "pytorch_int8", "onnx_int8"]  # onnx_int8 alone: no fp32 file
    assert by["pytorch_int8"].acc == 1.0 and by["onnx_int8"].acc >= 0.95
    assert by["onnx_int8"].acc_drop == pytest.approx(100 * (1.0 - by["onnx_int8"].acc))
    assert by["onnx_int8"].latency_ms > 0 and by["pytorch_int8"].latency_ms > 0
    assert by["onnx_int8"].rewrites == ("node_conv2d: input channels 1 -> 4", *BIAS_REWRITES[int8.flow])  # both by default
    assert not (tmp_path / "student.onnx").exists() and (tmp_path / "student_int8.onnx").exists()

    failed = QuantizedDeployable(integer=integer, bits=8, qdq=None, fp32=None, error="NotImplementedError: Conv3d")
    [_, _, record] = export_artifacts(forms.fp32, ["onnx_int8"], tmp_path, loader, (1, 8, 8), latency_batch=8, threads=1,
                                      max_acc_drop=5.0, quantized=failed, device=None)
    assert record.path is None and "Conv3d" in record.error and not (tmp_path / "student_int8.onnx").exists()
