"""Physically remove the channels that structured pruning zeroed: a smaller dense model, same outputs.

Masking buys no speed: a zero channel still costs its multiply-adds. Removing a conv's output
channel also means removing its BatchNorm entry and the matching input channel of every layer that
consumes it; Torch-Pruning's dependency graph (Fang et al., "DepGraph", CVPR 2023) finds and
shrinks all of them consistently, for residual and concatenating networks too.

Exactness: :mod:`distill.compress.prune.callback` prunes the same dependency groups
(:mod:`distill.compress.prune.groups`) and masks every tensor that writes a pruned channel (conv and
linear rows and biases, BatchNorm scale and shift), so the channel is exactly zero wherever it
reaches, the consumers' contribution from it is zero, and the shrunk model computes the same
function (up to float summation order). The callback measures the difference and the shrunk
model's accuracy rather than assume it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.compress.prune.masks import bake

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptChannels:
    """What removal left of one Conv2d / Linear: indices into its original output (``out``) and input
    (``in_``) channels; None where that side lost none. Another model of the same layers (the QAT
    student's integer form) is shrunk by these."""

    out: tuple[int, ...] | None = None
    in_: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Removal:
    """A channel-removed model, the channels each group root lost and what each weight layer kept."""

    model: nn.Module
    removed: dict[str, int]
    kept: dict[str, KeptChannels]


def remove_pruned_channels(model: nn.Module, example: torch.Tensor, pruned: dict[str, list[int]]) -> Removal:
    """A shrunk copy of ``model`` (masks baked in) without channels ``pruned[root]`` of each group's
    root layer, and with them every channel of the group that Torch-Pruning couples to them."""
    import torch_pruning as tp  # deferred: an optional heavy dependency, only channel removal uses it

    # The dependency graph is traced through autograd, so leave Lightning's inference mode (the
    # test loop calls us from on_test_end) and copy the weights into ordinary tensors.
    with torch.inference_mode(False), torch.enable_grad():
        return _remove(copy.deepcopy(model), example.clone(), pruned, tp)


def _track(graph: Any, group: Any, names: dict[nn.Module, str], kept: dict[str, dict[int, list[int]]]) -> None:
    """Record which channels of each Conv2d / Linear ``group`` is about to remove (in original indices:
    a layer's two sides can be cut by two groups, one after the other)."""
    seen: set[tuple[str, int]] = set()
    for dep, idxs in group:
        layer = dep.target.module
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or layer not in names:
            continue  # BatchNorm, activations: no weights another form would need cut
        dim = 0 if graph.is_out_channel_pruning_fn(dep.handler) else 1
        key = (names[layer], dim)
        if key in seen:
            continue
        seen.add(key)
        size = (layer.out_channels, layer.in_channels)[dim] if isinstance(layer, nn.Conv2d) else (layer.out_features, layer.in_features)[dim]
        current = kept.setdefault(names[layer], {}).setdefault(dim, list(range(size)))
        drop = {int(getattr(i, "idx", i)) for i in idxs}
        kept[names[layer]][dim] = [c for j, c in enumerate(current) if j not in drop]


def _remove(model: nn.Module, example: torch.Tensor, pruned: dict[str, list[int]], tp: Any) -> Removal:
    model = bake(model).cpu().eval()
    for p in model.parameters():
        p.data = p.data.clone()
    for _, b in model.named_buffers():
        b.data = b.data.clone()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    kept: dict[str, dict[int, list[int]]] = {}
    removed: dict[str, int] = {}
    for path, idxs in pruned.items():
        if not idxs:
            continue
        module = _weight_layer(model.get_submodule(path), path)
        if isinstance(module, nn.Linear):
            prune_fn = tp.prune_linear_out_channels
        elif module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            prune_fn = tp.prune_depthwise_conv_out_channels
        else:
            prune_fn = tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, prune_fn, idxs=list(idxs))
        if graph.check_pruning_group(group):  # never removes every channel of a layer
            _track(graph, group, names, kept)
            group.prune()
            removed[path] = len(idxs)
    return Removal(model, removed, {name: KeptChannels(tuple(sides[0]) if 0 in sides else None, tuple(sides[1]) if 1 in sides else None)
                                    for name, sides in kept.items()})


def _weight_layer(module: nn.Module, path: str) -> nn.Module:
    """The Conv2d / Linear at ``path``, or the one inside a fused container there (QAT's conversion
    makes ``ConvReLU2d(Conv2d, ReLU)`` of a conv the pruning callback knew by that path)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return module
    inner = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(inner) != 1:
        raise ValueError(f"{path} ({type(module).__name__}) holds {len(inner)} Conv2d / Linear layers: which one lost channels is unclear")
    return inner[0]


@torch.inference_mode()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (torch's FLOP counter / 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model.eval()(example)
    return counter.get_total_flops() // 2
