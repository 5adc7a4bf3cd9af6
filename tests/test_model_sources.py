"""The models people bring (distill/models/sources.py): torchvision by name, timm, Hugging Face and
their own class, built with random weights or loaded from local files through the same calls a user
makes; a loaded teacher used as it is (its accuracy measured once), fine-tuned, or refused by name."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distill.errors import CheckpointError, ConfigError, UnknownModelError
from distill.models.registry import build_student, build_teacher_from
from distill.models.sources import build_from_source
from distill.teacher.provision import provision_teacher

DIGITS = {"num_classes": 10, "channels": 1, "image_size": 8}
FP = {"data": "test"}


class TinyNet(nn.Module):
    """A user's own class (teacher=custom teacher._target_=tests.test_model_sources.TinyNet)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _cfg(tmp_path, **teacher):
    base = {"name": "torchvision", "pretrained": False, "checkpoint": None, "epochs": 1, "batch_size": 8,
            "optim": {"name": "sgd", "lr": 0.1}, "cache_dir": str(tmp_path / "cache"), "finetune_epochs": 0, "finetune": "head"}
    return OmegaConf.create({"teacher": {**base, **teacher}, "seed": 0})


def _never_trained(model):
    raise AssertionError("a teacher used as it is must not be trained")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"])
def test_any_torchvision_model_by_name_fits_the_data(make_cfg, arch):
    built = build_teacher_from(make_cfg("teacher=torchvision", f"teacher.arch={arch}").teacher, **DIGITS)
    assert not built.pretrained and built.head_replaced
    assert built.model.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    student = build_student(make_cfg("student=torchvision", f"student.arch={arch}").student, **DIGITS)
    assert student.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_timm_models_and_a_resized_transformer(make_cfg):
    built = build_teacher_from(make_cfg("teacher=timm", "teacher.arch=resnet18").teacher, **DIGITS)
    assert built.model.conv1.kernel_size == (3, 3) and built.model.conv1.in_channels == 1  # the small-input stem
    vit = build_teacher_from(make_cfg("teacher=timm", "teacher.arch=vit_tiny_patch16_224", "teacher.resize=32").teacher, **DIGITS)
    assert type(vit.model).__name__ == "Resized" and vit.model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("overrides, error, message", [
    (["teacher=torchvision", "teacher.arch=convnext_tiniy"], UnknownModelError, "did you mean convnext_tiny"),
    (["teacher=torchvision", "teacher.arch=resnet18", "teacher.weights=IMAGENET9K"], ConfigError, "resnet18 has the weights DEFAULT, IMAGENET1K_V1"),
    (["teacher=timm", "teacher.arch=resnet181"], UnknownModelError, "is not a timm model; did you mean resnet18"),
    (["teacher=custom", "teacher._target_=tests.test_model_sources.Nope"], ConfigError, "teacher._target_=tests.test_model_sources.Nope: cannot import"),
    (["teacher=custom", "teacher._target_=tests.test_model_sources.TinyNet", "+teacher.kwargs.classes=3"], ConfigError,
     "predicts 3 classes and the data has 10"),
    (["teacher=custom", "teacher._target_=tests.test_model_sources.TinyNet", "+teacher.kwargs.depth=3"], ConfigError,
     "teacher.kwargs: tests.test_model_sources.TinyNet\\(depth=3\\)"),
])
def test_bad_model_names_are_named_with_the_nearest(make_cfg, overrides, error, message):
    with pytest.raises(error, match=message):
        build_teacher_from(make_cfg(*overrides).teacher, **DIGITS)


def test_torchvision_weights_load_through_torchvisions_own_call_from_the_local_hub_cache(tmp_path, monkeypatch):
    """teacher.weights=IMAGENET1K_V1 goes through torchvision's get_model(weights=...), which reads the
    file from $TORCH_HOME/hub/checkpoints when it is there (as after a first download)."""
    import torchvision

    reference = torchvision.models.resnet18(num_classes=1000)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(reference.state_dict(), hub / url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = _cfg(tmp_path, arch="resnet18", weights="IMAGENET1K_V1")
    built = build_teacher_from(cfg.teacher, num_classes=10, channels=3, image_size=32)
    assert built.pretrained and built.head_replaced  # 1000 ImageNet classes: a new 10-class head
    assert torch.equal(built.model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    # used as it is it would predict the wrong classes: named, with the way out
    with pytest.raises(ConfigError, match="set teacher.finetune_epochs=N"):
        provision_teacher(cfg, {"num_classes": 10, "channels": 3, "image_size": 32}, FP, _never_trained)
    # fine-tuned, its head only: the body stays the pretrained one
    seen = {}

    def train(model, epochs=None):
        seen["epochs"], seen["trainable"] = epochs, sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return 0.9

    tuned = _cfg(tmp_path, arch="resnet18", weights="IMAGENET1K_V1", finetune_epochs=2)
    model, info = provision_teacher(tuned, {"num_classes": 10, "channels": 3, "image_size": 32}, FP, train)
    assert seen == {"epochs": 2, "trainable": ["fc.bias", "fc.weight"]} and info.source == "fine-tuned" and info.test_acc == 0.9
    _, again = provision_teacher(tuned, {"num_classes": 10, "channels": 3, "image_size": 32}, FP, _never_trained)
    assert again.source == "cache"


def test_timm_pretrained_weights_from_a_local_file_used_as_is_with_the_accuracy_measured_once(tmp_path):
    import timm

    reference = timm.create_model("resnet18", num_classes=1000)
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    cfg = _cfg(tmp_path, name="timm", arch="resnet18.a1_in1k", pretrained=True, weights_file=str(weights))
    shape = {"num_classes": 1000, "channels": 3, "image_size": 224}
    measured = []

    def measure(model):
        measured.append(1)
        return 0.42

    model, info = provision_teacher(cfg, shape, FP, _never_trained, measure_fn=measure)
    assert info.source == "as-is" and info.test_acc == 0.42 and measured == [1]
    assert torch.equal(model.fc.weight, reference.fc.weight)  # the file's head, kept
    _, again = provision_teacher(cfg, shape, FP, _never_trained, measure_fn=measure)
    assert again.test_acc == 0.42 and measured == [1]  # read from the cache
    [entry] = (tmp_path / "cache" / "accuracy").glob("*.json")
    assert json.loads(entry.read_text()) == {"test_acc": 0.42}


def test_own_class_with_a_wrapped_prefixed_checkpoint(tmp_path):
    net = TinyNet(width=8)
    path = tmp_path / "mine.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    own = {"name": "custom", "_target_": "tests.test_model_sources.TinyNet", "kwargs": {"width": 8}, "checkpoint": str(path)}
    model, info = provision_teacher(_cfg(tmp_path, **own, checkpoint_key="state_dict", checkpoint_prefix="module."),
                                    DIGITS, FP, _never_trained, measure_fn=lambda m: 0.3)
    assert info.source == "checkpoint" and info.test_acc == 0.3
    assert torch.equal(model.fc.weight, net.fc.weight)
    with pytest.raises(CheckpointError, match=r"4 missing key\(s\) \(first: body.1.bias, body.1.weight, fc.bias\), 4 unexpected "
                                              r"\(first: module.body.1.bias.*set teacher.checkpoint_prefix"):
        provision_teacher(_cfg(tmp_path, **own, checkpoint_key="state_dict"), DIGITS, FP, _never_trained)
    with pytest.raises(CheckpointError, match="teacher.checkpoint_key=model: .* its top-level keys: epoch, state_dict"):
        provision_teacher(_cfg(tmp_path, **own, checkpoint_key="model"), DIGITS, FP, _never_trained)


def _tiny_hf_model(directory, labels=10, channels=1):
    from transformers import AutoModelForImageClassification, ResNetConfig

    config = ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=labels,
                          id2label={i: str(i) for i in range(labels)}, label2id={str(i): i for i in range(labels)})
    model = AutoModelForImageClassification.from_config(config)
    model.save_pretrained(directory)
    return model


def test_a_hugging_face_model_from_a_saved_directory(tmp_path):
    reference = _tiny_hf_model(tmp_path / "hf")
    built = build_teacher_from(OmegaConf.create({"name": "hf", "repo": str(tmp_path / "hf")}), **DIGITS)
    assert built.pretrained and not built.head_replaced and built.classes == [str(i) for i in range(10)]
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(built.model.eval()(x), reference.eval()(pixel_values=x).logits)
    other = build_teacher_from(OmegaConf.create({"name": "hf", "repo": str(tmp_path / "hf")}), num_classes=4, channels=1, image_size=8)
    assert other.head_replaced and other.model(x).shape == (3, 4)
    with pytest.raises(ConfigError, match="teacher.repo=.*nowhere: not a Hugging Face model"):
        build_teacher_from(OmegaConf.create({"name": "hf", "repo": str(tmp_path / "nowhere")}), **DIGITS)


def _digits_dataset(directory, n=300):
    """A Hugging Face dataset of digits images (PIL, mode L) with ClassLabel names, saved with save_to_disk."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8), mode="L") for img in digits.images[:n]]
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    full = datasets.Dataset.from_dict({"img": images, "digit": digits.target[:n].tolist()}, features=features)
    parts = full.train_test_split(test_size=0.3, seed=0, stratify_by_column="digit")
    datasets.DatasetDict({"train": parts["train"], "test": parts["test"]}).save_to_disk(str(directory))


@pytest.mark.integration
def test_train_py_with_a_hugging_face_teacher_used_as_is_and_a_hugging_face_dataset(tmp_path):
    """A whole run: a tiny HF model saved with save_pretrained (its labels named as the dataset's) as the
    teacher, not trained; a digits dataset saved with save_to_disk (no validation split: carved from
    train); the teacher's accuracy measured in the first run and read from the cache in the second."""
    from .conftest import run_script

    _tiny_hf_model(tmp_path / "model")
    _digits_dataset(tmp_path / "data")
    env = {"DISTILL_CACHE_DIR": str(tmp_path / "cache")}
    args = ["teacher=hf", f"teacher.repo={tmp_path / 'model'}", "data=hf", f"data.name={tmp_path / 'data'}", "data.image_key=img",
            "data.label_key=digit", "student=mlp", "trainer.max_epochs=2", "logger=csv", "measure.latency=off",
            "export.formats=[]", "trainer.enable_progress_bar=false"]
    first = run_script("train.py", *args, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert "used as it is (not trained); test accuracy" in log and "measured and cached" in log
    assert "has no validation split" in log
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["teacher"]["source"] == "as-is" and summary["teacher"]["train_seconds"] == 0.0
    assert summary["data"]["name"] == "hf"  # data.name=<directory> read as data.root
    assert summary["data"]["num_classes"] == 10 and summary["data"]["channels"] == 1 and summary["data"]["image_size"] == 8
    assert not (tmp_path / "one" / "teacher").exists()  # no teacher training ran
    second = run_script("train.py", *args, f"hydra.run.dir={tmp_path}/two", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "read from the cache" in second.stdout + second.stderr
    again = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert again["teacher"]["test_acc"] == summary["teacher"]["test_acc"]


def test_own_class_gets_the_datas_class_count_and_channels_when_it_takes_them():
    """examples/nets.py's DigitsNet(num_classes, in_channels, width): both from the data, width from kwargs."""
    cfg = OmegaConf.create({"name": "custom", "_target_": "examples.nets.DigitsNet", "kwargs": {"width": 8}})
    built = build_from_source(cfg, "teacher", num_classes=5, channels=3, image_size=8)
    assert built.model.fc.out_features == 5 and built.model.features[0].in_channels == 3
    assert built.model.features[0].out_channels == 8
