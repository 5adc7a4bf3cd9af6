"""Distil a student from a teacher: ``python train.py teacher=resnet50 student=mlp``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from distill.checks import precheck
from distill.cli import guarded
from distill.config.schema import register_configs

register_configs()


def _train(cfg: DictConfig) -> dict | None:
    # The checks that need no torch first: importing the pipeline (torch, Lightning) takes seconds,
    # and a typo should not wait for it.
    precheck(cfg)
    from distill.pipeline import run  # deferred: heavy (torch, Lightning); after the cheap checks

    return run(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = guarded(_train, cfg)
    from distill.report.objective import objective  # deferred: imports torch
    # Returned for Hydra sweepers (hparams_search=optuna maximizes it): objective.metric, e.g. the
    # student's test accuracy, minus objective.size_penalty per MB.
    return objective(summary, cfg)


if __name__ == "__main__":
    main()
