"""The one place that knows how PyTorch quantizes a model: b-bit QAT qconfigs, prepare, convert.

Why FX graph mode (``torch.ao.quantization.quantize_fx``): measured with torch 2.14.1, it trains and
converts every student in the registry (MLP, CNN, ResNet-18, MobileNetV3) with conv-BN folding and
no change to the model code, and the converted ResNet-18 runs ~4x faster on an x86 CPU. torch.ao is
deprecated in favour of torchao's pt2e flow, but torchao 0.18's ``X86InductorQuantizer`` failed on
ResNet-18 QAT ("Input partition has more than one output node"). Everything else in distill calls
only :func:`prepare_qat`, :func:`convert` and :func:`quant_range`, so swapping in pt2e later touches
this module alone.

b-bit quantization: weights are symmetric per output channel (or per tensor) in the narrow range
[-(2^(b-1) - 1), 2^(b-1) - 1]; activations are affine in [0, 2^b - 1] (at most 0..127 on x86, see
:func:`activation_range`). The converted model stores
those integers in int8/uint8 tensors and runs PyTorch's int8 kernels (fbgemm/onednn on x86,
qnnpack on ARM) on values that lie within the b-bit range; :mod:`distill.compress.quant.artifact` stores the
weights packed at b bits on disk.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn
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

from distill.compress.prune.masks import bake

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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    # torch.ao announces its deprecation on every call; the reason we use it is documented above.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def set_engine(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"quant.backend={backend!r}: choose from: {', '.join(BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"quant.backend={backend!r} is not available in this PyTorch build "
            f"(supported: {', '.join(torch.backends.quantized.supported_engines)})"
        )
    torch.backends.quantized.engine = backend


def prepare_qat(model: nn.Module, bits: int, per_channel: bool, example_input: torch.Tensor, backend: str = "x86") -> nn.Module:
    """A QAT copy of ``model`` (conv-BN fused, fake quantizers inserted), in training mode."""
    set_engine(backend)
    with quiet():
        return prepare_qat_fx(copy.deepcopy(model).train(), qconfig_mapping(bits, per_channel, backend), (example_input,))


def convert(prepared: nn.Module, backend: str = "x86") -> nn.Module:
    """The integer model for a QAT-prepared one (left untouched), on CPU, in eval mode."""
    set_engine(backend)
    # Pruning masks (torch.nn.utils.prune hooks) are baked into the weights first: conversion reads
    # ``module.weight``, which a pruning hook only refreshes on the next forward pass.
    model = bake(copy.deepcopy(prepared)).cpu().eval()
    with quiet():
        return convert_fx(model).eval()


def fake_quant_modules(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, FakeQuantizeBase))


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for m in fake_quant_modules(model):
        m.enable_fake_quant(enabled)


def set_observers(model: nn.Module, enabled: bool) -> None:
    for m in fake_quant_modules(model):
        m.enable_observer(enabled)


def freeze_bn_stats(model: nn.Module) -> None:
    """Stop updating BatchNorm running statistics in fused QAT conv-BN modules (and plain BN)."""
    model.apply(freeze_fused)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def is_prepared(model: nn.Module) -> bool:
    return next(fake_quant_modules(model), None) is not None
