"""Every pinned experiment composes, validates and runs one batch on a small stand-in of its data (issue 15, defect 3)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from distill.checks import validate

from .conftest import CONF, write_fake_cifar10

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _stand_in(name: str, tmp_path) -> list[str]:
    if name.startswith("cifar10"):
        write_fake_cifar10(tmp_path / "cifar10", n_train_per_batch=40)
        return [f"data.root={tmp_path / 'cifar10'}", "data.verify_checksums=false"]
    return []


def test_there_are_experiments():
    assert {"digits_resnet50_mlp", "cifar10_resnet50_resnet18"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_validates_with_an_explicit_teacher_optimizer(make_cfg, tmp_path, name):
    cfg = make_cfg(f"experiment={name}", *_stand_in(name, tmp_path))
    validate(cfg)
    raw = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    teacher_optim = OmegaConf.select(raw, "teacher.optim")
    if teacher_optim is not None:  # an experiment that sets the teacher's optimizer sets all of it
        assert {"name", "lr", "weight_decay", "scheduler", "warmup_epochs"} <= set(teacher_optim)


def test_cifar_experiment_trains_its_teacher_with_sgd(make_cfg, tmp_path):
    cfg = make_cfg("experiment=cifar10_resnet50_resnet18", *_stand_in("cifar10", tmp_path))
    assert (cfg.teacher.optim.name, cfg.teacher.optim.lr, cfg.teacher.optim.weight_decay) == ("sgd", 0.1, 5e-4)
    assert cfg.teacher.optim.momentum == 0.9 and cfg.teacher.optim.scheduler == "cosine" and cfg.teacher.optim.warmup_epochs > 0


@pytest.mark.integration
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_one_batch(make_cfg, tmp_path, name):
    from distill.pipeline import run

    cfg = make_cfg(f"experiment={name}", *_stand_in(name, tmp_path), "trainer.fast_dev_run=1", "trainer.enable_progress_bar=false",
                   "logger=csv", "trainer.accelerator=cpu", "teacher.batch_size=8", "data.batch_size=8", "quant.latency_batch_size=2",
                   "export.formats=[]", "measure.latency=off")  # that each pinned run composes and runs, not its files
    summary = run(cfg)
    assert summary["teacher"]["source"] == "trained" and 0 <= summary["student"]["test_acc"] <= 1
