"""The number a run returns to a Hydra sweeper: ``objective.metric`` minus a size penalty.

``python train.py -m hparams_search=optuna`` maximizes it (conf/hparams_search/optuna.yaml). With
``objective.size_penalty=p`` the objective is ``metric - p * MB``, where MB is the size of the
run's deployed model (``summary.json``'s ``deployed``: the b-bit quantized file, the sparse file, the
16-bit or shared-weight file, or the fp32 weights), so a sweep can trade accuracy against size.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from distill.errors import ConfigError
from distill.report.summary import deployed_model

# metric -> whether it needs quantization-aware training (quant.bits set)
METRICS = {"test_acc": False, "acc_fp32": True, "acc_fakequant": True, "acc_quant": True}


def check_objective(cfg: DictConfig) -> None:
    """Fail before training if ``objective.metric`` is unknown or this run will not report it."""
    metric = cfg.objective.metric
    if metric not in METRICS:
        raise ConfigError(f"objective.metric: unknown metric {metric!r}; choose from: {', '.join(METRICS)}")
    if METRICS[metric] and cfg.quant.bits is None:
        raise ConfigError(f"objective.metric={metric} needs quantization-aware training: set quant.bits")


def objective(summary: dict[str, Any], cfg: DictConfig) -> float:
    value = float(summary["student"][cfg.objective.metric])
    if cfg.objective.size_penalty:
        value -= float(cfg.objective.size_penalty) * deployed_model(summary).size_bytes / 1e6
    return value
