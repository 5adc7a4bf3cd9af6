"""Distillation losses by name (the ``loss=`` group). Adding one: a module in this package with a
:class:`~distill.distillation.losses.base.DistillationLoss` subclass, a ``conf/loss/<name>.yaml``,
its range checks in ``distill/distillation/settings.py`` and one entry below."""

from __future__ import annotations

from omegaconf import DictConfig

from distill.config.validate import check_in_registry, run_checks
from distill.distillation.losses.base import DistillationLoss
from distill.distillation.losses.dist import DISTLoss
from distill.distillation.losses.dkd import DKDLoss
from distill.distillation.losses.kd import KDLoss
from distill.distillation.losses.nkd import NKDLoss

LOSSES: dict[str, type[DistillationLoss]] = {"kd": KDLoss, "dkd": DKDLoss, "dist": DISTLoss, "nkd": NKDLoss}


def check_loss(cfg: DictConfig) -> None:
    """``loss.name`` is registered, and its own settings are in range."""
    check_in_registry(cfg, "loss.name", LOSSES, "loss")
    run_checks(cfg, LOSSES[cfg.loss.name].checks)


def build_loss(cfg: DictConfig) -> DistillationLoss:
    """The loss named by ``cfg.name`` (the run's ``loss`` node)."""
    return LOSSES[cfg.name].from_config(cfg)
