"""Evaluate a distilled student (``python evaluate.py ckpt_path=PATH``) or compare finished runs
(``python evaluate.py runs=outputs/train/multiruns/<sweep>``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from distill.cli import guarded
from distill.config.schema import register_configs
from distill.evaluation import evaluate

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return guarded(evaluate, cfg).get("test_acc")


if __name__ == "__main__":
    main()
