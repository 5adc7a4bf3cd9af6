"""The image pipeline of the datasets read from files (CIFAR, image folders)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torchvision.transforms import v2


def image_transforms(cfg: DictConfig, size: int, channels: int, mean: list[float], std: list[float], train: bool):
    steps: list[Any] = [v2.ToImage()]
    if channels == 1:
        steps.append(v2.Grayscale(1))
    elif channels == 3:
        steps.append(v2.RGB())  # a grey image for a 3-channel model
    steps.append(v2.Resize((size, size), antialias=True))
    if train and cfg.augment:
        steps += [v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
