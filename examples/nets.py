"""A user's own model class, for ``teacher=custom`` / ``student=custom``:

    python train.py teacher=custom teacher._target_=examples.nets.DigitsNet '+teacher.kwargs={width: 64}'

Any ``nn.Module`` whose constructor takes its class count (``num_classes``, or named in ``kwargs``)
works the same way; with ``teacher.checkpoint=PATH`` its trained weights are loaded and, when it
already predicts the data's classes, used as they are.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsNet(nn.Module):
    """Two 3×3 conv blocks and a linear head, for small grey images (8×8 digits)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
