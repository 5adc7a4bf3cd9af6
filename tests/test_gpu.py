"""GPU-only tests (marked ``gpu``; skipped without CUDA): the stock GPU paths the CPU tests stand in for."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from distill.distillation.losses.kd import KDLoss
from distill.distillation.module import DistillationModule
from distill.models.registry import build_student
from distill.runtime.strategies import build_strategy

from .conftest import FAST, run_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_deepspeed_is_lightnings_stock_strategy():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cfg = OmegaConf.create({"name": "deepspeed", "stage": 2, "offload_optimizer": False, "offload_parameters": False})
    assert type(build_strategy(cfg, "gpu")) is DeepSpeedStrategy  # not the CPU subclass


def test_live_teacher_runs_in_half_precision(make_cfg):
    cfg = make_cfg("student=cnn")
    teacher, student = (build_student(cfg.student, num_classes=10, channels=1, image_size=8) for _ in range(2))
    module = DistillationModule(student, teacher, KDLoss(4.0, 0.5), cfg.optim, 10).cuda()
    logits = module.teacher_logits(torch.randn(4, 1, 8, 8, device="cuda"))
    assert logits.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def test_deepspeed_zero2_on_one_gpu(tmp_path):
    result = run_script("train.py", *FAST, "trainer.accelerator=gpu", "trainer.devices=1", "strategy=deepspeed_stage_2",
                        f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env={"DISTILL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_acc" in json.loads((tmp_path / "run" / "summary.json").read_text())["student"]
