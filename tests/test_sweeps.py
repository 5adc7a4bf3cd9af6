"""Hydra sweeps (slow tier): the basic launcher, the Optuna sweeper, and the submitit SLURM launcher
on a real single-node SLURM cluster (``../shared/tools/local-slurm.sh start``; .ci/run starts it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import run_script

# A hung collective or job fails the test in minutes, not at CI's limit.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.xdist_group("slurm")]  # one cluster, one worker

# A short run: the teacher is trained once per test (fresh cache) for one short epoch.
RUN = ["teacher=resnet18", "teacher.epochs=1", "teacher.batch_size=128", "trainer.max_epochs=2",
       "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
       "trainer.accelerator=cpu", "quant.latency_batch_size=32",
       # nothing here is about latency or the exported files (each costs seconds per run: compiles, exports)
       "measure.latency=off", "export.formats=[]"]


def _summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name))]


def _sweep(tmp_path: Path, *overrides: str, logger: str = "csv", timeout: int = 1200) -> list[dict]:
    env = {"DISTILL_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    result = run_script("train.py", "-m", *RUN, f"logger={logger}", *overrides, f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, env=env, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return _summaries(tmp_path / "sweep")


def test_basic_launcher_grid(tmp_path):
    runs = _sweep(tmp_path, "loss.temperature=1,4", "quant.bits=8,4", logger="default")  # CSV and W&B (offline)
    assert sorted((r["hparams"]["temperature"], r["hparams"]["bits"]) for r in runs) == [(1, 4), (1, 8), (4, 4), (4, 8)]
    # The W&B runs of one sweep share a group named after the sweep directory; each has its own name.
    wandb_files = sorted((tmp_path / "sweep").glob("*/wandb/offline-run-*/*.wandb"))
    assert len(wandb_files) == 4
    for num, path in enumerate(wandb_files):
        data = path.read_bytes()
        assert b"train-sweep" in data and f"-T{runs[num]['hparams']['temperature']:g}-a0.9-#{num}".encode() in data
    # One teacher for the whole sweep: trained by the first run, read from the cache by the others.
    assert [r["teacher"]["source"] for r in runs] == ["trained", "cache", "cache", "cache"]
    assert all("acc_quant" in r["student"] for r in runs)


def test_optuna_sweeper_maximizes_the_returned_objective(tmp_path):
    runs = _sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=3", "prune.end_epoch=1",
                  "objective.size_penalty=0.5")
    assert len(runs) == 3
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    # What each trial returned, recomputed from its summary: acc_quant - 0.5 per MB of the smallest artifact.
    values = []
    for r in runs:
        s = r["student"]
        smallest = min(v for k, v in s.items() if k.startswith("size_bytes") and isinstance(v, int))
        values.append(s["acc_quant"] - 0.5 * smallest / 1e6)
    assert results["best_value"] == pytest.approx(max(values))
    best = runs[values.index(max(values))]["hparams"]
    assert results["best_params"]["loss.temperature"] == pytest.approx(best["temperature"])
    assert results["best_params"]["quant.bits"] == best["bits"]
    assert set(results["best_params"]) == {"loss.temperature", "loss.alpha", "optim.lr", "quant.bits", "prune.amount"}


# --- SLURM ---------------------------------------------------------------------------------------

def test_slurm_sweep_jobs_share_one_teacher(tmp_path, slurm_partition):
    # Two jobs at once, one task each: the first trains the teacher, the other waits on its lock.
    runs = _sweep(tmp_path, "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_partition}",
                  "hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1", "loss.temperature=1,4")
    assert sorted(r["hparams"]["temperature"] for r in runs) == [1, 4]
    assert sorted(r["teacher"]["source"] for r in runs) == ["cache", "trained"]
    assert len({r["teacher"]["key"] for r in runs}) == 1
    jobs = list((tmp_path / "sweep" / ".submitit").glob("*_*/*_result.pkl"))
    assert len(jobs) == 2  # two SLURM array tasks, each with its result


def test_slurm_two_process_ddp_job(tmp_path, slurm_partition):
    # One job with two tasks: srun starts both; Lightning takes ranks and rendezvous from SLURM.
    [run] = _sweep(tmp_path, "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_partition}",
                   "hydra.launcher.timeout_min=20", "strategy=ddp", "trainer.devices=2")
    submission = next((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "--ntasks-per-node=2" in submission and "srun" in submission
    # Lightning's lines go through the job's logging (Hydra's handlers, on stdout), each task's to its own log.
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.*"))
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    assert 0.0 < run["student"]["test_acc"] <= 1.0 and run["student"]["params"] > 0  # a finished, tested run
