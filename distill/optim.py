"""Optimizer and learning-rate schedule from an ``OptimConfig`` (``optim`` / ``teacher.optim``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}: choose from: adamw, sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, max_epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch schedule: optional linear warm-up, then cosine to zero or step decay."""
    from torch.optim import lr_scheduler as sched

    warmup = min(int(cfg.warmup_epochs), max(max_epochs - 1, 0))
    if cfg.scheduler == "none":
        main = None
    elif cfg.scheduler == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(max_epochs - warmup, 1))
    elif cfg.scheduler == "step":
        main = sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    else:
        raise ValueError(f"optim.scheduler={cfg.scheduler!r}: choose from: cosine, none, step")
    if warmup == 0:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    if main is None:
        return ramp
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
