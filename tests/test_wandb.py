"""Weights & Biases with the real client, offline: identity, trade-off metrics, and no secrets."""

from __future__ import annotations

import json

import pytest

from .conftest import run_script

pytestmark = pytest.mark.integration

RUN = ["teacher=resnet18", "teacher.epochs=1", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
       "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "quant.latency_batch_size=32"]


def test_no_secret_reaches_any_file_and_an_unreachable_server_means_offline(tmp_path):
    api_key = "canarykey" + "0123456789abcdef" * 2  # shaped like a W&B key
    env_secret = "canaryvalue-7f3a9c"
    env = {
        "DISTILL_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_API_KEY": api_key,  # credentials present ...
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # ... but no server answers (the discard port)
        "WANDB_MODE": None,
        "DISTILL_SECRET_ROOT": env_secret,
    }
    result = run_script("train.py", *RUN, "quant.bits=8", "logger.wandb.log_model=true",
                        "data.root=${oc.env:DISTILL_SECRET_ROOT}",  # a config value read from the environment
                        f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B server is unreachable; running offline" in (tmp_path / "run" / "train.log").read_text()

    # Nowhere: run directory (Hydra's .hydra/, logs, checkpoints, artifacts, W&B's offline run) and the cache.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".wandb" for p in files)
    leaks = [str(p) for p in files for secret in (api_key, env_secret) if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    # The environment-read value is stored as its interpolation text, which still resolves.
    import torch

    ckpt = torch.load(next(tmp_path.glob("run/checkpoints/last.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["data"]["root"] == "${oc.env:DISTILL_SECRET_ROOT}"

    # The offline W&B run holds the identity, the trade-off summary keys, the table and the model artifact.
    [wandb_file] = (tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb")
    data = wandb_file.read_bytes()
    for needle in ("resnet18-mlp-digits-int8-T4-a0.9", "teacher:resnet18", "student:mlp", "bits:8", "prune:none",
                   "data:digits", "student/acc_quant", "student/size_bytes_quant", "teacher/test_acc",
                   "student_quant.pt.xz"):
        assert needle.encode() in data, needle
    [table] = (tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/trade_off_*.table.json")
    table = json.loads(table.read_text())
    assert len(table["data"]) == 1 and {"student/acc_quant", "hparams/temperature"} <= set(table["columns"])


def test_run_name_and_tags_come_from_the_config():
    from omegaconf import OmegaConf

    from distill.runtime.loggers import run_identity

    cfg = OmegaConf.create({
        "task_name": "train", "teacher": {"name": "resnet50"}, "student": {"name": "cnn"}, "data": {"name": "digits"},
        "loss": {"temperature": 2.0, "alpha": 0.5}, "quant": {"bits": 4},
        "prune": {"method": "magnitude", "amount": 0.7, "importance": "magnitude"},
        "logger": {"wandb": {"name": None, "group": None, "tags": ["mine"]}},
    })
    ident = run_identity(cfg)  # outside Hydra: no sweep, no group
    assert ident == {"name": "resnet50-cnn-digits-int4-magnitude0.7-T2-a0.5", "group": None,
                     "tags": ["teacher:resnet50", "student:cnn", "bits:4", "prune:magnitude-0.7", "data:digits", "loss:kd", "mine"]}
