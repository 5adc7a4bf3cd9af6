"""Training a teacher from scratch on the run's data, when no checkpoint or cache entry has it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill.data.datamodules import build_datamodule
from distill.distillation.losses.kd import KDLoss
from distill.distillation.module import DistillationModule


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as Trainer keyword arguments; unset (null) settings keep Lightning's defaults."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {k: v for k, v in kwargs.items() if v is not None}


def progress_callbacks(cfg: DictConfig) -> list[Callback]:
    return [RichProgressBar(leave=True)] if cfg.trainer.enable_progress_bar else []


def train_teacher(cfg: DictConfig, model: nn.Module, output_dir: Path) -> float:
    """Train ``model`` with plain cross-entropy on the run's data; return its test accuracy."""
    tcfg = cfg.teacher
    overrides: dict[str, Any] = {"batch_size": tcfg.batch_size}
    if tcfg.augment is not None:
        overrides["augment"] = tcfg.augment
    datamodule = build_datamodule(OmegaConf.merge(cfg.data, overrides))
    module = DistillationModule(model, None, KDLoss(temperature=1.0, alpha=0.0), tcfg.optim, datamodule.num_classes)
    kwargs = trainer_kwargs(cfg)
    # The teacher trains in this process on one device; distributed settings apply to the student.
    kwargs.update(
        max_epochs=tcfg.epochs, devices=1, num_nodes=1, enable_checkpointing=False,
        logger=CSVLogger(save_dir=str(output_dir), name="teacher", version=""),
        default_root_dir=str(output_dir / "teacher"), callbacks=progress_callbacks(cfg),
    )
    L.seed_everything(int(cfg.seed), workers=True)
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, datamodule=datamodule)
    [result] = trainer.test(module, datamodule=datamodule, verbose=False)
    model.eval()
    return float(result["test/acc"])
