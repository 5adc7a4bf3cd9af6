"""Evaluate a saved student: everything but the checkpoint path comes from the checkpoint itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from distill.checkpoint_io import CheckpointError, load_checkpoint
from distill.data import BaseDataModule, build_datamodule
from distill.models import build_student, count_parameters
from distill.report import serialized_size_bytes

STUDENT_PREFIX = "student."


def load_student(path: str | Path, data_overrides: dict[str, Any] | None = None) -> tuple[nn.Module, BaseDataModule, DictConfig]:
    """Rebuild the student and its data module from a distill checkpoint (``weights_only`` load)."""
    ckpt = load_checkpoint(path, what="student checkpoint")
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"student checkpoint {path} was not written by distill's train.py (no config inside)")
    cfg = OmegaConf.create(config)
    data_cfg = OmegaConf.merge(cfg.data, data_overrides or {})
    datamodule = build_datamodule(data_cfg)
    student = build_student(cfg.student, **datamodule.shape)
    state = {k[len(STUDENT_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STUDENT_PREFIX)}
    try:
        student.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"student checkpoint {path} does not match student={cfg.student.name}: {err}") from err
    return student.eval(), datamodule, cfg


@torch.inference_mode()
def test_accuracy(model: nn.Module, datamodule: BaseDataModule, device: str = "cpu") -> float:
    datamodule.setup("test")
    metric = MulticlassAccuracy(datamodule.num_classes, average="micro").to(device)
    model = model.to(device).eval()
    for x, y in datamodule.test_dataloader():
        metric.update(model(x.to(device)), y.to(device))
    return float(metric.compute())


def evaluate_checkpoint(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else {}
    if cfg.batch_size:
        overrides["batch_size"] = cfg.batch_size
    student, datamodule, run_cfg = load_student(cfg.ckpt_path, overrides)
    result = {
        "checkpoint": str(cfg.ckpt_path),
        "student": run_cfg.student.name,
        "data": run_cfg.data.name,
        "test_acc": test_accuracy(student, datamodule, cfg.accelerator),
        "params": count_parameters(student),
        "size_bytes": serialized_size_bytes(student),
    }
    table = Table(title=f"evaluate: {Path(cfg.ckpt_path).name}")
    for col in ("student", "data", "test acc", "params", "size (bytes)"):
        table.add_column(col, justify="right" if col not in ("student", "data") else "left")
    table.add_row(result["student"], result["data"], f"{100 * result['test_acc']:.2f} %", f"{result['params']:,}", f"{result['size_bytes']:,}")
    (console or Console()).print(table)
    return result
