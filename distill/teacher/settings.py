"""The range checks of the teacher's settings, importable without torch (see :func:`distill.checks.precheck`)."""

from __future__ import annotations

import difflib
from dataclasses import fields

from omegaconf import DictConfig, OmegaConf

from distill.config.schema import TrainerConfig
from distill.config.validate import OPTIM_CHECKS, Check, at_least, one_of
from distill.errors import ConfigError

TEACHER_CHECKS: list[Check] = [
    ("teacher.epochs", at_least(0), ">= 0"),
    ("teacher.batch_size", at_least(1), ">= 1"),
    ("teacher.outputs_dtype", one_of("float32", "float16"), "one of: float32, float16"),
    ("teacher.outputs_topk", lambda x: x is None or x >= 1, ">= 1 (or null: all logits)"),
    ("teacher.cache_views", lambda x: x is None or x >= 1, ">= 1 (or null: live teacher with augmentation)"),
    ("teacher.finetune_epochs", at_least(0), ">= 0"),
    ("teacher.finetune", one_of("head", "all"), "one of: head, all"),
    ("teacher.resize", lambda x: x is None or x >= 1, ">= 1 px (or null: the data's size)"),
    *[(f"teacher.optim.{k}", f, m) for k, f, m in OPTIM_CHECKS],
]


def check_teacher_trainer(cfg: DictConfig) -> None:
    """``teacher.trainer.*``: Trainer settings for the teacher alone. Its processes are the run's
    (a launch cannot change its number of processes midway): ``devices`` and ``num_nodes`` are the
    run's or 1 (the teacher on rank 0 alone), the accelerator is the run's, and the strategy is
    chosen for it (DDP over several processes)."""
    own = OmegaConf.select(cfg, "teacher.trainer") or {}
    known = {f.name for f in fields(TrainerConfig)}
    for key in own:
        if key == "strategy":
            raise ConfigError("teacher.trainer.strategy: the teacher's strategy is chosen for it (DDP over several "
                              "processes); set +teacher.trainer.devices=1 to keep it on one")
        if key in ("max_epochs", "min_epochs", "max_steps"):
            raise ConfigError(f"teacher.trainer.{key}: the teacher trains for teacher.epochs; set that instead")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(f"teacher.trainer.{key}: not a trainer setting" + (f" (did you mean teacher.trainer.{close[0]}?)" if close else ""))
    for key in ("devices", "num_nodes"):
        if key in own and str(own[key]) not in ("1", str(cfg.trainer[key])):
            raise ConfigError(f"teacher.trainer.{key}={own[key]}: must be 1 (the teacher on one process) or the run's "
                              f"trainer.{key}={cfg.trainer[key]}")
    if "accelerator" in own and str(own.accelerator) != str(cfg.trainer.accelerator):
        raise ConfigError(f"teacher.trainer.accelerator={own.accelerator}: must be the run's trainer.accelerator={cfg.trainer.accelerator}")
