"""Every check of a run's config, before any data is loaded: the first stage of the pipeline.

Each feature owns its checks (ranges of its keys, names in its registry, what it does not combine
with); this module runs them in order, so a bad value fails in seconds, naming the key: every
range first, then the names, then the files, then the combinations.

The ranges live in modules that import neither torch nor Lightning (``config/validate.py``,
``compress/settings.py``, ``teacher/settings.py``, ``distillation/settings.py``): :func:`precheck`
runs them, with the device counts and the directories a run writes, before ``train.py`` imports
the pipeline (torch and Lightning take about 8 s to import here), so such a typo is reported in
well under a second. :func:`validate` then runs everything, the registries' names included.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distill.compress.settings import TECHNIQUE_RANGE_CHECKS
from distill.config.loss_terms import active_features
from distill.config.validate import (
    SETTINGS_CHECKS,
    check_callbacks,
    check_creatable_directory,
    check_devices,
    check_in_registry,
    check_nonfinite_policy,
    check_optimizer_offload,
    run_checks,
)
from distill.distillation.settings import FEATURE_CHECKS, LOSS_CHECKS
from distill.errors import ConfigError
from distill.teacher.settings import TEACHER_CHECKS, check_teacher_trainer

RANGE_CHECKS = SETTINGS_CHECKS + FEATURE_CHECKS + TEACHER_CHECKS + TECHNIQUE_RANGE_CHECKS
DIRECTORIES = ("paths.cache_dir", "teacher.cache_dir")  # hydra.run.dir / sweep.dir: distill.cli.RunDirectoryCheck


def precheck(cfg: DictConfig) -> None:
    """The checks that need neither torch nor Lightning: every range, device and node counts, the
    directories a run writes."""
    run_checks(cfg, RANGE_CHECKS + LOSS_CHECKS.get(str(cfg.loss.name), []))
    devices = str(cfg.trainer.devices).strip()
    if devices.lstrip("-").isdigit() and int(devices) < 1 and devices != "-1":
        raise ConfigError(f"trainer.devices={cfg.trainer.devices!r} is out of range: must be >= 1, -1 (every device) or auto")
    for key in DIRECTORIES:
        check_creatable_directory(key, OmegaConf.select(cfg, key))
    check_teacher_trainer(cfg)


def validate(cfg: DictConfig) -> None:
    """Check every range and every name against its registry, before any data is touched."""
    # deferred: the registries import torch, torchvision and Lightning; precheck must not wait for them
    from distill.compress.deploy import check_export  # deferred
    from distill.compress.registry import check_techniques  # deferred
    from distill.data.datamodules import DATASETS, check_data, resolve_hub_name  # deferred
    from distill.distillation.features.combined import check_features  # deferred
    from distill.distillation.losses.registry import check_loss  # deferred
    from distill.measure.latency import check_device  # deferred
    from distill.models.registry import STUDENTS  # deferred
    from distill.report.objective import check_objective  # deferred
    from distill.teacher.provision import check_teacher, check_teacher_outputs  # deferred

    resolve_hub_name(cfg)  # data=hf data.name=<hub id> is data.root=<hub id>
    precheck(cfg)
    check_loss(cfg)
    check_objective(cfg)
    check_in_registry(cfg, "student.name", STUDENTS, "student")
    check_teacher(cfg)
    check_in_registry(cfg, "data.name", DATASETS, "dataset")
    check_callbacks(cfg)
    check_data(cfg)
    check_techniques(cfg)
    check_nonfinite_policy(cfg)
    check_optimizer_offload(cfg)
    check_features(cfg)
    check_feature_layers(cfg)
    check_teacher_outputs(cfg)
    check_mixing(cfg)
    check_export(cfg)
    check_resume(cfg)
    check_devices(cfg.trainer)
    check_device(cfg.measure.latency)


def check_mixing(cfg: DictConfig) -> None:
    """Mixup / CutMix give each training sample two classes (soft labels): a loss that singles out a
    sample's one class, and CRD (whose memory holds one embedding per sample and draws negatives
    from other classes), have no meaning on mixed samples."""
    from distill.data.mixing import mixing_of  # deferred
    from distill.distillation.losses.registry import LOSSES  # deferred

    mixing = mixing_of(cfg.data)
    if not mixing:
        return
    given = " ".join(f"data.{name}={alpha:g}" for name, alpha in mixing.items())
    if LOSSES[cfg.loss.name].needs_one_class:
        raise ConfigError(f"loss={cfg.loss.name} with {given}: the loss splits each sample's labelled class from the "
                          "others, and a mixed sample has two; use kd or dist, or set the mixing to 0")
    if "crd" in active_features(cfg.loss):
        raise ConfigError(f"loss.crd with {given}: CRD's memory holds one embedding per training sample and draws "
                          "negatives from other classes, neither defined for a mix of two samples")


def check_resume(cfg: DictConfig) -> None:
    """``ckpt_path``: a readable checkpoint file, or a DeepSpeed checkpoint directory of shards."""
    from distill.runtime.checkpoint_io import load_checkpoint  # deferred: imports torch

    if not cfg.ckpt_path:
        return
    if not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"ckpt_path: no such file or directory: {cfg.ckpt_path}")
    if Path(cfg.ckpt_path).is_file():  # readable, and a checkpoint: before any work is done
        load_checkpoint(cfg.ckpt_path, what="ckpt_path")


def check_feature_layers(cfg: DictConfig) -> None:
    """The feature terms' layers exist in the student and the teacher (an unknown one is named with
    the valid choices): both models are built on the ``meta`` device, without weights or data, and
    the terms are hooked and probed there, in well under a second."""
    if not active_features(cfg.loss):
        return
    import torch  # deferred: heavy

    from distill.data.datamodules import build_datamodule  # deferred
    from distill.distillation.features.combined import build_features  # deferred
    from distill.models.registry import build_student, build_teacher  # deferred

    shape = build_datamodule(cfg.data).shape  # known before any data is read
    teacher_cfg = OmegaConf.merge(cfg.teacher, {"pretrained": False})  # no weights are fetched for a check
    with torch.device("meta"):
        build_features(cfg, build_student(cfg.student, **shape), build_teacher(teacher_cfg, **shape), shape)
