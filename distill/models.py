"""Teacher and student registries.

Every builder takes the data's shape (``num_classes``, ``channels``, ``image_size``) from the
data module, never from its own config, so a class-count mismatch cannot be configured.

Small inputs (<= 64 px): torchvision's ImageNet stems (7x7 stride-2 conv + max-pool for ResNets,
stride-2 first conv for MobileNetV3) would shrink an 8x8 or 32x32 image to nothing. As CIFAR
practice does, the stem is replaced by a 3x3 stride-1 conv and the max-pool is dropped. The
replaced stem is newly initialised even when ``teacher.pretrained`` is set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import nn

SMALL_INPUT = 64

Builder = Callable[..., nn.Module]
STUDENTS: dict[str, Builder] = {}
TEACHERS: dict[str, Builder] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def _register(registry: dict[str, Builder], name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        registry[name] = fn
        return fn

    return wrap


def _lookup(registry: dict[str, Builder], kind: str, name: str) -> Builder:
    if name not in registry:
        raise UnknownModelError(f"unknown {kind} {name!r}; choose from: {', '.join(sorted(registry))}")
    return registry[name]


def build_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """Build the student named by ``cfg.name`` for data of the given shape."""
    return _lookup(STUDENTS, "student", cfg.name)(cfg, num_classes=num_classes, channels=channels, image_size=image_size)


def build_teacher(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """Build the (untrained, or ImageNet-initialised) teacher named by ``cfg.name``."""
    return _lookup(TEACHERS, "teacher", cfg.name)(cfg, num_classes=num_classes, channels=channels, image_size=image_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# torchvision networks


def _resnet(arch: str, pretrained: bool, num_classes: int, channels: int, image_size: int) -> nn.Module:
    import torchvision

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


@_register(TEACHERS, "resnet50")
def resnet50_teacher(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return _resnet("resnet50", bool(cfg.get("pretrained", False)), num_classes, channels, image_size)


@_register(TEACHERS, "resnet18")
def resnet18_teacher(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return _resnet("resnet18", bool(cfg.get("pretrained", False)), num_classes, channels, image_size)


@_register(STUDENTS, "resnet18")
def resnet18_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return _resnet("resnet18", False, num_classes, channels, image_size)


@_register(STUDENTS, "mobilenet_v3_small")
def mobilenet_v3_small_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    first: nn.Conv2d = model.features[0][0]
    stride = 1 if image_size <= SMALL_INPUT else 2
    model.features[0][0] = nn.Conv2d(channels, first.out_channels, 3, stride=stride, padding=1, bias=False)
    return model


# ---------------------------------------------------------------------------------------------
# Small students


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


@_register(STUDENTS, "mlp")
def mlp_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return MLP(channels * image_size * image_size, list(cfg.hidden_sizes), num_classes, float(cfg.dropout))


@_register(STUDENTS, "cnn")
def cnn_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    return SmallCNN(channels, list(cfg.channels), num_classes, image_size, float(cfg.dropout))
