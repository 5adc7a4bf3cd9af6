"""The number a run returns to a Hydra sweeper: ``objective.metric`` minus a size penalty.

``python train.py -m hparams_search=optuna`` maximizes it (conf/hparams_search/optuna.yaml). With
``objective.size_penalty=p`` the objective is ``metric - p * MB``, where MB is the size of the
student's smallest artifact (the b-bit quantized file, the sparse file, or the fp32 weights), so a
sweep can trade accuracy against size.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from distill.config import ConfigError

# metric -> whether it needs quantization-aware training (quant.bits set)
METRICS = {"test_acc": False, "acc_fp32": True, "acc_fakequant": True, "acc_quant": True}


def check_objective(cfg: DictConfig) -> None:
    """Fail before training if ``objective.metric`` is unknown or this run will not report it."""
    metric = cfg.objective.metric
    if metric not in METRICS:
        raise ConfigError(f"objective.metric: unknown metric {metric!r}; choose from: {', '.join(METRICS)}")
    if METRICS[metric] and cfg.quant.bits is None:
        raise ConfigError(f"objective.metric={metric} needs quantization-aware training: set quant.bits")


def smallest_size_bytes(student: dict[str, Any]) -> int:
    sizes = [v for k, v in student.items() if k.startswith("size_bytes") and not k.endswith("_batch") and isinstance(v, int)]
    return min(sizes)


def objective(summary: dict[str, Any], cfg: DictConfig) -> float:
    student = summary["student"]
    value = float(student[cfg.objective.metric])
    if cfg.objective.size_penalty:
        value -= float(cfg.objective.size_penalty) * smallest_size_bytes(student) / 1e6
    return value
