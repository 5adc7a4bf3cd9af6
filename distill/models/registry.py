"""Teacher and student registries.

Every builder takes the data's shape (``num_classes``, ``channels``, ``image_size``) from the
data module, never from its own config, so a class-count mismatch cannot be configured.

The builders live in :mod:`distill.models.vision` (torchvision networks) and
:mod:`distill.models.small` (MLP, CNN); adding a model is a builder there and one entry below.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig
from torch import nn

from distill.errors import UnknownModelError
from distill.models import small, sources, vision
from distill.models.sources import SOURCES, Built

Builder = Callable[..., nn.Module]
STUDENTS: dict[str, Builder] = {
    "mlp": small.mlp_student,
    "cnn": small.cnn_student,
    "resnet18": vision.resnet18_student,
    "mobilenet_v3_small": vision.mobilenet_v3_small_student,
}
TEACHERS: dict[str, Builder] = {
    "resnet50": vision.resnet50_teacher,
    "resnet18": vision.resnet18_teacher,
}


def _from_source(role: str) -> Builder:
    def build(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
        return sources.build_from_source(cfg, role, num_classes, channels, image_size).model
    return build


# The models people bring (distill/models/sources.py): any torchvision model, timm, Hugging Face, their own class.
for _source in SOURCES:
    STUDENTS[_source], TEACHERS[_source] = _from_source("student"), _from_source("teacher")


def _lookup(registry: dict[str, Builder], kind: str, name: str) -> Builder:
    if name not in registry:
        raise UnknownModelError(f"unknown {kind} {name!r}; choose from: {', '.join(sorted(registry))}")
    return registry[name]


def build_student(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """Build the student named by ``cfg.name`` for data of the given shape."""
    return _lookup(STUDENTS, "student", cfg.name)(cfg, num_classes=num_classes, channels=channels, image_size=image_size)


def build_teacher(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """Build the (untrained, or ImageNet-initialised) teacher named by ``cfg.name``."""
    return build_teacher_from(cfg, num_classes, channels, image_size).model


def build_teacher_from(cfg: DictConfig, num_classes: int, channels: int, image_size: int) -> Built:
    """The teacher and what was loaded into it: a source's pretrained weights, its head kept or
    replaced. The named teachers (``resnet50``...) always train (with ``pretrained``, from ImageNet
    weights under a new head)."""
    name = str(cfg.name)
    if name in SOURCES:
        return sources.build_from_source(cfg, "teacher", num_classes, channels, image_size)
    model = _lookup(TEACHERS, "teacher", name)(cfg, num_classes=num_classes, channels=channels, image_size=image_size)
    return Built(model, pretrained=bool(cfg.get("pretrained", False)), head_replaced=True)
