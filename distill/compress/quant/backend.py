"""The one place that knows how PyTorch quantizes a model: b-bit QAT, prepare, convert, in two flows.

**PT2E** (torchao, PyTorch's maintained quantization path; every student where it works): the
student is captured with ``torch.export`` (batch dimension dynamic), torchao's ``prepare_qat_pt2e``
with the ``X86InductorQuantizer`` annotating a b-bit :class:`QuantizationConfig` inserts the fake
quantizers (conv-BN kept as a simulated fold), and ``convert_pt2e`` gives the integer model as
``quantized_decomposed`` quantize / dequantize ops around float conv / linear with int8 weight
constants: the form ONNX Runtime runs as int8 kernels (``student_int8.onnx``) and Inductor
(``torch.compile`` with freezing) lowers to oneDNN's int8 kernels on x86 (:func:`pytorch_runtime`).

**FX** (``torch.ao.quantization.quantize_fx``, deprecated upstream, its warning left visible) only
where PT2E fails or cannot apply, each case logged and recorded as the run's ``quant_flow``:

- a student whose module is called at two places: torchvision's ResNet BasicBlock calls
  ``self.relu`` twice, and the X86 quantizer's annotation then fails with "Input partition has more
  than one output node" (pytorch/ao#4478) -- ``student=resnet18`` (tested); any student whose
  export or PT2E preparation raises is tried in FX, with PT2E's error in the log;
- pruning with QAT: ``torch.nn.utils.prune`` masks live on ``nn.Conv2d`` / ``nn.Linear`` modules,
  which an exported graph no longer has.

b-bit quantization (both flows): weights are symmetric per output channel (or per tensor) in the
narrow range [-(2^(b-1) - 1), 2^(b-1) - 1]; activations are affine in [0, 2^b - 1] (at most 0..127 on
x86, see :func:`activation_range`). Integer tensors hold values within the b-bit range;
:mod:`distill.compress.quant.artifact` stores the weights packed at b bits on disk.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator

import torch
from torch import fx, nn
from torch._inductor import config as inductor_config
from torch.ao.nn.intrinsic.qat import freeze_bn_stats as freeze_fused
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
from torchao.quantization.pt2e import fake_quantize as ao_fake_quantize
from torchao.quantization.pt2e import observer as ao_observer
from torchao.quantization.pt2e import qat_utils as ao_qat_utils
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

from distill.compress.prune.masks import bake
from distill.compress.quant.graph import IntegerGraph
from distill.errors import first_line

log = logging.getLogger(__name__)

BACKENDS = ("x86", "qnnpack")


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a b-bit tensor: narrow symmetric for weights, full unsigned for activations.

    The narrow range (-7..7 rather than -8..7 at 4 bits) keeps the largest weight exactly
    representable, so the weights computed at conversion never fall outside the b-bit range."""
    if signed:
        return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def activation_range(bits: int, backend: str) -> tuple[int, int]:
    """The activations' integer range. On x86 at 8 bits it is 7 bits (0..127), as in PyTorch's own
    x86 default ("reduce_range"): fbgemm's u8 x s8 kernels add pairs of products in int16, which
    saturates with full-range activations and makes the integer model disagree with fake quant."""
    low, high = quant_range(bits, signed=False)
    return (low, min(high, 127)) if backend == "x86" else (low, high)


def qconfig_mapping(bits: int, per_channel: bool = True, backend: str = "x86"):
    """The QAT ``QConfigMapping`` for ``bits``-bit weights and activations."""
    act_min, act_max = activation_range(bits, backend)
    w_min, w_max = quant_range(bits, signed=True)
    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=act_min,
        quant_max=act_max,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        reduce_range=False,
    )
    # averaging_constant=1: the weight range is that of the current weights, not a running average
    # of past ones, so conversion sees exactly the range fake quantization trained with.
    if per_channel:
        observer, qscheme, extra = MovingAveragePerChannelMinMaxObserver, torch.per_channel_symmetric, {"ch_axis": 0}
    else:
        observer, qscheme, extra = MovingAverageMinMaxObserver, torch.per_tensor_symmetric, {}
    weight = FakeQuantize.with_args(
        observer=observer,
        averaging_constant=1.0,
        quant_min=w_min,
        quant_max=w_max,
        dtype=torch.qint8,
        qscheme=qscheme,
        **extra,
    )
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def pt2e_config(bits: int, per_channel: bool = True, backend: str = "x86") -> QuantizationConfig:
    """The PT2E QAT ``QuantizationConfig`` for ``bits``-bit weights and activations: the same ranges,
    observers and averaging as :func:`qconfig_mapping`. Plain ``FakeQuantize``, not the X86
    quantizer's default fused observer-fake-quantizer: with the fused one, the model ``convert_pt2e``
    made from a trained student disagreed with the student's own fake-quantized outputs (by 9 % of
    the logits' range on the digits CNN after one step, measured here); with these they are equal."""
    act_min, act_max = activation_range(bits, backend)
    w_min, w_max = quant_range(bits, signed=True)
    eps = {"eps": 2**-12}  # the X86 quantizer's default: scales never collapse to zero
    activation = QuantizationSpec(
        dtype=torch.uint8, quant_min=act_min, quant_max=act_max, qscheme=torch.per_tensor_affine, is_dynamic=False,
        observer_or_fake_quant_ctr=ao_fake_quantize.FakeQuantize.with_args(observer=ao_observer.MovingAverageMinMaxObserver, **eps),
    )
    if per_channel:
        observer, qscheme, axis = ao_observer.MovingAveragePerChannelMinMaxObserver, torch.per_channel_symmetric, 0
    else:
        observer, qscheme, axis = ao_observer.MovingAverageMinMaxObserver, torch.per_tensor_symmetric, None
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=w_min, quant_max=w_max, qscheme=qscheme, ch_axis=axis, is_dynamic=False,
        # averaging_constant=1: the weight range is that of the current weights (as in the FX flow)
        observer_or_fake_quant_ctr=ao_fake_quantize.FakeQuantize.with_args(
            observer=observer, averaging_constant=1.0, **eps),
    )
    return QuantizationConfig(activation, activation, weight, None, is_qat=True)


def set_engine(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"quant.backend={backend!r}: choose from: {', '.join(BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"quant.backend={backend!r} is not available in this PyTorch build "
            f"(supported: {', '.join(torch.backends.quantized.supported_engines)})"
        )
    torch.backends.quantized.engine = backend


# -- PT2E ------------------------------------------------------------------------------------------

FLOWS = ("pt2e", "fx")
_BATCH_NORM = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
               torch.ops.aten.cudnn_batch_norm.default)


class ExportedQAT(nn.Module):
    """A PT2E QAT student: the exported graph with its fake quantizers (``graph_module``).

    An exported graph has no modules to switch: its dropout and BatchNorm ops carry the mode as an
    argument (``train`` / ``training``), fixed at export. Lightning switches modes by setting
    ``module.training`` flags (after validation it restores them without calling ``train()``), so
    :meth:`forward` brings the graph's ops to the flag's mode whenever the two differ, keeping
    frozen BatchNorm statistics frozen (:func:`freeze_bn_stats`). The arguments are set directly:
    torchao's ``move_exported_model_to_train`` / ``_eval`` set the same ones by pattern rewriting,
    which exports its patterns on every call (seconds each, twice per validation here)."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.bn_frozen = False
        self._graph_mode = (True, False)  # (training, bn_frozen) of the graph's ops: exported in training mode

    def _sync_mode(self) -> None:
        mode = (self.training, self.bn_frozen)
        if mode != self._graph_mode:
            _set_graph_mode(self.graph_module, training=self.training, bn_training=self.training and not self.bn_frozen)
            self._graph_mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_mode()
        return self.graph_module(x)

    def train(self, mode: bool = True) -> ExportedQAT:
        for m in self.modules():
            m.training = mode
        self._sync_mode()
        return self


_DROPOUT = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)


def _set_graph_mode(graph_module: fx.GraphModule, training: bool, bn_training: bool) -> None:
    """Set the mode argument of every dropout (``train``) and BatchNorm (``training``; False
    normalises with, and stops updating, the running statistics) op of an exported graph."""
    changed = False
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BATCH_NORM:
            index, want = 5, bn_training
        elif node.target in _DROPOUT:
            index, want = 2, training
        else:
            continue
        if node.args[index] != want:
            args = list(node.args)
            args[index] = want
            node.args = tuple(args)
            changed = True
    if changed:
        graph_module.recompile()


@contextlib.contextmanager
def _conv_bn_patterns_of_present_convs() -> Iterator[None]:
    """Within: torchao's conv-BN fuse (prepare) and fold (convert) try only the conv ops the graph has.

    Both loop over conv1d, conv2d, conv_transpose1d and conv_transpose2d and export every pattern
    variant of each with ``torch.export`` (convert: 24 per op) before matching it: 96 exports, 32 s for
    the digits ``cnn`` on 2 cores, of which only conv2d's 24 can match its graph (8.9 s). A pattern of an
    op the graph lacks matches nothing, so skipping it changes no result (checked on that ``cnn``: the
    same ops and bit-equal outputs as torchao's own loop). Only where torchao's private helpers exist
    as in 0.18; else its own loop runs."""
    names = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
    originals = {n: getattr(ao_qat_utils, n, None) for n in names}
    if not all(callable(f) for f in originals.values()):
        yield
        return

    def present_only(helper: Callable[..., fx.GraphModule]) -> Callable[..., fx.GraphModule]:
        def run(m: fx.GraphModule, conv_fn: Callable[..., torch.Tensor], *args: object, **kwargs: object) -> fx.GraphModule:
            ops = {getattr(n.target, "_opname", None) for n in m.graph.nodes if n.op == "call_function"}
            if getattr(conv_fn, "__name__", None) not in ops:
                m.graph.eliminate_dead_code()  # what each helper starts with, so that a skip is a call that matches nothing
                m.recompile()
                return m
            return helper(m, conv_fn, *args, **kwargs)
        return run

    try:
        for name, helper in originals.items():
            setattr(ao_qat_utils, name, present_only(helper))
        yield
    finally:
        for name, helper in originals.items():
            setattr(ao_qat_utils, name, helper)


def _prepare_pt2e(model: nn.Module, bits: int, per_channel: bool, example: torch.Tensor, backend: str) -> ExportedQAT:
    model = copy.deepcopy(model).train()
    # The batch dimension stays dynamic: the QAT student trains, validates and converts at any batch.
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example.expand(2, *example.shape[1:]).clone(),), dynamic_shapes=({0: batch},))
    quantizer = X86InductorQuantizer().set_global(pt2e_config(bits, per_channel, backend))
    with _conv_bn_patterns_of_present_convs():
        return ExportedQAT(prepare_qat_pt2e(program.module(), quantizer)).train()


def _prepare_fx(model: nn.Module, bits: int, per_channel: bool, example: torch.Tensor, backend: str) -> nn.Module:
    return prepare_qat_fx(copy.deepcopy(model).train(), qconfig_mapping(bits, per_channel, backend), (example,))


def prepare_qat(model: nn.Module, bits: int, per_channel: bool, example_input: torch.Tensor, backend: str = "x86",
                flow: str = "auto") -> nn.Module:
    """A QAT copy of ``model`` (fake quantizers inserted, conv-BN fused), in training mode.

    ``flow``: ``pt2e`` or ``fx`` (exactly that one, as a resumed run needs), or ``auto``: PT2E, and
    FX when PT2E fails for this student (the reason logged). :func:`flow_of` tells which it took."""
    if flow not in (*FLOWS, "auto"):
        raise ValueError(f"quantization flow {flow!r}: choose from: auto, {', '.join(FLOWS)}")
    set_engine(backend)  # a named error for an unknown backend, whichever the flow
    if flow == "fx":
        return _prepare_fx(model, bits, per_channel, example_input, backend)
    try:
        return _prepare_pt2e(model, bits, per_channel, example_input, backend)
    except Exception as err:  # noqa: BLE001  (export or annotation failures have no common type)
        if flow == "pt2e":
            raise
        log.warning("qat: PT2E cannot prepare this student (%s); using torch.ao's FX flow (deprecated upstream)",
                    first_line(err))
    return _prepare_fx(model, bits, per_channel, example_input, backend)


def flow_of(prepared: nn.Module) -> str:
    """``pt2e`` or ``fx``: the flow that prepared ``prepared``."""
    return "pt2e" if isinstance(prepared, ExportedQAT) else "fx"


def _drop_unused(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Delete the parameters and buffers the graph never reads: convert_pt2e leaves the float
    weights and BatchNorm tensors it folded beside their int8 replacements."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner) if owner else graph_module, attr)
    graph_module.delete_all_unused_submodules()
    return graph_module


def convert(prepared: nn.Module, backend: str = "x86") -> nn.Module:
    """The integer model for a QAT-prepared one (left untouched), on CPU, in eval mode: FX's
    quantized modules (fbgemm / qnnpack kernels), or PT2E's quantize/dequantize graph with int8
    weights (see :func:`pytorch_runtime` for how PyTorch runs it fast)."""
    set_engine(backend)
    # Pruning masks (torch.nn.utils.prune hooks) are baked into the weights first: conversion reads
    # ``module.weight``, which a pruning hook only refreshes on the next forward pass.
    if not isinstance(prepared, ExportedQAT):
        return convert_fx(bake(copy.deepcopy(prepared)).cpu().eval()).eval()
    # Copied and converted outside inference mode: the integer model is exported and saved, which
    # inference tensors refuse (a copy made here of one is a normal tensor).
    with torch.inference_mode(False), torch.no_grad():
        model = copy.deepcopy(prepared).cpu().eval()
        with _conv_bn_patterns_of_present_convs():
            return IntegerGraph(_drop_unused(convert_pt2e(model.graph_module)))


class _Inductor(nn.Module):
    """An integer graph compiled by Inductor with freezing (weights constant, so its int8 weight
    pass pre-packs them for oneDNN). The config is patched around every call, not passed as
    ``torch.compile(options=...)``: with the option, torchao's weight-pack pass failed here
    (``UnsupportedOperatorException: onednn.qconv_prepack.default``), and a new batch size
    recompiles on a later call."""

    def __init__(self, integer: nn.Module) -> None:
        super().__init__()
        self.integer = integer
        self.compiled = torch.compile(integer, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(freezing=True):
            return self.compiled(x)


def pytorch_runtime(integer: nn.Module, example: torch.Tensor) -> tuple[nn.Module, str]:
    """The integer model as PyTorch runs it fastest, and that runtime's name. FX's quantized
    modules run their own int8 kernels eagerly; a quantize/dequantize graph is compiled by Inductor
    with freezing, which lowers it to oneDNN's int8 kernels on x86 (the X86 quantizer's deployment),
    or, when compiling fails (no C++ compiler, say), runs eagerly as float math on int8 weights."""
    if not isinstance(integer, IntegerGraph):  # FX's quantized modules
        return integer, torch.backends.quantized.engine
    compiled = _Inductor(integer)
    try:
        with torch.no_grad():
            compiled(example)  # compiles now: a failure is known here, not inside a timing loop
    except Exception as err:  # noqa: BLE001  (Inductor's failures have no common type)
        log.warning("qat: torch.compile failed on the integer model (%s); timing it eagerly", first_line(err))
        return integer, "eager"
    return compiled, "inductor"


_FAKE_QUANTIZERS = (FakeQuantizeBase, ao_fake_quantize.FakeQuantizeBase)  # FX's and PT2E's


def fake_quant_modules(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, _FAKE_QUANTIZERS))


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for m in fake_quant_modules(model):
        m.enable_fake_quant(enabled)


def set_observers(model: nn.Module, enabled: bool) -> None:
    for m in fake_quant_modules(model):
        m.enable_observer(enabled)


def freeze_bn_stats(model: nn.Module) -> None:
    """Stop updating BatchNorm running statistics (and normalise with them): FX's fused QAT
    conv-BN modules and plain BN; in a PT2E graph, its BatchNorm ops (kept across ``train()``)."""
    if isinstance(model, ExportedQAT):
        model.bn_frozen = True
        model._sync_mode()
        return
    model.apply(freeze_fused)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def is_prepared(model: nn.Module) -> bool:
    return next(fake_quant_modules(model), None) is not None
