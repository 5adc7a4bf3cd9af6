import pytest
import torch
from omegaconf import OmegaConf

from distill.errors import UnknownModelError
from distill.models.registry import STUDENTS, TEACHERS, build_student, build_teacher
from distill.models.sources import SOURCES

# The named models (the models people bring, SOURCES, need their arch/repo/class: tests/test_model_sources.py)
NAMED_STUDENTS, NAMED_TEACHERS = sorted(set(STUDENTS) - set(SOURCES)), sorted(set(TEACHERS) - set(SOURCES))

SHAPES = [dict(num_classes=10, channels=1, image_size=8), dict(num_classes=7, channels=3, image_size=32)]
STUDENT_CFG = OmegaConf.create({"hidden_sizes": [32], "channels": [8, 16], "dropout": 0.0})


@pytest.mark.parametrize("shape", SHAPES, ids=["digits", "rgb32"])
@pytest.mark.parametrize("name", NAMED_STUDENTS)
def test_student_output_shape_follows_data(name, shape):
    model = build_student(OmegaConf.merge(STUDENT_CFG, {"name": name}), **shape).eval()
    x = torch.randn(2, shape["channels"], shape["image_size"], shape["image_size"])
    assert model(x).shape == (2, shape["num_classes"])


@pytest.mark.parametrize("name", NAMED_TEACHERS)
def test_teacher_small_input_stem(name):
    model = build_teacher(OmegaConf.create({"name": name, "pretrained": False}), num_classes=10, channels=1, image_size=8).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_large_input_keeps_imagenet_stem():
    model = build_teacher(OmegaConf.create({"name": "resnet18"}), num_classes=5, channels=3, image_size=96)
    assert model.conv1.kernel_size == (7, 7)


def test_unknown_student_lists_choices():
    with pytest.raises(UnknownModelError, match="unknown student 'vit'; choose from: cnn, custom, hf, mlp, mobilenet_v3_small, resnet18, timm, torchvision"):
        build_student(OmegaConf.create({"name": "vit"}), 10, 1, 8)
