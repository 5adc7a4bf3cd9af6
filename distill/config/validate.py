"""Range checks of the settings every run has, and the machinery every other check uses.

A :data:`Check` is ``(key, predicate, what is allowed)``; :func:`run_checks` fails on the first
value the predicate refuses, with ``<key>=<value> is out of range: must be <allowed>``. The
checks of one feature live with it (a compression technique's in its module under
``distill/compress``, a loss's with the loss, the teacher's with the teacher); this module holds
those of the settings no single feature owns: trainer, data loader, student, optimizer, logging,
strategy, resuming, extra callbacks and the devices of this machine. :func:`distill.checks.validate`
runs them all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from distill.errors import ConfigError

Check = tuple[str, Callable[[Any], bool], str]


def is_positive(x: Any) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def in_unit(x: Any) -> bool:
    return x is not None and math.isfinite(x) and 0.0 <= x <= 1.0


def at_least(n: int) -> Callable[[Any], bool]:
    return lambda x: x is not None and x >= n


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda x: x in choices


def fraction_open(x: Any) -> bool:
    return x is not None and 0.0 < x < 1.0


def epochs_bound(cfg: DictConfig) -> int | None:
    """``trainer.max_epochs``, or None when a schedule cannot be checked against it (fast_dev_run)."""
    return None if cfg.trainer.get("fast_dev_run") else cfg.trainer.max_epochs


def _cuda_count() -> int:
    import torch  # deferred: this module runs before torch is imported (precheck: a typo fails in a second)

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _on_gpu(trainer: DictConfig) -> bool:
    accelerator = str(trainer.accelerator)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and _cuda_count() > 0)


def devices_per_node(trainer: DictConfig) -> int:
    """``trainer.devices`` resolved as Lightning resolves it: a count, a list of indices, or
    ``auto`` / ``-1`` (every GPU; one process on CPU for ``auto``, every core for ``-1``)."""
    devices, gpu = trainer.devices, _on_gpu(trainer)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    text = str(devices).strip()
    if text.lstrip("-").isdigit() and int(text) >= 0:
        return int(text)
    if text == "-1":
        return _cuda_count() if gpu else (os.cpu_count() or 1)
    return max(_cuda_count(), 1) if gpu else 1  # auto


def world_size(cfg: DictConfig) -> int:
    """How many training processes the run starts: devices per node times ``trainer.num_nodes``."""
    return devices_per_node(cfg.trainer) * int(cfg.trainer.num_nodes)


def one_process(cfg: DictConfig) -> bool:
    """Whether the run trains in a single process (no DDP, no DeepSpeed, one device on one node)."""
    return cfg.strategy.name == "auto" and world_size(cfg) == 1


OPTIM_CHECKS: list[Check] = [
    ("name", one_of("sgd", "adamw"), "one of: sgd, adamw"),
    ("lr", is_positive, "a finite number > 0"),
    ("weight_decay", lambda x: x >= 0, ">= 0"),
    ("momentum", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("scheduler", one_of("cosine", "step", "none"), "one of: cosine, step, none"),
    ("step_size", at_least(1), ">= 1"),
    ("gamma", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("warmup_epochs", at_least(0), ">= 0"),
]

SETTINGS_CHECKS: list[Check] = [
    ("loss.on_nonfinite", one_of("stop", "skip"), "one of: stop, skip"),
    ("trainer.max_epochs", at_least(0), ">= 0"),
    ("trainer.num_nodes", at_least(1), ">= 1"),
    ("trainer.log_every_n_steps", at_least(1), ">= 1"),
    ("trainer.accumulate_grad_batches", at_least(1), ">= 1"),
    ("data.batch_size", at_least(1), ">= 1"),
    ("data.num_workers", at_least(0), ">= 0"),
    ("data.val_fraction", fraction_open, "in (0, 1)"),
    ("data.train_fraction", lambda x: x is not None and 0.0 < x <= 1.0, "in (0, 1]"),
    ("data.test_fraction", fraction_open, "in (0, 1)"),
    ("data.num_samples", at_least(1), ">= 1"),
    ("student.dropout", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("student.hidden_sizes", lambda xs: all(h >= 1 for h in xs), "a list of sizes >= 1"),
    ("student.channels", lambda xs: len(xs) >= 1 and all(c >= 1 for c in xs), "a non-empty list of channel counts >= 1"),
    ("data.num_classes", lambda x: x is None or x >= 2, ">= 2 (or null for the dataset's own)"),
    ("data.channels", lambda x: x is None or x >= 1, ">= 1 (or null)"),
    ("data.image_size", lambda x: x is None or x >= 1, ">= 1 (or null)"),
    ("data.mixup", lambda x: x is not None and 0 <= x < float("inf"), ">= 0 (the Beta(alpha, alpha) parameter; 0: off)"),
    ("data.cutmix", lambda x: x is not None and 0 <= x < float("inf"), ">= 0 (the Beta(alpha, alpha) parameter; 0: off)"),
    ("logger.wandb.mode", lambda x: x in ("auto", "online", "offline", "disabled"), "one of: auto, online, offline, disabled"),
    ("strategy.name", one_of("auto", "ddp", "deepspeed"), "one of: auto, ddp, deepspeed"),
    ("strategy.stage", one_of(1, 2, 3), "one of: 1, 2, 3"),
    ("objective.size_penalty", lambda x: x >= 0, ">= 0"),
    # Every run measures latency (of the teacher, the student and the deployed model) with these.
    ("quant.latency_batch_size", lambda x: x is None or x >= 1, ">= 1 (or null: sized for the input resolution)"),
    ("measure.latency", one_of("auto", "cpu", "cuda", "off"), "one of: auto, cpu, cuda, off"),
    ("quant.latency_threads", lambda x: x is None or x >= 1, ">= 1 (or null)"),
    ("resume", one_of("auto", "never"), "one of: auto, never"),
    ("student.init", lambda x: x in (None, "teacher"), "null or teacher"),
    ("checkpoint.every_n_epochs", lambda x: x is None or x >= 1, ">= 1 (or null: keep only best and last)"),
    *[(f"optim.{k}", f, m) for k, f, m in OPTIM_CHECKS],
]


def run_checks(cfg: DictConfig, checks: list[Check]) -> None:
    """Fail on the first ``(key, predicate, allowed)`` whose value the predicate refuses."""
    for key, ok, allowed in checks:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None and key.startswith("logger.wandb"):
            continue  # wandb switched off
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={value!r} is out of range: must be {allowed}")


def check_in_registry(cfg: DictConfig, key: str, registry: Any, what: str) -> None:
    """``<key>: unknown <what> '<name>'; choose from: ...`` when the name is not in ``registry``."""
    name = OmegaConf.select(cfg, key)
    if name not in registry:
        raise ConfigError(f"{key}: unknown {what} {name!r}; choose from: {', '.join(sorted(registry))}")


def check_nonfinite_policy(cfg: DictConfig) -> None:
    """``loss.on_nonfinite=skip`` works in one process only."""
    if cfg.loss.on_nonfinite == "skip" and not one_process(cfg):
        raise ConfigError("loss.on_nonfinite=skip needs one process: a rank that skips a step would leave the others "
                          "waiting for its gradients; use loss.on_nonfinite=stop")


# The optimizers DeepSpeed can step in host memory under ZeRO-Offload (distill/distillation/optim.py
# builds DeepSpeedCPUAdam for them). DeepSpeed has no host kernel for SGD: it refuses any other
# client optimizer with offload (unless zero_force_ds_cpu_optimizer=false), and torch's SGD is not
# on ZeRO's list of tested optimizers either, so it is refused here rather than forced through.
OFFLOAD_OPTIMIZERS = ("adamw",)


def check_optimizer_offload(cfg: DictConfig) -> None:
    """``strategy.offload_optimizer=true`` (``deepspeed_stage_{2,3}_offload``) needs an optimizer DeepSpeed steps on the host."""
    strategy = cfg.strategy
    if strategy.name == "deepspeed" and strategy.offload_optimizer and cfg.optim.name not in OFFLOAD_OPTIMIZERS:
        raise ConfigError(
            f"optim.name={cfg.optim.name} cannot train with strategy=deepspeed (ZeRO stage {strategy.stage}) and "
            "strategy.offload_optimizer=true: ZeRO-Offload steps the optimizer in host memory with DeepSpeed's own "
            f"optimizers (adamw: DeepSpeedCPUAdam), and DeepSpeed has none for {cfg.optim.name}; use optim.name=adamw, "
            f"or the strategy without offload (strategy=deepspeed_stage_{strategy.stage})")


def check_callbacks(cfg: DictConfig) -> None:
    """Every ``callbacks.<name>`` names an importable class: a typo fails here, not after the teacher is trained."""
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:  # callbacks.<name>=null switches a callback off
            continue
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if not target:
            raise ConfigError(f"callbacks.{name}: needs a _target_ (e.g. lightning.pytorch.callbacks.EarlyStopping)")
        try:
            get_object(target)
        except Exception as err:  # ImportError, or a _target_ that is not a dotted path
            raise ConfigError(f"callbacks.{name}._target_: cannot import {target!r} ({err})") from err


def check_creatable_directory(key: str, path: str | os.PathLike) -> None:
    """``path`` is a directory, or could be made one: no file stands in its way, and the nearest
    existing ancestor is writable. A failure names the setting, not only the path."""
    target = Path(path).expanduser()
    for part in (target, *target.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"{key}={path}: {part} is a file, not a directory")
            if part != target and not os.access(part, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}={path}: cannot create it ({part} is not writable)")
            return


def check_devices(trainer: DictConfig) -> None:
    """More devices than this machine has, or a GPU where there is none: fail now, naming the key."""
    accelerator, devices = str(trainer.accelerator), trainer.devices
    if accelerator in ("gpu", "cuda") and _cuda_count() == 0:
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU (use trainer.accelerator=cpu or auto)")
    gpu = _on_gpu(trainer)
    if devices_per_node(trainer) < 1:
        raise ConfigError(f"trainer.devices={devices!r} is out of range: must be >= 1, -1 (every device) or auto")
    available = _cuda_count() if gpu else (os.cpu_count() or 1)
    wanted = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()) else None
    if wanted is not None and wanted > available:
        kind = "CUDA GPUs" if gpu else "CPU cores"
        raise ConfigError(f"trainer.devices={wanted} but this machine has {available} {kind}")
