"""The QAT student in QuantizeLinear / DequantizeLinear form, for ONNX Runtime (``student_int8.onnx``).

ONNX has no quantized tensors: a quantized model is a float graph in which each activation passes
through ``QuantizeLinear`` -> ``DequantizeLinear`` (scale, zero point) and each weight is an int8
initializer read through ``DequantizeLinear`` (per output channel). ONNX Runtime's graph optimizer
recognises ``DQ -> Conv/MatMul -> Q`` and runs it as one integer kernel (``QLinearConv``,
``QGemm``), so the file runs in int8 with exactly the scales and zero points QAT learned.

:func:`qdq_models` builds that form from the QAT-prepared student. PT2E's integer model already is
it (``convert_pt2e``: conv-BN folded, int8 weight constants behind ``dequantize_per_channel``); only
the b-bit clamp below is added, and the fp32 form is the float student with the trained weights
loaded (BatchNorm unfolded: ONNX Runtime folds it). An FX-prepared student takes two steps:

1. PyTorch's *reference decomposed* conversion of the prepared model (the representation PT2E's
   ``convert_pt2e`` produces): conv-BN folded, every quantized activation as
   ``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` with the learned
   scale, zero point and b-bit range (kept by a ``Clip`` on the codes where b < 8, see
   :func:`_clamp_activations`), every weight in a reference module that quantize-dequantizes it on each call;
2. each reference Conv2d / Linear swapped for one holding the **integer** weight (computed once,
   by the same ``quantized_decomposed`` op) and dequantizing it in ``forward``: the ONNX file then
   stores int8 weights (a quarter of fp32) behind ``DequantizeLinear``.

The same reference model with every quantize/dequantize pair removed and float Conv2d / Linear
modules is the student's trained fp32 weights, conv-BN folded (``student.onnx`` of a QAT run).
Both are checked against the prepared model before they are returned.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
from torch import fx, nn
from torch.ao.nn.quantized import reference as ref_nn
from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx
from torch.fx.experimental import optimization
from torch.nn import functional as F

from distill.compress.prune.channel_removal import remove_pruned_channels
from distill.compress.prune.masks import bake
from distill.compress.quant.backend import (
    ExportedQAT,
    convert,
    set_engine,
    set_fake_quant,
    set_observers,
)
from distill.compress.quant.graph import IntegerGraph

log = logging.getLogger(__name__)
_QD = torch.ops.quantized_decomposed


@dataclass
class QDQModels:
    """The QAT student for export: ``qdq`` (integer weights, learned activation scales) and ``fp32``
    (the same trained weights, conv-BN folded, no quantization)."""

    qdq: nn.Module
    fp32: nn.Module


class _IntWeight(nn.Module):
    """An int8 weight with per-channel (or per-tensor) scales, dequantized on each call."""

    def __init__(self, ref: nn.Module) -> None:
        super().__init__()
        self.per_channel = ref.weight_qscheme in (torch.per_channel_affine, torch.per_channel_symmetric)
        self.qmin, self.qmax, self.axis = int(ref.weight_quant_min), int(ref.weight_quant_max), int(getattr(ref, "weight_axis_int", 0))
        scale = ref.weight_scale.detach().float()
        zero_point = ref.weight_zero_point.detach().to(torch.int64)
        weight = ref.weight.detach().float()
        if self.per_channel:
            codes = _QD.quantize_per_channel(weight, scale, zero_point, self.axis, self.qmin, self.qmax, torch.int8)
        else:
            codes = _QD.quantize_per_tensor(weight, float(scale), int(zero_point), self.qmin, self.qmax, torch.int8)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    def forward(self) -> torch.Tensor:
        if self.per_channel:
            return _QD.dequantize_per_channel(self.codes, self.scale, self.zero_point, self.axis, self.qmin, self.qmax, torch.int8)
        return _QD.dequantize_per_tensor(self.codes, float(self.scale), int(self.zero_point), self.qmin, self.qmax, torch.int8)

    def keep(self, out: tuple[int, ...] | None, in_: tuple[int, ...] | None) -> None:
        """Only output channels ``out`` and input channels ``in_`` (None: all), as channel removal left
        the float layer: the codes and, per channel, the scales and zero points of the kept rows."""
        if out is not None:
            rows = torch.tensor(out, dtype=torch.long)
            self.codes = self.codes.index_select(0, rows)
            if self.per_channel:
                if self.axis != 0:
                    raise NotImplementedError(f"per-channel weight scales along axis {self.axis}: only output channels (axis 0)")
                self.scale, self.zero_point = self.scale.index_select(0, rows), self.zero_point.index_select(0, rows)
        if in_ is not None:
            self.codes = self.codes.index_select(1, torch.tensor(in_, dtype=torch.long))


class QDQConv2d(nn.Module):
    def __init__(self, ref: nn.Conv2d) -> None:
        super().__init__()
        self.weight = _IntWeight(ref)
        self.bias = None if ref.bias is None else nn.Parameter(ref.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = ref.stride, ref.padding, ref.dilation, ref.groups
        if ref.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={ref.padding_mode!r} has no QDQ form here")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def keep(self, out: tuple[int, ...] | None, in_: tuple[int, ...] | None) -> None:
        if self.groups != 1:
            raise NotImplementedError(f"a grouped conv (groups={self.groups}) is not shrunk here")
        self.weight.keep(out, in_)
        if out is not None and self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach()[list(out)], requires_grad=False)


class QDQLinear(nn.Module):
    def __init__(self, ref: nn.Linear) -> None:
        super().__init__()
        self.weight = _IntWeight(ref)
        self.bias = None if ref.bias is None else nn.Parameter(ref.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def keep(self, out: tuple[int, ...] | None, in_: tuple[int, ...] | None) -> None:
        self.weight.keep(out, in_)
        if out is not None and self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach()[list(out)], requires_grad=False)


def _float_conv(ref: nn.Conv2d) -> nn.Conv2d:
    conv = nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel_size, ref.stride, ref.padding, ref.dilation,
                     ref.groups, ref.bias is not None, ref.padding_mode)
    conv.load_state_dict({"weight": ref.weight.detach(), **({"bias": ref.bias.detach()} if ref.bias is not None else {})})
    return conv


def _float_linear(ref: nn.Linear) -> nn.Linear:
    linear = nn.Linear(ref.in_features, ref.out_features, ref.bias is not None)
    linear.load_state_dict({"weight": ref.weight.detach(), **({"bias": ref.bias.detach()} if ref.bias is not None else {})})
    return linear


_SWAPS = {  # reference module -> (integer-weight module, float module)
    ref_nn.Conv2d: (QDQConv2d, _float_conv),
    ref_nn.Linear: (QDQLinear, _float_linear),
}


def _swap_modules(model: nn.Module, which: int) -> nn.Module:
    """Replace every reference Conv2d / Linear in ``model`` (in place) by its integer-weight form
    (``which=0``) or its float form (``which=1``); any other reference module is a named error."""
    for name, child in list(model.named_children()):
        kind = type(child)
        if kind in _SWAPS:
            setattr(model, name, _SWAPS[kind][which](child))
        elif kind.__module__.startswith("torch.ao.nn.quantized.reference"):
            raise NotImplementedError(f"{kind.__name__} ({name}) has no QDQ export here: only Conv2d and Linear")
        else:
            _swap_modules(child, which)
    return model


def _strip_qdq(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Remove every quantize/dequantize node: ``dequantize(quantize(x))`` becomes ``x``."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (_QD.dequantize_per_tensor.default, _QD.dequantize_per_tensor.tensor):
            node.replace_all_uses_with(node.args[0].args[0] if _is_quantize(node.args[0]) else node.args[0])
            graph.erase_node(node)
    for node in list(graph.nodes):
        if _is_quantize(node) and not node.users:
            graph.erase_node(node)
    left = [n.name for n in graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None) == "quantized_decomposed"]
    if left:  # e.g. a functional F.linear's weight quantized in the graph, not in a module
        raise NotImplementedError(f"quantize/dequantize nodes with no fp32 form here: {', '.join(left[:3])}")
    graph.lint()
    graph_module.recompile()
    return graph_module


_FULL_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _clamp_activations(graph_module: fx.GraphModule, bits: int) -> fx.GraphModule:
    """After each activation quantize of fewer than 8 bits (0..15 at 4 bits; 0..127 at 7), clamp the
    integer codes to its range. ONNX's QuantizeLinear saturates to the dtype's full range and the exporter drops
    the narrower one; a ``Clip`` on the integer codes keeps the b-bit model and leaves
    ``DQ -> Conv -> Q`` intact for ONNX Runtime's integer kernels.

    The 7-bit range of 8-bit activations on x86 (0..127, :func:`backend.activation_range`) is not
    clamped. It exists because u8 x s8 kernels without VNNI (fbgemm's, and ONNX Runtime's on AVX2)
    add pairs of products in int16; with VNNI and on ARM, ONNX Runtime adds them in int32. The file
    keeps the learned scale and zero point and lets the rare activation above the trained range reach
    255 instead of saturating at 127 (on AVX2 those codes can saturate the int16 pairs). Clamping it
    costs ONNX Runtime its channels-last layout at the last pooling (a transpose of the whole feature
    map): 9-22 % of the digits cnn's time at batch 1024 on an AVX2 machine, 20-32 % of the structured
    cnn's (``bench/clamp.py``, :func:`distill.compress.quant.clamp.clamp_activation_codes`). The int8
    file's accuracy is checked against the integer model's (``export.max_acc_drop``)."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if not _is_quantize(node):
            continue
        qmin, qmax, dtype = node.args[3], node.args[4], node.args[5]
        if (qmin, qmax) == _FULL_RANGE.get(dtype) or (bits == 8 and dtype == torch.uint8 and (qmin, qmax) == (0, 127)):
            continue  # the dtype's range, or the x86 7-bit range of 8-bit activations (see above)
        with graph.inserting_after(node):
            clamped = graph.call_function(torch.clamp, (node, qmin, qmax))
        node.replace_all_uses_with(clamped, delete_user_cb=lambda user, c=clamped: user is not c)
    graph.lint()
    graph_module.recompile()
    return graph_module


def _is_quantize(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
        _QD.quantize_per_tensor.default, _QD.quantize_per_tensor.tensor)


def _trained_float(prepared: ExportedQAT, float_student: nn.Module) -> nn.Module:
    """``float_student`` (the architecture before PT2E captured it) with the trained weights: an
    exported graph keeps its parameters' and buffers' original names."""
    model = copy.deepcopy(float_student).cpu().eval()
    trained = prepared.graph_module.state_dict()
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in trained]
    if missing:
        raise NotImplementedError(f"the PT2E graph does not hold the float student's {', '.join(missing[:3])}")
    model.load_state_dict({k: trained[k] for k in wanted})
    try:  # conv-BN folded, as the FX form is (ONNX Runtime would fold it too, the file then carries BN)
        return optimization.fuse(model)
    except Exception as err:  # noqa: BLE001  (symbolic tracing's failures have no common type)
        log.info("qat: fp32 form keeps its BatchNorm (%s: %s)", type(err).__name__, err)
        return model


@torch.no_grad()
def qdq_models(prepared: nn.Module, example: torch.Tensor, bits: int, backend: str = "x86",
               integer: IntegerGraph | None = None, float_student: nn.Module | None = None) -> QDQModels:
    """The QDQ and fp32 forms of a ``bits``-bit QAT-prepared student (left untouched), checked on
    ``example`` against its fake-quantized and fp32 outputs. A PT2E student needs ``float_student``
    (and takes its ``integer`` model, :func:`backend.convert`, when already made). (This checks the PyTorch modules; the
    ONNX file of the QDQ form is checked against the integer model on the test split, its acc_drop.)"""
    set_engine(backend)
    model = bake(copy.deepcopy(prepared)).cpu().eval()
    set_observers(model, False)  # the check below must not move the scales it checks
    float_view = copy.deepcopy(model)
    set_fake_quant(float_view, False)
    if isinstance(model, ExportedQAT):
        if float_student is None:
            raise ValueError("the QDQ forms of a PT2E student need its float student (the architecture it was prepared from)")
        integer = integer if integer is not None else convert(model, backend)
        qdq = IntegerGraph(_clamp_activations(copy.deepcopy(integer.graph_module), bits)).eval()
        fp32 = _trained_float(model, float_student)
    else:
        reference = _convert_to_reference_decomposed_fx(copy.deepcopy(model)).eval()  # converts its input in place
        qdq = _swap_modules(_clamp_activations(copy.deepcopy(reference), bits), 0).eval()
        fp32 = _swap_modules(_strip_qdq(reference), 1).eval()
    # The conversion is the deployed math: it must agree with what QAT trained (fake quant on) and
    # with the trained weights (fake quant off) up to float rounding and one quantization step.
    for label, built, expected in (("QDQ", qdq, model), ("fp32", fp32, float_view)):
        got, want = built(example), expected(example)
        tolerance = 1e-3 + 0.05 * float(want.abs().max())
        if not torch.allclose(got, want, atol=tolerance, rtol=0):
            raise RuntimeError(f"the {label} form of the QAT student disagrees with it by {float((got - want).abs().max()):.4g}")
    return QDQModels(qdq=qdq, fp32=fp32)


@dataclass
class ShrunkQDQ:
    """The QDQ and fp32 forms with structured pruning's channels removed, and the channels each
    group root lost."""

    forms: QDQModels
    removed: dict[str, int]


@torch.no_grad()
def remove_channels(forms: QDQModels, example: torch.Tensor, pruned: dict[str, list[int]]) -> ShrunkQDQ:
    """``forms`` (of an FX QAT student that structured pruning masked) without the pruned channels.

    Torch-Pruning removes them from the fp32 form (conv-BN folded: a pruned channel's folded weight
    and bias are zero, so it outputs exactly 0) and says which rows and columns each Conv2d / Linear
    kept; the QDQ form's integer weights, per-channel scales and biases are cut to the same ones. Its
    activations are quantized per tensor, so their scales stand: the removed channels were 0, which
    every activation range contains. Both forms are checked against the masked ones on ``example``."""
    if not isinstance(forms.fp32, fx.GraphModule) or not isinstance(forms.qdq, fx.GraphModule):
        raise NotImplementedError("channel removal of the QDQ form needs the FX flow's forms (pruning runs QAT on FX)")
    cut = remove_pruned_channels(forms.fp32, example[:1], pruned)
    qdq = copy.deepcopy(forms.qdq)
    layers = dict(qdq.named_modules())
    for name, kept in cut.kept.items():
        layer = layers.get(name)
        if not isinstance(layer, (QDQConv2d, QDQLinear)):
            raise NotImplementedError(f"{name} ({type(layer).__name__}) lost channels but has no integer weight to cut")
        layer.keep(kept.out, kept.in_)
    for label, built, expected in (("QDQ", qdq, forms.qdq), ("fp32", cut.model, forms.fp32)):
        got, want = built(example), expected(example)
        # the same integer weights and scales, fewer zero terms summed: float rounding at most, which
        # can move a requantized code by one step
        tolerance = 1e-4 + 0.02 * float(want.abs().max())
        if not torch.allclose(got, want, atol=tolerance, rtol=0):
            raise RuntimeError(f"the channel-removed {label} form disagrees with the masked one by {float((got - want).abs().max()):.4g}")
    return ShrunkQDQ(QDQModels(qdq=qdq.eval(), fp32=cut.model.eval()), cut.removed)
