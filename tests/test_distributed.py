"""Multi-process training on CPU (slow tier): DDP (gloo) and DeepSpeed through its CPU accelerator."""

from __future__ import annotations

import json

import pytest

from .conftest import run_script

pytestmark = pytest.mark.slow

RUN = ["logger=csv", "teacher=resnet18", "teacher.epochs=1", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
       "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
       "quant.latency_batch_size=32"]


def _train(tmp_path, name: str, *overrides: str) -> dict:
    env = {"DISTILL_CACHE_DIR": str(tmp_path / "cache")}
    result = run_script("train.py", *RUN, *overrides, f"hydra.run.dir={tmp_path}/{name}", cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_ddp_two_processes_with_qat_and_pruning(tmp_path):
    compress = ["quant.bits=8", "prune.method=magnitude", "prune.amount=0.5", "prune.schedule=oneshot"]
    single = _train(tmp_path, "single", *compress)
    ddp = _train(tmp_path, "ddp", *compress, "strategy=ddp", "trainer.devices=2")
    assert set(ddp["student"]) == set(single["student"])  # the same report, whatever the strategy
    assert abs(ddp["student"]["sparsity"] - 0.5) < 0.01
    # Both ranks ended with the same quantization parameters and pruning masks (gathered and compared).
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert "qat: scales and zero points identical on 2 ranks" in log
    assert "prune: masks identical on 2 ranks" in log
    # The distributed test accuracy is exact: a single-process evaluation of the tested checkpoint agrees.
    ev = run_script("evaluate.py", f"ckpt_path={ddp['student']['best_checkpoint']}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"{100 * ddp['student']['test_acc']:.2f} %" in ev.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_on_cpu(tmp_path, stage):
    # Labels only (alpha=0) and a few more steps: the student learns enough that agreeing
    # accuracies mean something (a broken consolidation would not land on the same number).
    learn = ["loss.alpha=0", "trainer.max_epochs=3", "trainer.limit_train_batches=8"]
    single = _train(tmp_path, "single", *learn)
    ds = _train(tmp_path, f"zero{stage}", *learn, f"strategy=deepspeed_stage_{stage}", "trainer.devices=2")
    assert ds["student"]["test_acc"] > 0.3
    assert set(ds["student"]) == set(single["student"])
    assert ds["student"]["params"] == single["student"]["params"]  # not a ZeRO-3 shard
    # A DeepSpeed checkpoint is a directory of shards: evaluate.py consolidates it and agrees.
    ckpt = ds["student"]["best_checkpoint"]
    ev = run_script("evaluate.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/eval{stage}", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"{100 * ds['student']['test_acc']:.2f} %" in ev.stdout


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_resume_from_a_mid_run_checkpoint(tmp_path, strategy):
    """An uninterrupted 3-epoch run vs the same run resumed from its epoch-0 checkpoint (a DeepSpeed
    shard directory). DDP, with QAT and pruning, is checked bitwise in tests/test_preemption.py."""
    run = [f"strategy={strategy}", "trainer.devices=2", "trainer.max_epochs=3", "trainer.limit_train_batches=8",
           "checkpoint.every_n_epochs=1"]
    full = _train(tmp_path, "full", *run)
    mid = tmp_path / "full" / "checkpoints" / "epoch000.ckpt"
    assert mid.is_dir()
    resumed = _train(tmp_path, "resumed", *run, f"ckpt_path={mid}")
    # It continued at epoch 1: the resumed run wrote no epoch-0 checkpoint of its own.
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("epoch00?.ckpt")) == ["epoch001.ckpt", "epoch002.ckpt"]
    assert set(resumed["student"]) == set(full["student"])
    assert abs(resumed["student"]["test_acc"] - full["student"]["test_acc"]) <= 0.02


def test_deepspeed_zero2_with_qat_and_pruning_keeps_every_rank_identical(tmp_path):
    compress = ["quant.bits=8", "prune.method=magnitude", "prune.amount=0.5", "prune.schedule=oneshot"]
    single = _train(tmp_path, "single", *compress)
    ds = _train(tmp_path, "zero2", *compress, "strategy=deepspeed_stage_2", "trainer.devices=2")
    assert set(ds["student"]) == set(single["student"])
    assert abs(ds["student"]["sparsity"] - 0.5) < 0.01
    log = (tmp_path / "zero2" / "train.log").read_text()
    assert "qat: scales and zero points identical on 2 ranks" in log
    assert "prune: masks identical on 2 ranks" in log
