from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from distill.data.datamodules import build_datamodule
from distill.errors import ConfigError

from .conftest import write_fake_cifar10

BASE = dict(batch_size=16, num_workers=0, val_fraction=0.1, test_fraction=0.2, split_seed=0, pin_memory=False,
            persistent_workers=False, augment=False, verify_checksums=True, download=False, root=None,
            num_classes=None, channels=None, image_size=None, num_samples=200, mean=None, std=None)


def dm_for(**kw):
    return build_datamodule(OmegaConf.create({**BASE, **kw}))


def _labels(ds) -> list[int]:
    return [int(ds[i][1]) for i in range(len(ds))]


def test_digits_split_is_stratified_disjoint_and_seeded():
    dm = dm_for(name="digits")
    assert dm.shape == {"num_classes": 10, "channels": 1, "image_size": 8}
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[2] == 360
    idx = [set(s.indices) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    counts = np.bincount(_labels(dm.test_set), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each class
    again = dm_for(name="digits")
    again.setup()
    assert again.test_set.indices == dm.test_set.indices
    other = dm_for(name="digits", split_seed=1)
    other.setup()
    assert other.test_set.indices != dm.test_set.indices
    x, _ = dm.train_set[0]
    assert x.shape == (1, 8, 8)


def test_digits_rejects_a_conflicting_shape():
    with pytest.raises(ValueError, match="data.num_classes=5 does not match digits"):
        dm_for(name="digits", num_classes=5)


def test_synthetic_any_shape():
    dm = dm_for(name="synthetic", num_classes=4, channels=2, image_size=5, num_samples=100)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (2, 5, 5) and int(y.max()) < 4


def test_train_loader_order_is_seeded():
    dm = dm_for(name="digits")
    dm.setup()
    torch.manual_seed(3)
    a = next(iter(dm.train_dataloader()))[1]
    torch.manual_seed(3)
    b = next(iter(dm.train_dataloader()))[1]
    assert torch.equal(a, b)


def test_evaluation_shards_have_equal_batches_and_count_each_sample_once(monkeypatch):
    """3 ranks over an odd-sized test split (41 samples, batches of 13): every rank runs the same
    number of batches (ZeRO-3 needs it: each forward pass is a collective), and once the padding is
    dropped the shards cover every sample exactly once, so the synced accuracy is exact."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    from distill.data.datasets import PaddedSplit
    from distill.data.samplers import EvenShardSampler
    from distill.distillation.losses.kd import KDLoss
    from distill.distillation.module import DistillationModule
    from distill.runtime.rank_sync import PADDING_LABEL

    dm = dm_for(name="synthetic", num_classes=3, channels=1, image_size=2, num_samples=200, test_fraction=0.205, batch_size=13)
    dm.setup()
    n, world = len(dm.test_set), 3
    assert n == 41
    # The unpadded sampler this replaces: 14, 14 and 13 samples, so 2, 2 and 1 batches (rank 2 would leave ZeRO-3 hanging).
    unpadded = [len(list(UnrepeatedDistributedSampler(dm.test_set, num_replicas=world, rank=r, shuffle=False))) for r in range(world)]
    assert [-(-k // 13) for k in unpadded] == [2, 2, 1]

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    torch.manual_seed(0)
    module = DistillationModule(model, None, KDLoss(temperature=1.0, alpha=0.0), OmegaConf.create({"name": "adamw"}), 3)
    monkeypatch.setattr("distill.data.datamodules.is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: world)
    batches, val_batches, seen = [], [], []
    for rank in range(world):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, r=rank, **k: r)
        loader = dm.test_dataloader()
        assert isinstance(loader.sampler, EvenShardSampler) and len(loader.sampler) == 14
        mine = list(loader)
        batches.append(len(mine))
        with torch.no_grad():
            for x, y in mine:
                module.test_acc.update(model(x), y)  # the metric the synced test/acc is computed from
                seen += [tuple(row.tolist()) for row in x.flatten(1)[y != PADDING_LABEL]]
        val_batches.append(len(dm.val_dataloader()))  # validation is sharded the same way
    assert batches == [2, 2, 2] and len(set(val_batches)) == 1
    split = [tuple(dm.test_set[i][0].flatten().tolist()) for i in range(n)]
    assert len(seen) == n and set(seen) == set(split)  # each sample once: no padding counted, none missed
    with torch.no_grad():
        xs, ys = torch.stack([dm.test_set[i][0] for i in range(n)]), torch.stack([dm.test_set[i][1] for i in range(n)])
        exact = float((model(xs).argmax(1) == ys).float().mean())
    assert float(module.test_acc.compute()) == pytest.approx(exact, abs=1e-7)
    # Fewer samples than ranks: every rank still gets one item (a padded repeat where it has none).
    tiny = torch.utils.data.TensorDataset(torch.zeros(1, 2), torch.tensor([1]))
    shards = [[PaddedSplit(tiny, 3)[i][1].item() for i in EvenShardSampler(1, 3, r)] for r in range(3)]
    assert shards == [[1], [PADDING_LABEL], [PADDING_LABEL]]


def test_cifar10_loads_the_torchvision_file_layout(tmp_path):
    write_fake_cifar10(tmp_path)
    dm = dm_for(name="cifar10", root=str(tmp_path), verify_checksums=False, augment=True)
    assert dm.shape == {"num_classes": 10, "channels": 3, "image_size": 32}
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 100 and len(dm.test_set) == 30
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1.5  # normalised


def test_cifar10_checksum_failure_is_a_clear_error(tmp_path):
    write_fake_cifar10(tmp_path)
    dm = dm_for(name="cifar10", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.root=.*data.download=true"):
        dm.setup()


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    dm = dm_for(name="imagefolder", root=str(tmp_path), image_size=16, channels=1)
    assert dm.shape == {"num_classes": 3, "channels": 1, "image_size": 16}
    dm.setup()
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (9, 1, 16, 16) and sorted(set(y.tolist())) == [0, 1, 2]
    assert dm.test_split == "val"  # no test/ folder: the run says its test accuracy is on val/
    shutil.copytree(tmp_path / "val", tmp_path / "test")
    with_test = dm_for(name="imagefolder", root=str(tmp_path), image_size=16, channels=1)
    with_test.setup()
    assert with_test.test_split == "test"


def test_imagefolder_missing_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        dm_for(name="imagefolder", root=str(tmp_path))


def test_train_fraction_is_a_seeded_stratified_subset_for_the_student_only(make_cfg):
    import collections

    from distill.data.datamodules import build_datamodule
    from distill.errors import ConfigError

    full = build_datamodule(make_cfg().data)
    full.setup()
    part = build_datamodule(make_cfg("data.train_fraction=0.25").data)
    part.setup()
    again = build_datamodule(make_cfg("data.train_fraction=0.25").data)
    again.setup()
    rows = [part.train_set[i][1].item() for i in range(len(part.train_set))]
    assert len(part.train_set) == round(0.25 * len(full.train_set))
    assert [again.train_set[i][1].item() for i in range(len(again.train_set))] == rows  # seeded
    per_class = collections.Counter(rows)
    assert max(per_class.values()) - min(per_class.values()) <= 2  # every class keeps its share
    assert len(part.test_set) == len(full.test_set) and len(part.val_set) == len(full.val_set)
    # the teacher's key is that of the full split: one teacher serves every fraction; the student's data differs
    assert part.fingerprint(subset=False) == full.fingerprint() != part.fingerprint()
    with pytest.raises(ConfigError, match="data.train_fraction=0.001 keeps too few"):
        build_datamodule(make_cfg("data.train_fraction=0.001").data).setup()


def _folder(root, size=(40, 48)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagenet_recipe_and_a_timm_models_own_data_config(tmp_path):
    """data=imagenet: RandomResizedCrop + flip when augmenting, resize to size/0.875 and center crop
    otherwise (the evaluation transform, the same view every epoch), ImageNet's statistics; or with
    data.transform=model a timm model's own data config."""
    _folder(tmp_path)
    dm = dm_for(name="imagenet", root=str(tmp_path), image_size=32, augment=True)
    assert dm.shape == {"num_classes": 2, "channels": 3, "image_size": 32}
    names = [type(t).__name__ for t in dm.transforms(train=True).transforms]
    assert "RandomResizedCrop" in names and "RandomHorizontalFlip" in names
    evaluation = dm.transforms(train=False).transforms
    assert [type(t).__name__ for t in evaluation][2:4] == ["Resize", "CenterCrop"] and evaluation[2].size == [37]
    assert evaluation[-1].mean == [0.485, 0.456, 0.406]
    fixed = dm_for(name="imagenet", root=str(tmp_path), image_size=32, augment=False)
    assert "RandomResizedCrop" not in [type(t).__name__ for t in fixed.transforms(train=True).transforms]
    dm.setup()
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 32, 32)
    timm_dm = dm_for(name="imagenet", root=str(tmp_path), transform="model", model_arch="resnet18.a1_in1k", augment=False)
    text = repr(timm_dm.transforms(train=False))
    assert "CenterCrop" in text and "0.485" in text
    with pytest.raises(ConfigError, match="data.transform=model needs teacher=timm"):
        dm_for(name="imagenet", root=str(tmp_path), transform="model", model_arch=None).transforms(train=False)


def test_hf_dataset_splits_shape_and_class_names(tmp_path):
    from .test_model_sources import _digits_dataset

    _digits_dataset(tmp_path / "d", n=200)
    dm = dm_for(name="hf", root=str(tmp_path / "d"), image_key="img", label_key="digit")
    assert dm.shape == {"num_classes": 10, "channels": 1, "image_size": 8} and dm.class_names == [str(i) for i in range(10)]
    dm.setup()
    assert len(dm.test_set) == 60 and len(dm.train_set) + len(dm.val_set) == 140  # the saved test split; val carved from train
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert len(dm.train_labels()) == len(dm.train_set)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    with pytest.raises(ConfigError, match="data.label_key=label: the dataset's columns are img, digit"):
        dm_for(name="hf", root=str(tmp_path / "d"), image_key="img")
    with pytest.raises(ConfigError, match="data.root=.*nowhere: not a Hugging Face dataset"):
        dm_for(name="hf", root=str(tmp_path / "nowhere"))


def test_hf_dataset_with_string_labels_rgba_images_and_an_unlabelled_test_split(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (6, 6, 4), dtype=np.uint8), mode="RGBA") for _ in range(40)]
    labels = ["dog", "cat"] * 20
    train = datasets.Dataset.from_dict({"image": images, "label": labels})
    test = datasets.Dataset.from_dict({"image": images[:6], "label": ["cat"] * 6})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "s"))
    dm = dm_for(name="hf", root=str(tmp_path / "s"))
    assert dm.class_names == ["cat", "dog"] and dm.shape == {"num_classes": 2, "channels": 3, "image_size": 6}
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 6, 6) and set(y.tolist()) <= {0, 1}  # RGBA read as RGB; "cat" -> 0, "dog" -> 1
    assert dm.train_set.targets == [{"cat": 0, "dog": 1}[labels[i]] for i in dm.train_set.indices]
    ints = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 20})
    datasets.DatasetDict({"train": ints, "test": datasets.Dataset.from_dict({"image": images[:6], "label": [-1] * 6})}).save_to_disk(
        str(tmp_path / "u"))
    unlabelled = dm_for(name="hf", root=str(tmp_path / "u"))
    unlabelled.setup()
    assert min(unlabelled.test_set.targets) >= 0 and unlabelled.test_set.split is not None  # carved from train instead


def test_hf_data_name_is_read_as_the_hub_id_or_directory(tmp_path):
    """``data=hf data.name=<id or directory>`` (the issue's spelling) is ``data.root=<that>``; a typo of a
    registered dataset name still fails naming the choices."""
    from distill.checks import validate

    from .conftest import compose_config

    cfg = compose_config(["data=hf", "data.name=someone/beans"], tmp_path / "out", tmp_path / "cache")
    validate(cfg)
    assert cfg.data.name == "hf" and cfg.data.root == "someone/beans"
    (tmp_path / "saved").mkdir()
    cfg = compose_config(["data=hf", f"data.name={tmp_path / 'saved'}"], tmp_path / "out", tmp_path / "cache")
    validate(cfg)
    assert cfg.data.root == str(tmp_path / "saved")
    cfg = compose_config(["data.name=digts"], tmp_path / "out", tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.name: unknown dataset 'digts'; choose from: .*digits"):
        validate(cfg)
