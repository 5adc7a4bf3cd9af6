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


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse tensor cores need compute capability >= 8.0 (Ampere)")
def test_a_2_4_pruned_layer_runs_on_sparse_tensor_cores():
    """prune.method=nm's 2:4 masks, as the callback makes them, in the format the GPU's sparse tensor
    cores run (``to_sparse_semi_structured``): the same outputs; both timings printed (a benchmark, no assert)."""
    from types import SimpleNamespace

    from torch.sparse import to_sparse_semi_structured

    from distill.compress.prune.callback import Pruning
    from distill.compress.prune.masks import bake
    from distill.compress.prune.nm import follows

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False))
    cb = Pruning("nm", 0.5, n=2, m=4, prune_classifier=True)
    cb.setup(None, SimpleNamespace(student=model), "fit")
    cb.prune_to(cb.amount)
    dense = bake(model)[0].half().cuda().eval()
    assert follows(dense.weight, 2, 4)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        expected = dense(x)
        sparse = torch.nn.Linear(4096, 4096, bias=False).half().cuda().eval()
        sparse.weight = torch.nn.Parameter(to_sparse_semi_structured(dense.weight.detach()), requires_grad=False)
        torch.testing.assert_close(sparse(x), expected, rtol=1e-2, atol=1e-2)
        timings = {}
        for name, layer in (("dense", dense), ("2:4", sparse)):
            for _ in range(10):
                layer(x)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                layer(x)
            end.record()
            torch.cuda.synchronize()
            timings[name] = start.elapsed_time(end) / 50
    print(f"4096x4096 fp16 linear, batch 4096: dense {timings['dense']:.3f} ms, 2:4 {timings['2:4']:.3f} ms "
          f"({timings['dense'] / timings['2:4']:.2f}x)")


def test_importance_gradients_under_fp16_mixed_precision_use_the_grad_scaler(make_cfg):
    """16-mixed on a GPU has a GradScaler: a gradient criterion's passes scale the loss by it (and divide it out)."""
    from distill.pipeline import run

    summary = run(make_cfg(*FAST, "teacher=resnet18", "student=cnn", "prune.method=unstructured", "prune.importance=snip",
                           "prune.schedule=oneshot", "prune.amount=0.5", "prune.importance_batches=2", "measure.latency=off",
                           "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=16-mixed"))
    assert summary["student"]["sparsity"] == pytest.approx(0.5, abs=0.01)
