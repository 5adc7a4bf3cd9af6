"""Teacher provisioning: load a given checkpoint, reuse a cached teacher, or train one and cache it.

The cache key is a hash of everything that determines the trained teacher: architecture,
``pretrained``, the data fingerprint (dataset, split, normalisation, shape), the seed and the
teacher's own training settings. An entry is ``<cache_dir>/<arch>-<key>.pt`` holding the state dict
and metadata (including its test accuracy), written atomically. A :class:`filelock.FileLock` per
key makes concurrent runs (a sweep, or DDP ranks) train it once: the first trains, the others wait
and then reuse it. A corrupt entry is reported, set aside and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill.config.validate import (
    check_in_registry,
)
from distill.data.mixing import mixing_of
from distill.distillation.settings import uses_teacher
from distill.errors import CheckpointError, ConfigError
from distill.measure.size import count_parameters
from distill.models.registry import TEACHERS, build_teacher_from
from distill.models.sources import SOURCES, Built, Resized, classifier_of
from distill.runtime import launch_plan
from distill.runtime.atomic import atomic_torch_save, atomic_write_text
from distill.runtime.checkpoint_io import load_checkpoint
from distill.teacher.ensemble import check_ensemble

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Settings that change only how a teacher is provisioned, not what it learns.
# Not part of the key: where it is stored, how its outputs are used, and teacher.trainer (what of it
# changes the trained teacher, its precision, batches, clipping and process count, is in
# teacher_fingerprint; leaving the rest out keeps the keys of teachers cached before it existed).
_NOT_IN_KEY = ("checkpoint", "cache_dir", "precompute_outputs", "outputs_dtype", "outputs_topk", "channels_last", "compile", "cache_views",
               "trainer", "ensemble", "ensemble_weights")  # the ensemble: the other teachers, each with its own key
# Settings added later, in the key only when set (so the keys of teachers cached before them hold).
_KEY_WHEN_SET = ("arch", "weights", "weights_file", "repo", "_target_", "kwargs", "resize", "checkpoint_key", "checkpoint_prefix",
                 "finetune_epochs", "finetune")


def check_teacher(cfg: DictConfig) -> None:
    """The teacher's name, and its file when one is given."""
    check_in_registry(cfg, "teacher.name", TEACHERS, "teacher")
    check_ensemble(cfg)
    if cfg.teacher.checkpoint and uses_teacher(cfg.loss) and not Path(cfg.teacher.checkpoint).is_file():
        raise ConfigError(f"teacher.checkpoint: no such file: {cfg.teacher.checkpoint}")


def check_teacher_outputs(cfg: DictConfig) -> None:
    """How the teacher's outputs may be cached for this data (augmented or not)."""
    if cfg.teacher.cache_views is not None:
        if not cfg.data.augment and not mixing_of(cfg.data):
            raise ConfigError("teacher.cache_views needs data.augment=true or data.mixup / data.cutmix > 0 "
                              "(without either every run already reuses one view)")
        if cfg.teacher.precompute_outputs is False:
            raise ConfigError("teacher.cache_views conflicts with teacher.precompute_outputs=false")
    elif cfg.teacher.precompute_outputs and mixing_of(cfg.data):
        raise ConfigError(
            f"teacher.precompute_outputs=true with data.{'/'.join(mixing_of(cfg.data))}: every batch is a new mix of "
            "two samples, so the teacher runs live (or set teacher.cache_views=K to cache K mixed views per sample)"
        )
    elif cfg.teacher.precompute_outputs and cfg.data.augment:
        raise ConfigError(
            "teacher.precompute_outputs=true needs data.augment=false: with random augmentation the "
            "teacher must see the same random view as the student, so it runs live (or set "
            "teacher.cache_views=K to cache K replayable views per sample)"
        )


def make_cache_dir(path: Path) -> None:
    """``mkdir -p`` a directory under ``teacher.cache_dir``; a failure names the setting."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"teacher.cache_dir: cannot create {path}: {err.strerror or err}") from err


@dataclass
class TeacherInfo:
    arch: str
    params: int
    test_acc: float | None
    source: str  # "checkpoint" | "as-is" (pretrained, not trained here) | "cache" | "trained" | "fine-tuned" (loaded, then trained here)
    path: str | None
    key: str | None
    train_seconds: float = 0.0
    resize: int | None = None  # the input size it sees, when not the data's (teacher.resize)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Trainer settings that change what the teacher learns (it trains with the run's trainer settings).
TEACHER_TRAINER_KEYS = ("fast_dev_run", "limit_train_batches", "precision", "accumulate_grad_batches", "gradient_clip_val",
                        "deterministic")


def teacher_fingerprint(cfg: DictConfig, data_fingerprint: dict[str, Any], world: int = 1) -> dict[str, Any]:
    """What determines the trained teacher besides its own settings: the data (the teacher's own
    augmentation, not the student's), the trainer settings it trains with (the number of processes
    too, when several share its batches), and the torch version."""
    augment = cfg.teacher.augment if cfg.teacher.augment is not None else cfg.data.augment
    own = OmegaConf.select(cfg, "teacher.trainer") or {}
    trainer = {k: own.get(k, cfg.trainer.get(k)) for k in TEACHER_TRAINER_KEYS}
    if world > 1:  # absent for one process: the keys of teachers trained before this setting existed hold
        trainer["world_size"] = world
    mixing = {"mix": mixing_of(cfg.data)} if mixing_of(cfg.data) else {}  # absent when off: older keys hold
    return {**data_fingerprint, "augment": bool(augment), **mixing, "trainer": trainer,
            "torch": str(torch.__version__)}  # a str: TorchVersion would not load with weights_only


def file_checksum(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def teacher_key(teacher_cfg: DictConfig, data_fingerprint: dict[str, Any], seed: int) -> str:
    settings = OmegaConf.to_container(teacher_cfg, resolve=True)
    for k in _NOT_IN_KEY:
        settings.pop(k, None)
    if not settings.get("finetune_epochs"):
        settings.pop("finetune", None)
    for k in _KEY_WHEN_SET:
        if settings.get(k) in (None, {}, [], 0):
            settings.pop(k, None)
    if teacher_cfg.get("checkpoint"):  # a fine-tuned checkpoint: where it came from
        settings["checkpoint_sha256"] = file_checksum(teacher_cfg.checkpoint)
    blob = json.dumps({"format": CACHE_FORMAT, "teacher": settings, "data": data_fingerprint, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TeacherCache:
    """Directory of trained teachers, one atomic ``.pt`` file and one lock file per key."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir).expanduser()

    def path(self, arch: str, key: str) -> Path:
        return self.dir / f"{arch}-{key}.pt"

    def lock(self, arch: str, key: str) -> FileLock:
        make_cache_dir(self.dir)
        return FileLock(str(self.path(arch, key)) + ".lock")

    def read(self, arch: str, key: str) -> dict[str, Any] | None:
        """The entry, or None when absent. A corrupt entry is renamed aside (kept for inspection)."""
        path = self.path(arch, key)
        if not path.exists():
            return None
        try:
            entry = load_checkpoint(path, what="cached teacher")
            if entry.get("format") != CACHE_FORMAT or "state_dict" not in entry:
                raise CheckpointError(f"cached teacher {path} has an unknown layout")
            return entry
        except CheckpointError as err:
            aside = path.with_suffix(f".corrupt-{int(time.time())}")
            path.rename(aside)
            log.warning("%s; moved it to %s and will rebuild it", err, aside)
            return None

    def write(self, arch: str, key: str, model: nn.Module, meta: dict[str, Any]) -> Path:
        entry = {"format": CACHE_FORMAT, "state_dict": model.state_dict(), "meta": meta}
        return atomic_torch_save(entry, self.path(arch, key))


def _state_dict_from(obj: dict[str, Any], key: str | None = None, prefix: str | None = None, path: Path | None = None) -> dict[str, Any]:
    """The state dict in a checkpoint file: a cache entry, a Lightning checkpoint of the teacher, a bare
    state dict; or the one under ``key`` (``teacher.checkpoint_key``), its keys stripped of ``prefix``
    (``teacher.checkpoint_prefix``: ``module.`` from DataParallel/DDP)."""
    if key:
        if key not in obj or not isinstance(obj[key], dict):
            raise CheckpointError(f"teacher.checkpoint_key={key}: {path} has no state dict under it; its top-level keys: "
                                  f"{', '.join(map(str, list(obj)[:12]))}")
        state = obj[key]
    elif "state_dict" in obj:
        state = obj["state_dict"]
        student = "student."  # a Lightning checkpoint of the teacher's own training
        if any(k.startswith(student) for k in state):
            state = {k[len(student):]: v for k, v in state.items() if k.startswith(student)}
    else:
        state = obj
    if prefix:
        if not any(str(k).startswith(prefix) for k in state):
            raise CheckpointError(f"teacher.checkpoint_prefix={prefix}: no key of {path} starts with it (first: {next(iter(state), None)})")
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    return state


def load_teacher_checkpoint(model: nn.Module, tcfg: DictConfig) -> dict[str, Any]:
    """``teacher.checkpoint`` loaded into ``model`` (strictly); keys that do not match are named: the
    first missing and unexpected ones. Returns the file's content (for its ``meta``)."""
    path = Path(tcfg.checkpoint)
    obj = load_checkpoint(path, what="teacher.checkpoint")
    state = _state_dict_from(obj, tcfg.get("checkpoint_key"), tcfg.get("checkpoint_prefix"), path)
    target = model.model if isinstance(model, Resized) else model
    expected = set(target.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        hint = "; set teacher.checkpoint_prefix (e.g. module.) or teacher.checkpoint_key" if unexpected else ""
        raise CheckpointError(f"teacher.checkpoint {path} does not fit teacher={tcfg.name} on this data: "
                              f"{len(missing)} missing key(s) (first: {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
                              f"(first: {', '.join(unexpected[:3]) or '-'}){hint}")
    try:
        target.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"teacher.checkpoint {path} does not fit teacher={tcfg.name} on this data: "
                              f"{str(err).splitlines()[-1].strip()}") from err
    return obj


class AccuracyCache:
    """The test accuracy of a teacher used as it is (not trained here: pretrained, or a checkpoint),
    measured once per (teacher, data) and kept in ``<cache_dir>/accuracy/<key>.json``."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir).expanduser() / "accuracy"

    def get_or_measure(self, key: str, measure: Callable[[], float]) -> tuple[float, bool]:
        """(the accuracy, whether it was read from the cache)."""
        make_cache_dir(self.dir)
        path = self.dir / f"{key}.json"
        with FileLock(str(path) + ".lock"):
            try:
                return float(json.loads(path.read_text())["test_acc"]), True
            except (OSError, ValueError, KeyError):
                pass
            acc = float(measure())
            atomic_write_text(path, json.dumps({"test_acc": acc}))
            return acc, False


def provision_teacher(
    cfg: DictConfig,
    shape: dict[str, int],
    data_fingerprint: dict[str, Any],
    train_fn: Callable[[nn.Module], float],
    world: int = 1,
    measure_fn: Callable[[nn.Module], float] | None = None,
    data_classes: list[str] | None = None,
) -> tuple[nn.Module, TeacherInfo]:
    """Return a frozen, eval-mode teacher and where it came from.

    ``train_fn(model)`` trains the model in place and returns its test accuracy; it is called only
    when neither ``teacher.checkpoint`` nor a valid cache entry exists. With ``world`` > 1 processes
    training it together, rank 0 holds the cache's lock and decides for all
    (:mod:`distill.runtime.launch_plan`); only rank 0 writes the entry.

    A loaded teacher (``teacher.checkpoint``, or a source's pretrained weights: ``teacher=torchvision
    teacher.weights=DEFAULT``, ``timm`` with ``pretrained``, ``hf``) whose classifier predicts the
    data's classes is used as it is (``teacher.finetune_epochs=0``, the default): not trained, its test
    accuracy measured with ``measure_fn`` once and cached. With ``teacher.finetune_epochs=N`` it is
    fine-tuned (``teacher.finetune=head|all``) through the cache, under a key that includes its source.
    """
    tcfg = cfg.teacher
    built = build_teacher_from(tcfg, **shape)
    model = built.model
    loaded_file = load_teacher_checkpoint(model, tcfg) if tcfg.checkpoint else None
    loaded = loaded_file is not None or (tcfg.name in SOURCES and built.pretrained)
    if loaded and not tcfg.get("finetune_epochs"):
        return _as_is(cfg, model, built, loaded_file, data_fingerprint, measure_fn, data_classes)
    if loaded:
        train_fn = _finetuning(train_fn, tcfg)
        if loaded_file is None:  # fine-tuned from a source: its weights' identity joins the key (new weights at one path)
            data_fingerprint = {**data_fingerprint, "source": source_identity(tcfg)}
    cache = TeacherCache(tcfg.cache_dir)
    key = teacher_key(tcfg, data_fingerprint, int(cfg.seed))
    path = cache.path(tcfg.name, key)
    if world > 1 and not launch_plan.is_rank_zero():
        # Rank 0 holds the lock and says whether the entry is there or all of us train it now.
        if launch_plan.decide(f"teacher_{key}", None) == "cache":
            return _from_entry(model, cache.read(tcfg.name, key), tcfg.name, path, key)
        test_acc, seconds = _train(train_fn, model)
        return _freeze(model), TeacherInfo(tcfg.name, count_parameters(model), test_acc, "fine-tuned" if loaded else "trained",
                                           str(path), key, seconds)
    with cache.lock(tcfg.name, key):
        entry = cache.read(tcfg.name, key)
        if world > 1:
            launch_plan.decide(f"teacher_{key}", lambda: "cache" if entry is not None else "train")
        if entry is not None:
            return _from_entry(model, entry, tcfg.name, path, key)
        log.info("teacher: no cached %s for key %s; %s it for %d epochs on %d process(es)", tcfg.name, key,
                 "fine-tuning" if loaded else "training", tcfg.finetune_epochs if loaded else tcfg.epochs, world)
        test_acc, seconds = _train(train_fn, model)
        meta = {"arch": tcfg.name, "test_acc": test_acc, "train_seconds": seconds, "key": key, "data": data_fingerprint,
                "processes": world}
        cache.write(tcfg.name, key, model, meta)
        log.info("teacher: trained %s in %.1fs, test acc %.4f; cached at %s", tcfg.name, seconds, test_acc, path)
    info = TeacherInfo(tcfg.name, count_parameters(model), test_acc, "fine-tuned" if loaded else "trained", str(path), key, seconds)
    return _freeze(model), info


def _as_is(cfg: DictConfig, model: nn.Module, built: Built, loaded_file: dict[str, Any] | None, data_fingerprint: dict[str, Any],
           measure_fn: Callable[[nn.Module], float] | None, data_classes: list[str] | None) -> tuple[nn.Module, TeacherInfo]:
    """A loaded teacher that predicts the data's classes, used without training; its accuracy measured once."""
    tcfg = cfg.teacher
    what = f"teacher={tcfg.name}" + "".join(f" teacher.{k}={tcfg.get(k)}" for k in ("arch", "repo", "_target_") if tcfg.get(k))
    if built.head_replaced and loaded_file is None:
        raise ConfigError(f"{what}: its pretrained classifier predicts other classes than the data's (a new head was put on it): "
                          "set teacher.finetune_epochs=N to fine-tune it (teacher.finetune=head|all)")
    if built.classes and data_classes:
        mine, theirs = [c.lower() for c in built.classes], [c.lower() for c in data_classes]
        if not set(mine) & set(theirs):
            # Two vocabularies (ImageNet's folder ids and torchvision's words, an HF model's LABEL_0...): not comparable.
            log.warning("%s: its class names (%s, ...) and the data's (%s, ...) share none, so their order cannot be checked; "
                        "the class count matches", what, built.classes[0], data_classes[0])
        elif mine != theirs:
            mismatch = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), min(len(mine), len(theirs)) - 1)
            raise ConfigError(f"{what}: its classes are not the data's (class {mismatch}: {built.classes[mismatch]!r} vs "
                              f"{data_classes[mismatch]!r}): set teacher.finetune_epochs=N to fine-tune it on this data")
    source = "checkpoint" if loaded_file is not None else "as-is"
    path = str(tcfg.checkpoint) if loaded_file is not None else None
    meta = loaded_file.get("meta") if isinstance(loaded_file, dict) and isinstance(loaded_file.get("meta"), dict) else {}
    acc = meta.get("test_acc") if meta.get("data") in (None, data_fingerprint) else None
    identity = file_checksum(path) if path else source_identity(tcfg)
    if acc is None and measure_fn is not None:
        key = hashlib.sha256(json.dumps({"teacher": identity, "data": data_fingerprint}, sort_keys=True).encode()).hexdigest()[:16]
        acc, cached = AccuracyCache(tcfg.cache_dir).get_or_measure(key, lambda: measure_fn(_freeze(model)))
        log.info("teacher: %s used as it is (not trained); test accuracy %.4f, %s", what, acc,
                 "read from the cache" if cached else "measured and cached")
    else:
        log.info("teacher: %s used as it is (not trained)", what)
    # A checkpoint is known by its file (its checksum keys the logit table); a source by where it came from.
    return _freeze(model), TeacherInfo(str(tcfg.name), count_parameters(model), acc, source, path, None if path else identity,
                                       resize=tcfg.get("resize"))


def source_identity(tcfg: DictConfig) -> str:
    """Where a pretrained teacher came from, as a key: its settings (a hub id, a weights enum: fixed
    upstream), and the checksums of local weight files (``teacher.weights_file``, or the weight files
    of a ``teacher.repo`` directory), so that new weights at the same path are another teacher."""
    files: list[Path] = []
    if tcfg.get("weights_file"):
        files.append(Path(tcfg.weights_file))
    repo = Path(str(tcfg.get("repo") or "")).expanduser()
    if tcfg.get("repo") and repo.is_dir():
        files += sorted(f for f in repo.iterdir() if f.suffix in (".safetensors", ".bin", ".json", ".pth", ".pt"))
    blob = {"settings": teacher_key(tcfg, {}, 0), "files": {f.name: file_checksum(f) for f in files}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _finetuning(train_fn: Callable[..., float], tcfg: DictConfig) -> Callable[[nn.Module], float]:
    """``train_fn`` on a loaded teacher: every layer (``teacher.finetune=all``), or its classifier
    only (``head``: the rest frozen)."""

    def finetune(m: nn.Module) -> float:
        if tcfg.get("finetune", "head") == "all":
            return train_fn(m, tcfg.finetune_epochs)
        m.requires_grad_(False)
        classifier_of(m).requires_grad_(True)
        try:
            return train_fn(m, tcfg.finetune_epochs)
        finally:
            m.requires_grad_(True)

    return finetune


def _train(train_fn: Callable[[nn.Module], float], model: nn.Module) -> tuple[float, float]:
    start = time.perf_counter()
    test_acc = train_fn(model)
    return test_acc, time.perf_counter() - start


def _from_entry(model: nn.Module, entry: dict[str, Any] | None, arch: str, path: Path, key: str) -> tuple[nn.Module, TeacherInfo]:
    if entry is None:
        raise CheckpointError(f"cached teacher {path}: rank 0 read it, but this process cannot")
    model.load_state_dict(entry["state_dict"])
    meta = entry["meta"]
    log.info("teacher: reusing cached %s (test acc %.4f) from %s", arch, meta["test_acc"], path)
    return _freeze(model), TeacherInfo(arch, count_parameters(model), meta["test_acc"], "cache", str(path), key)


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()
