"""Pruning masks as ``torch.nn.utils.prune`` keeps them (``<name>_orig`` times ``<name>_mask``).

Shared by the pruning callback, channel removal and quantization (which bakes masks in before
converting): a leaf module, so none of them imports another for these two functions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


def effective(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as the forward pass sees it (``orig * mask`` when pruned)."""
    if hasattr(module, name + "_orig"):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)


def bake(model: nn.Module) -> nn.Module:
    """Make every mask permanent in place (``weight = weight_orig * weight_mask``, hooks removed)."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model
