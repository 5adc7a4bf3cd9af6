"""Distil a student from a teacher: ``python train.py teacher=resnet50 student=mlp``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from distill.cli import guarded
from distill.config.schema import register_configs
from distill.pipeline import run
from distill.report.objective import objective

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = guarded(run, cfg)
    # Returned for Hydra sweepers (hparams_search=optuna maximizes it): objective.metric, e.g. the
    # student's test accuracy, minus objective.size_penalty per MB.
    return objective(summary, cfg)


if __name__ == "__main__":
    main()
