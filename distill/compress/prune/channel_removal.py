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

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.compress.prune.masks import bake

log = logging.getLogger(__name__)


def remove_pruned_channels(model: nn.Module, example: torch.Tensor, pruned: dict[str, list[int]]) -> tuple[nn.Module, dict[str, int]]:
    """A shrunk copy of ``model`` (masks baked in) without channels ``pruned[root]`` of each group's
    root layer, and with them every channel of the group that Torch-Pruning couples to them."""
    import torch_pruning as tp  # deferred: an optional heavy dependency, only channel removal uses it

    # The dependency graph is traced through autograd, so leave Lightning's inference mode (the
    # test loop calls us from on_test_end) and copy the weights into ordinary tensors.
    with torch.inference_mode(False), torch.enable_grad():
        return _remove(copy.deepcopy(model), example.clone(), pruned, tp)


def _remove(model: nn.Module, example: torch.Tensor, pruned: dict[str, list[int]], tp) -> tuple[nn.Module, dict[str, int]]:
    model = bake(model).cpu().eval()
    for p in model.parameters():
        p.data = p.data.clone()
    for _, b in model.named_buffers():
        b.data = b.data.clone()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    removed: dict[str, int] = {}
    for path, idxs in pruned.items():
        if not idxs:
            continue
        module = model.get_submodule(path)
        if isinstance(module, nn.Linear):
            prune_fn = tp.prune_linear_out_channels
        elif module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            prune_fn = tp.prune_depthwise_conv_out_channels
        else:
            prune_fn = tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, prune_fn, idxs=list(idxs))
        if graph.check_pruning_group(group):  # never removes every channel of a layer
            group.prune()
            removed[path] = len(idxs)
    return model, removed


@torch.inference_mode()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (torch's FLOP counter / 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model.eval()(example)
    return counter.get_total_flops() // 2
