"""torchvision networks, adapted to the data's shape.

Small inputs (<= 64 px): torchvision's ImageNet stems (7x7 stride-2 conv + max-pool for ResNets,
stride-2 first conv for MobileNetV3) would shrink an 8x8 or 32x32 image to nothing. As CIFAR
practice does, the stem is replaced by a 3x3 stride-1 conv and the max-pool is dropped. The
replaced stem is newly initialised even when ``teacher.pretrained`` is set.
"""

from __future__ import annotations

import torchvision
from omegaconf import DictConfig
from torch import nn

SMALL_INPUT = 64


def _resnet(arch: str, pretrained: bool, num_classes: int, channels: int, image_size: int) -> nn.Module:
    if pretrained:
        model = torchvision.models.get_model(arch, weights="DEFAULT")
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def resnet50_teacher(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return _resnet("resnet50", bool(cfg.get("pretrained", False)), num_classes, channels, image_size)


def resnet18_teacher(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return _resnet("resnet18", bool(cfg.get("pretrained", False)), num_classes, channels, image_size)


def resnet18_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return _resnet("resnet18", False, num_classes, channels, image_size)


def mobilenet_v3_small_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    first: nn.Conv2d = model.features[0][0]
    stride = 1 if image_size <= SMALL_INPUT else 2
    model.features[0][0] = nn.Conv2d(channels, first.out_channels, 3, stride=stride, padding=1, bias=False)
    return model
