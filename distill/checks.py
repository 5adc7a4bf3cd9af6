"""Every check of a run's config, before any data is loaded: the first stage of the pipeline.

Each feature owns its checks (ranges of its keys, names in its registry, what it does not combine
with); this module runs them in order, so a bad value fails in seconds, naming the key: every
range first, then the names, then the files, then the combinations.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from distill.compress.registry import check_techniques, technique_range_checks
from distill.config.validate import (
    SETTINGS_CHECKS,
    check_callbacks,
    check_creatable_directory,
    check_devices,
    check_in_registry,
    check_nonfinite_policy,
    run_checks,
)
from distill.data.datamodules import DATASETS, check_data
from distill.distillation.hints import HINT_CHECKS, check_hints
from distill.distillation.losses.registry import check_loss
from distill.errors import ConfigError
from distill.measure.latency import check_device
from distill.models.registry import STUDENTS
from distill.report.objective import check_objective
from distill.runtime.checkpoint_io import load_checkpoint
from distill.teacher.provision import TEACHER_CHECKS, check_teacher, check_teacher_outputs


def validate(cfg: DictConfig) -> None:
    """Check every range and every name against its registry, before any data is touched."""
    check_loss(cfg)
    run_checks(cfg, SETTINGS_CHECKS + HINT_CHECKS + TEACHER_CHECKS + technique_range_checks())
    check_objective(cfg)
    check_in_registry(cfg, "student.name", STUDENTS, "student")
    check_teacher(cfg)
    check_in_registry(cfg, "data.name", DATASETS, "dataset")
    check_callbacks(cfg)
    check_data(cfg)
    check_techniques(cfg)
    check_nonfinite_policy(cfg)
    check_hints(cfg)
    check_teacher_outputs(cfg)
    check_resume(cfg)
    check_creatable_directory("teacher.cache_dir", cfg.teacher.cache_dir)
    check_devices(cfg.trainer)
    check_device(cfg.measure.latency)


def check_resume(cfg: DictConfig) -> None:
    """``ckpt_path``: a readable checkpoint file, or a DeepSpeed checkpoint directory of shards."""
    if not cfg.ckpt_path:
        return
    if not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"ckpt_path: no such file or directory: {cfg.ckpt_path}")
    if Path(cfg.ckpt_path).is_file():  # readable, and a checkpoint: before any work is done
        load_checkpoint(cfg.ckpt_path, what="ckpt_path")
