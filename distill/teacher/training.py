"""Training a teacher from scratch on the run's data, when no checkpoint or cache entry has it.

The teacher trains on the run's devices and nodes (``trainer.devices``, ``trainer.num_nodes``,
``teacher.trainer.*`` over them), data-parallel (DDP) when there are several: a multi-GPU run does
not train its teacher on one GPU while the others wait. A DeepSpeed run trains its teacher with
DDP on the same devices (ZeRO's partitions are for the student it optimizes). Processes started by
an external launcher (srun, torchrun) keep the teacher on one process: see
:mod:`distill.runtime.launch_plan`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill.config.validate import world_size
from distill.data.datamodules import build_datamodule
from distill.distillation.losses.kd import KDLoss
from distill.distillation.module import DistillationModule
from distill.runtime.launch_plan import externally_launched
from distill.runtime.progress import ReadableProgressBar
from distill.runtime.strategies import build_strategy


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as Trainer keyword arguments; unset (null) settings keep Lightning's defaults."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {k: v for k, v in kwargs.items() if v is not None}


def teacher_trainer_kwargs(cfg: DictConfig) -> tuple[dict[str, Any], int]:
    """The Trainer settings the teacher trains (and computes its table) with, and how many processes
    that is: the run's settings, then ``teacher.trainer.*``; DDP over several devices, or one process
    under an external launcher."""
    own = OmegaConf.select(cfg, "teacher.trainer")
    kwargs = {**trainer_kwargs(cfg), **(OmegaConf.to_container(own, resolve=True) if own else {})}
    devices = OmegaConf.create({"trainer": {"accelerator": kwargs.get("accelerator", "auto"), "devices": kwargs.get("devices", "auto"),
                                            "num_nodes": kwargs.get("num_nodes", 1)}})
    world = world_size(devices)
    if world > 1 and externally_launched(world):
        kwargs.update(devices=1, num_nodes=1)  # each process on its own: one trains, the others wait on the cache
        world = 1
    kwargs["strategy"] = build_strategy(OmegaConf.create({"name": "ddp" if world > 1 else "auto"}), str(kwargs.get("accelerator", "auto")))
    return kwargs, world


def progress_callbacks(cfg: DictConfig) -> list[Callback]:
    # leave=True: each finished epoch keeps its line (with val/acc), also in a batch job's log file,
    # where Rich prints a display only when it stops.
    return [ReadableProgressBar(leave=True)] if cfg.trainer.enable_progress_bar else []


def train_teacher(cfg: DictConfig, model: nn.Module, output_dir: Path, epochs: int | None = None) -> float:
    """Train ``model`` with plain cross-entropy on the run's data (all of its training split: a
    ``data.train_fraction`` limits the student's data, not the teacher's) for ``epochs`` (default
    ``teacher.epochs``; a loaded teacher's fine-tuning: ``teacher.finetune_epochs``); return its test accuracy."""
    tcfg = cfg.teacher
    overrides: dict[str, Any] = {"batch_size": tcfg.batch_size, "train_fraction": 1.0}
    if tcfg.augment is not None:
        overrides["augment"] = tcfg.augment
    datamodule = build_datamodule(OmegaConf.merge(cfg.data, overrides))
    module = DistillationModule(model, None, KDLoss(temperature=1.0, alpha=0.0), tcfg.optim, datamodule.num_classes)
    kwargs, _ = teacher_trainer_kwargs(cfg)
    kwargs.update(
        # The data module shards by rank itself (EpochShuffleSampler, EvenShardSampler), as for the student.
        max_epochs=tcfg.epochs if epochs is None else epochs, enable_checkpointing=False, use_distributed_sampler=False,
        logger=CSVLogger(save_dir=str(output_dir), name="teacher", version=""),
        default_root_dir=str(output_dir / "teacher"), callbacks=progress_callbacks(cfg),
    )
    L.seed_everything(int(cfg.seed), workers=True)
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, datamodule=datamodule)
    [result] = trainer.test(module, datamodule=datamodule, verbose=False)
    model.eval()
    return float(result["test/acc"])
