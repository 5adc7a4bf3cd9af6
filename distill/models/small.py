"""Small students written here: an MLP and a plain CNN."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden_sizes) -> Linear."""

    def __init__(self, in_features: int, hidden_sizes: list[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """[Conv3x3 -> BN -> ReLU (-> MaxPool2 while the map is > 4 px)] per width, global pool, Linear."""

    def __init__(self, channels: int, widths: list[int], num_classes: int, image_size: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, size = channels, image_size
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if size > 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def mlp_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return MLP(channels * image_size * image_size, list(cfg.hidden_sizes), num_classes, float(cfg.dropout))


def cnn_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return SmallCNN(channels, list(cfg.channels), num_classes, image_size, float(cfg.dropout))
