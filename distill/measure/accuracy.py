"""Top-1 accuracy of a model over a data loader, or over a data module's test split."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


@torch.inference_mode()
def loader_accuracy(model: nn.Module, loader: Iterable, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over every batch of ``loader``."""
    model = model.to(device).eval()
    correct = total = 0
    for x, y, *_ in loader:
        pred = model(x.to(device)).argmax(dim=1)
        correct += int((pred == y.to(device)).sum())
        total += len(y)
    if total == 0:
        raise ValueError("the test split is empty")
    return correct / total


def accuracy_on_test_split(model: nn.Module, datamodule: Any, device: str = "cpu") -> float:
    """``datamodule``: a :class:`distill.data.datamodules.BaseDataModule` (any with setup/test_dataloader)."""
    datamodule.setup("test")
    return loader_accuracy(model, datamodule.test_dataloader(), device)
