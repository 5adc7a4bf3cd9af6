"""Data modules. Each one knows its shape (classes, channels, image size) *before* loading any
data, so models are built from the data module and a class-count mismatch cannot be configured.

- ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, 10 classes), a seeded
  stratified train/val/test split. Ships with scikit-learn: no network needed. ``augment``: random
  one-pixel shifts.
- ``synthetic``: class-conditional Gaussian tensors of any shape, for tests and speed measurements.
- ``cifar10`` / ``cifar100``: torchvision's datasets (``data.root``, ``data.download``), with the
  standard augmentation (random crop with 4-pixel padding, horizontal flip) and normalisation.
- ``imagefolder``: any ``root/{train,val[,test]}/<class>/*.png`` tree (``test`` falls back to ``val``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    default_collate,
)
from torchvision import datasets
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from distill.data.datasets import (
    Batched,
    PaddedSplit,
    TensorSplit,
    TransformedSubset,
    WithTeacherRows,
    as_batch,
)
from distill.data.mixing import MixedCollate, batch_mix
from distill.data.samplers import EpochBatchSampler, EpochShuffleSampler, EvenShardSampler
from distill.data.transforms import image_transforms
from distill.errors import ConfigError
from distill.runtime.rank_sync import is_distributed

log = logging.getLogger(__name__)

DATASETS: dict[str, Callable[[DictConfig], BaseDataModule]] = {}


def register_dataset(name: str) -> Callable:
    def wrap(cls: type) -> type:
        DATASETS[name] = cls
        return cls

    return wrap


def resolve_hub_name(cfg: DictConfig) -> None:
    """``data=hf data.name=<hub id or save_to_disk directory>`` is read as ``data.root=<that>``:
    a hub-style spelling, next to ``data.root``. Only when the name is not a dataset of
    :data:`DATASETS`, reads as a hub id (``owner/name``) or an existing directory, and ``data.root`` is unset."""
    data = cfg.data
    if data.name in DATASETS or (not OmegaConf.is_missing(data, "root") and data.root):
        return
    source = str(data.name)
    if "/" not in source and not Path(source).expanduser().is_dir():
        return  # a typo of a dataset name: the registry check names the choices
    with open_dict(data):
        data.root, data.name = source, "hf"


def check_data(cfg: DictConfig) -> None:
    """A dataset read from disk says where it is (``data.name`` is checked against :data:`DATASETS` first)."""
    data = cfg.data
    if DATASETS[data.name].uses_root and not data.root:
        raise ConfigError(f"data.root must be set for data={data.name} (the dataset directory)")


def datamodule_from(saved: Any, overrides: dict[str, Any] | None = None) -> BaseDataModule:
    """The data module of a saved ``data`` config (an artifact's or a checkpoint's), with
    ``overrides`` on top (where the data lives now, a batch size)."""
    return build_datamodule(OmegaConf.merge(OmegaConf.create(saved), overrides or {}))


def build_datamodule(cfg: DictConfig) -> BaseDataModule:
    """Build the data module named by ``cfg.name`` (the ``data`` config group)."""
    if cfg.name not in DATASETS:
        raise KeyError(f"unknown dataset {cfg.name!r}; choose from: {', '.join(sorted(DATASETS))}")
    return DATASETS[cfg.name](cfg)


class BaseDataModule(L.LightningDataModule):
    """Shared loader settings. Subclasses set ``num_classes``, ``channels``, ``image_size`` in
    ``__init__`` and ``train_set``/``val_set``/``test_set`` in ``setup``."""

    num_classes: int
    channels: int
    image_size: int
    uses_root = True  # whether data.root locates the data (not for built-in or generated data)
    test_split = "test"  # where the test accuracy comes from ("val" when a dataset has no test split)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.batch_size = int(cfg.batch_size)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        # The teacher's precomputed logits for the training split (a dense tensor or a memory-mapped
        # TeacherOutputs, distill/teacher/outputs.py): training batches then carry each sample's row.
        # Or a dict of columns (the logits of each teacher, the teacher's cached features), and
        # ``with_index``: the batches also carry the samples' indices (CRD's memory bank).
        self.teacher_table: Any = None
        self.with_index = False
        # False once the training set is replayed views that are mixed already (teacher.cache_views).
        self.batch_mixing = True
        self.class_names: list[str] | None = None  # where the data names its classes (a loaded teacher's must match)
        # (epoch, batches already trained in it) of a mid-epoch checkpoint being resumed; set by
        # distill.rng_state.RNGState from the checkpoint, read when the training loader is built.
        self.resume_position: tuple[int, int] | None = None

    @property
    def shape(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "channels": self.channels, "image_size": self.image_size}

    def fingerprint(self, subset: bool = True) -> dict[str, Any]:
        """Everything about the data that determines what a model trained on it learns; ``subset=False``:
        of the full training split, whatever ``data.train_fraction`` (what the teacher trains on)."""
        keys = ("name", "val_fraction", "test_fraction", "split_seed", "augment", "num_samples", "mean", "std")
        fp = {k: self.cfg.get(k) for k in keys}
        if subset and self.cfg.get("train_fraction", 1.0) < 1.0:  # only then: the keys cached before it existed stay
            fp["train_fraction"] = self.cfg.get("train_fraction", 1.0)
        # What the files are, not where they are: a copy staged to $TMPDIR in each SLURM job is the
        # same data (and the same teacher). Only a hash is stored: paths can be private.
        fp["content"] = self.content_id() if self.uses_root and self.cfg.get("root") else None
        fp["mean"] = list(fp["mean"]) if fp["mean"] is not None else None
        fp["std"] = list(fp["std"]) if fp["std"] is not None else None
        return {**fp, **self.shape}

    def content_id(self) -> str:
        """A hash of the dataset's files, independent of where ``data.root`` puts them: every file's
        path relative to the root and its size (subclasses narrow it to their own files)."""
        return _files_digest(Path(self.cfg.root).expanduser(), with_sizes=True)

    def train_labels(self) -> torch.Tensor:
        """The training split's labels in sample order (for CRD's negatives, drawn from the other
        classes): from the label arrays where the split has them, without reading any image."""
        split = self.train_set
        if split is None:
            raise RuntimeError("train_labels before setup")
        return torch.as_tensor(_labels_of(split), dtype=torch.long)

    def prepare_and_check(self) -> None:
        """Download the data (if ``data.download``) and read it now, so that a missing or empty
        dataset fails before any model is built or trained. Idempotent (setup() is)."""
        if self.uses_root and self.cfg.get("download"):
            root = Path(self.cfg.root).expanduser()
            root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(root / ".download.lock")):  # one download, however many processes
                self.prepare_data()
        self.setup("fit")

    def _loader(self, dataset: Dataset | None, shuffle: bool, batch_size: int | None = None, shard: bool = False,
                mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("data module used before setup()")
        sampler = None
        if shard and is_distributed():
            # Evaluation shards of equal length, so every rank runs the same number of batches (under
            # ZeRO-3 each forward pass is a collective: a rank with one batch more would hang). The
            # padding repeats samples labelled PADDING_LABEL, which the accuracy ignores: the synced
            # accuracy still counts each sample of the split exactly once.
            sampler = EvenShardSampler(len(dataset), torch.distributed.get_world_size(), torch.distributed.get_rank())
            dataset = PaddedSplit(dataset, sampler.padded_size)
        # Every loader has its own generator: creating an iterator then never draws from the global
        # RNG (which would shift dropout and augmentation in a resumed run, see rng_state.py).
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**62)
        if sampler is None and shuffle:
            # The order of epoch e is a function of (seed, e) alone, sharded over the ranks; this
            # module does the sharding (the Trainer runs with use_distributed_sampler=False).
            world = torch.distributed.get_world_size() if is_distributed() else 1
            rank = torch.distributed.get_rank() if is_distributed() else 0
            sampler = EpochShuffleSampler(len(dataset), torch.initial_seed(), generator, world, rank, batch_size or self.batch_size)
            if self.resume_position is not None:
                sampler.resume_at(*self.resume_position)
            shuffle = False
        workers = int(self.cfg.num_workers)
        pin = self.cfg.pin_memory if self.cfg.pin_memory is not None else torch.cuda.is_available()
        batch_size = batch_size or self.batch_size
        if hasattr(dataset, "gather"):
            # A dataset that gathers a whole batch at once (an in-memory split; distill/data/datasets.py):
            # the loader fetches each batch of the batch sampler with one call, collated already.
            order = sampler if sampler is not None else (RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset))
            collate: Callable[[Any], Any] = as_batch if mix is None else MixedCollate(as_batch, mix)
            return DataLoader(Batched(dataset), batch_sampler=EpochBatchSampler(order, batch_size, drop_last=False), collate_fn=collate,
                              num_workers=workers, pin_memory=pin, persistent_workers=bool(self.cfg.persistent_workers) and workers > 0,
                              generator=generator)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=bool(self.cfg.persistent_workers) and workers > 0,
            generator=generator,
            drop_last=False,
            collate_fn=None if mix is None else MixedCollate(default_collate, mix),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_set
        if (self.teacher_table is not None or self.with_index) and dataset is not None:
            dataset = WithTeacherRows(dataset, self.teacher_table, self.with_index)  # (x, y, teacher outputs)
        # Mixup / CutMix of whole batches; replayed views (teacher.cache_views) carry their own mixing.
        mix = batch_mix(self.cfg, self.num_classes) if self.batch_mixing else None
        return self._loader(dataset, shuffle=True, mix=mix)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, shard=True)

    def test_dataloader(self, shard: bool = True) -> DataLoader:
        """The test split; under data parallelism each rank gets its own shard (``shard=False``:
        all of it, e.g. to evaluate a converted model on one process)."""
        return self._loader(self.test_set, shuffle=False, shard=shard)


def _labels_of(split: Dataset) -> np.ndarray:
    if hasattr(split, "gather"):  # in-memory tensors
        return np.asarray(split.gather(list(range(len(split))))[1])  # type: ignore[arg-type, attr-defined]
    if hasattr(split, "targets"):  # torchvision's folders and CIFAR
        return np.asarray(split.targets)
    base = getattr(split, "dataset", None) or getattr(split, "base", None)  # Subset, TransformedSubset, ReplayedViews
    if base is not None and hasattr(split, "indices"):
        return _labels_of(base)[np.asarray(split.indices, dtype=np.int64)]
    return np.asarray([int(split[i][1]) for i in range(len(split))])  # type: ignore[arg-type]


def _files_digest(root: Path, with_sizes: bool, under: tuple[str, ...] = ()) -> str:
    """sha256 over the sorted (relative path[, size]) of every file below ``root`` (or its ``under`` folders)."""
    digest = hashlib.sha256()
    tops = [root / u for u in under] if under else [root]
    for top in tops:
        # os.walk lists names from the directory entries: no stat per file unless sizes are wanted.
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(f for f in files if not f.startswith(".")):
                path = Path(folder) / name
                digest.update(str(path.relative_to(root)).encode())
                if with_sizes:
                    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def _stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int, train_fraction: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a stratified train/val/test split; the same seed gives the same split."""
    idx = np.arange(len(labels))
    train_val, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    rel_val = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(train_val, test_size=rel_val, stratify=labels[train_val], random_state=seed)
    return limit_training(train, labels, train_fraction, seed), val, test


def limit_training(train: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``data.train_fraction``: a seeded, stratified subset of the training indices (every class
    keeps its share; validation and test splits are unchanged). 1.0: all of them."""
    if fraction >= 1.0:
        return train
    try:
        keep, _ = train_test_split(train, train_size=fraction, stratify=labels[train], random_state=seed)
    except ValueError as err:  # too few samples for every class to keep one
        raise ConfigError(f"data.train_fraction={fraction} keeps too few of the {len(train)} training samples "
                          f"for a stratified subset of every class: {err}") from err
    return np.sort(keep)


def _check_fixed_shape(cfg: DictConfig, name: str, **fixed: int) -> None:
    for key, value in fixed.items():
        given = cfg.get(key)
        if given is not None and int(given) != value:
            raise ConfigError(f"data.{key}={given} does not match {name}, which has {key}={value}; leave it null")


@register_dataset("digits")
class DigitsDataModule(BaseDataModule):
    """scikit-learn's 8x8 handwritten digits, standardised with train-split statistics."""

    uses_root = False

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        _check_fixed_shape(cfg, "digits", num_classes=10, channels=1, image_size=8)
        self.num_classes, self.channels, self.image_size = 10, 1, 8

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
        y = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = _stratified_split(
            digits.target, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.split_seed, self.cfg.get("train_fraction", 1.0)
        )
        mean = self.cfg.mean[0] if self.cfg.mean else x[train].mean().item()
        std = self.cfg.std[0] if self.cfg.std else x[train].std().item()
        x = (x - mean) / std
        self.train_set, self.val_set, self.test_set = (TensorSplit(x, y, i.tolist()) for i in (train, val, test))
        if self.cfg.augment:
            # One-pixel random shifts, drawn per sample; edge padding repeats the (blank) border.
            shift = v2.RandomCrop(8, padding=1, padding_mode="edge")
            self.train_set = TransformedSubset(TensorSplit(x, y, list(range(len(y)))), train.tolist(), shift)


@register_dataset("synthetic")
class SyntheticDataModule(BaseDataModule):
    """Class-conditional Gaussians: each class has its own random mean image, plus unit noise.

    Learnable (a model can beat chance), seeded, any shape. For tests and benchmarks only."""

    uses_root = False

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.num_classes = int(cfg.num_classes or 10)
        self.channels = int(cfg.channels or 3)
        self.image_size = int(cfg.image_size or 32)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(int(self.cfg.split_seed))
        n = int(self.cfg.num_samples)
        shape = (self.channels, self.image_size, self.image_size)
        means = torch.randn(self.num_classes, *shape, generator=g)
        y = torch.arange(n) % self.num_classes
        y = y[torch.randperm(n, generator=g)]
        x = means[y] + torch.randn(n, *shape, generator=g)
        train, val, test = _stratified_split(y.numpy(), self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.split_seed,
                                             self.cfg.get("train_fraction", 1.0))
        self.train_set, self.val_set, self.test_set = (TensorSplit(x, y, i.tolist()) for i in (train, val, test))


_CIFAR_STATS = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


class _CIFARDataModule(BaseDataModule):
    name = "cifar10"
    classes = 10

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        _check_fixed_shape(cfg, self.name, num_classes=self.classes, channels=3, image_size=32)
        self.num_classes, self.channels, self.image_size = self.classes, 3, 32

    def _dataset_cls(self) -> type:
        base = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        if self.cfg.verify_checksums:
            return base

        # For local copies whose files differ from the published archive: torchvision's
        # check_integrity() accepts any existing file when its md5 is None.
        return type(
            f"Unverified{base.__name__}",
            (base,),
            {
                "train_list": [[name, None] for name, _ in base.train_list],
                "test_list": [[name, None] for name, _ in base.test_list],
                "meta": {**base.meta, "md5": None},
            },
        )

    def content_id(self) -> str:
        return _files_digest(Path(self.cfg.root).expanduser(), with_sizes=True, under=(self._dataset_cls().base_folder,))

    def prepare_data(self) -> None:
        if self.cfg.download:
            cls = self._dataset_cls()
            for train in (True, False):
                cls(self.cfg.root, train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        cls = self._dataset_cls()
        root = str(Path(self.cfg.root).expanduser())
        try:
            train_full = cls(root, train=True, download=False)
            test = cls(root, train=False, download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{self.name}: no valid dataset under data.root={root} ({err}); "
                "set data.download=true to fetch it, or data.verify_checksums=false for a local copy"
            ) from err
        mean, std = _CIFAR_STATS[self.name]
        mean, std = list(self.cfg.mean or mean), list(self.cfg.std or std)
        labels = np.asarray(train_full.targets)
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=self.cfg.val_fraction, stratify=labels, random_state=self.cfg.split_seed
        )
        train_idx = limit_training(train_idx, labels, self.cfg.get("train_fraction", 1.0), self.cfg.split_seed)
        t_train = image_transforms(self.cfg, 32, 3, mean, std, train=True)
        t_eval = image_transforms(self.cfg, 32, 3, mean, std, train=False)
        self.train_set = TransformedSubset(train_full, train_idx.tolist(), t_train)
        self.val_set = TransformedSubset(train_full, val_idx.tolist(), t_eval)
        self.test_set = TransformedSubset(test, list(range(len(test))), t_eval)


@register_dataset("cifar10")
class CIFAR10DataModule(_CIFARDataModule):
    name, classes = "cifar10", 10


@register_dataset("cifar100")
class CIFAR100DataModule(_CIFARDataModule):
    name, classes = "cifar100", 100


@register_dataset("imagefolder")
class ImageFolderDataModule(BaseDataModule):
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (and optionally ``root/test``)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        root = Path(cfg.root).expanduser()
        train_dir = root / "train"
        if not train_dir.is_dir() or not (root / "val").is_dir():
            raise FileNotFoundError(f"imagefolder: data.root={root} must contain train/ and val/ directories")
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        if len(classes) < 2:
            raise ConfigError(f"data.root: imagefolder: {train_dir} has {len(classes)} class folder(s); need at least 2")
        if cfg.num_classes is not None and cfg.num_classes != len(classes):
            raise ConfigError(f"data.num_classes={cfg.num_classes} but {train_dir} has {len(classes)} class folders")
        self.root, self.classes = root, classes
        self.class_names = list(classes)
        self.num_classes = len(classes)
        self.channels = int(cfg.channels or 3)
        self.image_size = int(cfg.image_size or 64)

    def transforms(self, train: bool) -> Callable:
        c = self.channels
        mean, std = list(self.cfg.mean or [0.5] * c), list(self.cfg.std or [0.5] * c)
        return image_transforms(self.cfg, self.image_size, c, mean, std, train=train)

    def content_id(self) -> str:
        # File names only: stating a million images would slow every run's start.
        return _files_digest(self.root, with_sizes=False, under=tuple(d for d in ("train", "val", "test") if (self.root / d).is_dir()))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        t_train, t_eval = self.transforms(train=True), self.transforms(train=False)
        test_dir = self.root / "test" if (self.root / "test").is_dir() else self.root / "val"
        if test_dir.name == "val":  # said in the summary and under the table, not only here
            self.test_split = "val"
            log.warning("imagefolder: %s has no test/ folder: the test accuracy is measured on val/", self.root)
        try:
            self.train_set = ImageFolder(str(self.root / "train"), transform=t_train)
            self.val_set = ImageFolder(str(self.root / "val"), transform=t_eval)
            self.test_set = ImageFolder(str(test_dir), transform=t_eval)
        except FileNotFoundError as err:  # torchvision's message names the classes, not the directory
            self.train_set = None
            raise FileNotFoundError(f"imagefolder: data.root={self.root}: {err}".strip()) from err
        for split in (self.val_set, self.test_set):
            if split.classes != self.classes:
                raise ConfigError(f"data.root: imagefolder: class folders of {split.root} differ from {self.root / 'train'}")
        if self.cfg.get("train_fraction", 1.0) < 1.0:
            targets = np.asarray(self.train_set.targets)
            keep = limit_training(np.arange(len(targets)), targets, self.cfg.get("train_fraction", 1.0), self.cfg.split_seed)
            self.train_set = Subset(self.train_set, keep.tolist())


class HFSplit(Dataset):
    """Rows ``indices`` of a Hugging Face ``datasets`` split: ``(transform(image), label)``."""

    def __init__(self, split: Any, indices: list[int], image_key: str, label_key: str, transform: Callable,
                 label_ids: dict[Any, int] | None = None) -> None:
        self.split, self.indices, self.image_key, self.transform = split, list(indices), image_key, transform
        labels = split[label_key]
        labels = np.asarray([label_ids[v] for v in labels] if label_ids is not None else labels)
        self.targets = labels[np.asarray(self.indices, dtype=np.int64)].tolist()  # read once: no image decoded

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.split[self.indices[i]][self.image_key]
        if getattr(image, "mode", "RGB") not in ("L", "RGB"):  # RGBA, palette, 16-bit: as RGB (the transform makes it grey if asked)
            image = image.convert("RGB")
        return self.transform(image), self.targets[i]


_VALIDATION_NAMES = ("validation", "valid", "val", "dev")


@register_dataset("hf")
class HFDataModule(BaseDataModule):
    """A Hugging Face ``datasets`` image-classification set: ``data=hf data.root=<hub id, or a
    directory written by save_to_disk>``, its images under ``data.image_key`` and its labels under
    ``data.label_key``. Its ``train`` split trains; ``validation`` (or ``valid``, ``val``, ``dev``)
    validates and ``test`` tests. A split it lacks is carved from train, stratified and seeded
    (``data.val_fraction``, ``data.test_fraction``, ``data.split_seed``). The shape comes from the
    data: the class count and names from its ``ClassLabel`` feature, the image size and channels from
    the first image (``data.image_size`` / ``data.channels`` resize and convert instead)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        try:
            import datasets  # deferred: the optional [hf] extra
        except ImportError as err:
            raise ConfigError(f"data=hf needs the datasets package: pip install 'distill[hf]' ({err})") from err
        where = str(cfg.root)
        self.image_key, self.label_key = str(cfg.get("image_key", "image")), str(cfg.get("label_key", "label"))
        try:
            loaded = datasets.load_from_disk(where) if Path(where).expanduser().exists() else datasets.load_dataset(where)
        except Exception as err:  # FileNotFoundError, DatasetNotFoundError, ValueError: name the setting
            raise ConfigError(f"data.root={where}: not a Hugging Face dataset on disk or on the hub ({str(err).splitlines()[0]})") from err
        if not isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.DatasetDict({"train": loaded})
        if "train" not in loaded:
            raise ConfigError(f"data.root={where}: the dataset has no train split (splits: {', '.join(loaded)})")
        self.splits = loaded
        train = loaded["train"]
        for key in (self.image_key, self.label_key):
            if key not in train.column_names:
                raise ConfigError(f"data.{'image_key' if key == self.image_key else 'label_key'}={key}: the dataset's columns are "
                                  f"{', '.join(train.column_names)}")
        feature = train.features[self.label_key]
        names = getattr(feature, "names", None)
        self.label_ids: dict[Any, int] | None = None
        if not names and not np.issubdtype(np.asarray(train[self.label_key][:1]).dtype, np.integer):
            # labels as values (strings): ids in sorted order, the values as the class names
            names = sorted({v for split in loaded.values() for v in split[self.label_key]})
            self.label_ids = {v: i for i, v in enumerate(names)}
        self.class_names = [str(n) for n in names] if names else None
        self.num_classes = len(names) if names else int(max(train[self.label_key])) + 1
        first = train[0][self.image_key]
        self.channels = int(cfg.channels or (1 if getattr(first, "mode", "RGB") in ("L", "1", "I", "F") else 3))
        self.image_size = int(cfg.image_size or max(getattr(first, "size", (64, 64))))

    def content_id(self) -> str:
        # The datasets library's own fingerprint of each split (its content and processing), not its path.
        return hashlib.sha256(json.dumps({n: s._fingerprint for n, s in self.splits.items()}, sort_keys=True).encode()).hexdigest()[:16]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c, cfg = self.channels, self.cfg
        mean, std = list(cfg.mean or [0.5] * c), list(cfg.std or [0.5] * c)
        t_train = image_transforms(cfg, self.image_size, c, mean, std, train=True)
        t_eval = image_transforms(cfg, self.image_size, c, mean, std, train=False)
        train = self.splits["train"]
        labels = np.asarray([self.label_ids[v] for v in train[self.label_key]] if self.label_ids else train[self.label_key])
        train_idx = np.arange(len(labels))
        val_name = next((n for n in _VALIDATION_NAMES if n in self.splits), None)
        unlabelled = "test" in self.splits and self.label_ids is None and max(self.splits["test"][self.label_key], default=-1) < 0
        if unlabelled:  # a competition-style test split (labels -1): not a test split for accuracy
            log.warning("hf: data.root=%s: its test split has no labels (all -1): a test split is carved from train", cfg.root)
        carve = {"test": "test" not in self.splits or unlabelled, "val": val_name is None}
        held: dict[str, np.ndarray] = {}
        for part, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
            if carve[part]:
                train_idx, held[part] = train_test_split(train_idx, test_size=fraction, stratify=labels[train_idx],
                                                         random_state=cfg.split_seed)
                log.info("hf: data.root=%s has no %s split: %d training samples carved for it (seeded, stratified)",
                         cfg.root, "validation" if part == "val" else part, len(held[part]))
        train_idx = limit_training(np.sort(train_idx), labels, cfg.get("train_fraction", 1.0), cfg.split_seed)

        def split(part: str) -> HFSplit:
            if part in held:
                return HFSplit(train, np.sort(held[part]).tolist(), self.image_key, self.label_key, t_eval, self.label_ids)
            data = self.splits["test" if part == "test" else val_name]
            return HFSplit(data, list(range(len(data))), self.image_key, self.label_key, t_eval, self.label_ids)

        self.train_set = HFSplit(train, train_idx.tolist(), self.image_key, self.label_key, t_train, self.label_ids)
        self.val_set, self.test_set = split("val"), split("test")


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@register_dataset("imagenet")
class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet (or any large image set) in the ImageFolder layout, with the standard recipe:
    ``RandomResizedCrop(size)`` and a horizontal flip for training, resize to ``size / 0.875`` and
    ``CenterCrop(size)`` for evaluation, ImageNet's mean and std (``data.image_size``, default 224).
    ``data.transform=model`` with ``teacher=timm`` takes the teacher's own data config instead (timm's
    ``resolve_data_config``: its input size, interpolation, crop fraction, mean and std)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.image_size = int(cfg.image_size or 224)
        self.channels = 3

    def transforms(self, train: bool) -> Callable:
        cfg = self.cfg
        if cfg.get("transform") == "model":
            return _timm_transform(cfg, train)
        size = self.image_size
        mean, std = list(cfg.mean or IMAGENET_MEAN), list(cfg.std or IMAGENET_STD)
        # Without data.augment the training images get the evaluation transform: the same view every
        # epoch, as the teacher-output cache assumes.
        head = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] if train and cfg.augment else \
            [v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)]
        return v2.Compose([v2.ToImage(), v2.RGB(), *head, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _timm_transform(cfg: DictConfig, train: bool) -> Callable:
    """The transform of the timm teacher named in ``data.model_arch`` (set from ``teacher.arch``)."""
    import timm  # deferred: only data.transform=model needs it
    from timm.data import create_transform, resolve_data_config  # deferred: with timm

    arch = cfg.get("model_arch")
    if not arch or not timm.is_model(str(arch)):
        raise ConfigError(f"data.transform=model needs teacher=timm with a known teacher.arch (got {arch!r})")
    config = resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(str(arch)).to_dict())
    return create_transform(**config, is_training=train and bool(cfg.augment))
