"""Optimizer and learning-rate schedule from an ``OptimConfig`` (``optim`` / ``teacher.optim``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig

from distill.config.validate import OFFLOAD_OPTIMIZERS
from distill.errors import ConfigError

# AdamW's moment coefficients and epsilon (torch's defaults), the same with or without offload.
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.999), 1e-8


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: DictConfig, offload: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names. ``offload``: the strategy is DeepSpeed ZeRO-Offload (see
    :func:`distill.runtime.strategies.offloads_optimizer`), which steps the optimizer in host memory and
    takes only DeepSpeed's own host optimizers: AdamW is then ``DeepSpeedCPUAdam`` in AdamW mode, with
    the same hyper-parameters; SGD has no such kernel and is refused (``check_optimizer_offload``)."""
    if offload:
        return _host_optimizer(params, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}: choose from: adamw, sgd")


def _host_optimizer(params: Iterable[torch.nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    if cfg.name not in OFFLOAD_OPTIMIZERS:  # refused when the config is checked; this is for a hand-built Trainer
        raise ConfigError(f"optim.name={cfg.name}: DeepSpeed ZeRO-Offload (strategy.offload_optimizer=true) takes only "
                          f"{', '.join(OFFLOAD_OPTIMIZERS)} (DeepSpeedCPUAdam); use optim.name=adamw or a strategy without offload")
    # deferred: deepspeed is heavy and only offloading runs need it; the first use JIT-builds its cpu_adam C++ op
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    # adamw_mode=True: decoupled weight decay, as torch.optim.AdamW (False would be Adam's L2 penalty).
    return DeepSpeedCPUAdam(params, lr=cfg.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=cfg.weight_decay, adamw_mode=True)


def lr_factor(step: int, cfg: DictConfig | SimpleNamespace, total_steps: int, steps_per_epoch: int) -> float:
    """LR multiplier at optimizer step ``step``: linear warm-up, then cosine to 0 or step decay.

    Computed per step (not per epoch) so that short runs, like a 10-epoch teacher, still get a
    smooth warm-up and decay."""
    warmup = min(int(cfg.warmup_epochs) * steps_per_epoch, max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.scheduler == "cosine":
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.scheduler == "step":
        return float(cfg.gamma) ** ((step // steps_per_epoch) // int(cfg.step_size))
    if cfg.scheduler == "none":
        return 1.0
    raise ValueError(f"optim.scheduler={cfg.scheduler!r}: choose from: cosine, none, step")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    steps_per_epoch = max(int(steps_per_epoch), 1)
    total_steps = max(int(total_steps), 1)
    # The schedule's settings as plain values: it is evaluated at every optimizer step, and each
    # DictConfig attribute read costs microseconds (several per step).
    plain = SimpleNamespace(**{k: cfg.get(k) for k in ("warmup_epochs", "scheduler", "gamma", "step_size")})
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, plain, total_steps, steps_per_epoch))


def rebuild_optimizer(trainer: Any) -> None:
    """After a callback changed the student's parameters mid-run: a new optimizer (fresh state), and
    the LR schedule moved on to the current step instead of restarting."""
    trainer.strategy.setup_optimizers(trainer)
    for config in trainer.lr_scheduler_configs:
        config.scheduler.last_epoch = trainer.global_step - 1
        config.scheduler.step()
