"""16-bit export of the student (``export.dtype=fp16|bf16``): a half-size artifact, its accuracy and latency.

After testing, the tested fp32 student (pruning masks baked in) is cast to the 16-bit type and
saved as ``student_<dtype>.pt`` (config plus state dict, ``weights_only``-loadable, written
atomically). Its test accuracy is measured by running it in that type on CPU; where CPU kernels
lack the type, weights and inputs are rounded to it and the arithmetic stays fp32, and the report
says which (``half_mode``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from distill.compress.prune.masks import bake
from distill.compress.settings import EXPORT_CHECKS
from distill.compress.technique import (
    BuildContext,
    LoadedArtifact,
    StudentFigures,
    Technique,
    TechniqueReport,
)
from distill.data.datamodules import datamodule_from
from distill.errors import ConfigError
from distill.measure import latency
from distill.measure.record import DeployedModel, Latency
from distill.measure.size import count_parameters
from distill.models.registry import build_student
from distill.runtime.atomic import atomic_torch_save

log = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FORMAT = "distill-half"


def half_accuracy(model: nn.Module, loader: Any, dtype: torch.dtype) -> tuple[float, str]:
    """Test accuracy of ``model`` in ``dtype``: natively if the CPU kernels allow, else simulated."""
    half = copy.deepcopy(model).eval().to(dtype)
    correct = total = 0
    mode = "native"
    with torch.inference_mode():
        for x, y, *_ in loader:
            try:
                logits = half(x.to(dtype)) if mode == "native" else half(x.to(dtype).float())
            except (RuntimeError, NotImplementedError):  # no CPU kernel for this type: round, compute in fp32
                mode, half = "weights-rounded", half.float()
                logits = half(x.to(dtype).float())
            correct += int((logits.float().argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1), mode


class _CastInput(nn.Module):
    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


@dataclass
class HalfReport(TechniqueReport):
    half_dtype: str
    half_mode: str  # native | weights-rounded (no CPU kernels for the type: arithmetic in fp32)
    acc_half: float
    size_bytes_half: int
    half_artifact: str
    latency_ms_half_batch: float | None = None  # native mode (or CUDA) only
    latency_ms_fp32_batch: float | None = None
    latency_ms_half: float | None = None  # batch 1
    latency_ms_fp32: float | None = None
    latency_device: str | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or not k.startswith("latency")}

    def deployed(self, student: StudentFigures) -> DeployedModel:
        return DeployedModel(kind=self.half_dtype, acc=self.acc_half, params=student.params, size_bytes=self.size_bytes_half,
                             bits=16, latency_ms=self.latency_ms_half, latency_ms_batch=self.latency_ms_half_batch, path=self.half_artifact,
                             latency_device=self.latency_device)

    def fp32_latency(self) -> Latency | None:
        return Latency(self.latency_ms_fp32, self.latency_ms_fp32_batch, self.latency_device) if self.latency_ms_fp32_batch is not None else None


class HalfPrecisionExport(Callback):
    def __init__(self, dtype: str, output_dir: str | Path, student_cfg: dict[str, Any], data_cfg: dict[str, Any],
                 sample_shape: tuple[int, int, int], latency_batch_size: int, latency_threads: int | None,
                 latency_device: str | None = "cpu") -> None:
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.output_dir = Path(output_dir)
        self.student_cfg, self.data_cfg = student_cfg, data_cfg
        self.sample_shape, self.latency_batch_size, self.latency_threads = sample_shape, latency_batch_size, latency_threads
        self.latency_device = latency_device
        self.report: HalfReport | None = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        student = bake(copy.deepcopy(pl_module.student)).cpu().eval()
        for module in student.modules():  # weight sharing: plain weights (codebook[indices]) only
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        state = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in student.state_dict().items()}
        path = atomic_torch_save({"format": FORMAT, "dtype": self.dtype_name, "student": self.student_cfg,
                                  "data": self.data_cfg, "state_dict": state}, self.output_dir / f"student_{self.dtype_name}.pt")
        acc, mode = half_accuracy(student, trainer.datamodule.test_dataloader(shard=False), self.dtype)
        lat = None
        # Timed where the run times (measure.latency); on CPU only where its kernels exist (a
        # simulated half model has no latency of its own).
        device = self.latency_device if self.latency_device != "cpu" or mode == "native" else None
        if device is not None:
            threads = self.latency_threads or torch.get_num_threads()
            half = _CastInput(copy.deepcopy(student).to(self.dtype), self.dtype)
            lat = latency.measure_many({"fp32": copy.deepcopy(student), "half": half}, self.sample_shape, self.latency_batch_size,
                                       threads, device=device)
        self.report = HalfReport(half_dtype=self.dtype_name, half_mode=mode, acc_half=acc, size_bytes_half=path.stat().st_size,
                                 half_artifact=str(path))
        if lat is not None:
            self.report.latency_ms_half_batch = lat["half"].ms_batch
            self.report.latency_ms_fp32_batch = lat["fp32"].ms_batch
            self.report.latency_ms_half, self.report.latency_ms_fp32 = lat["half"].ms, lat["fp32"].ms
            self.report.latency_device = device
        log.info("export: %s student: test acc %.4f (%s), %d bytes at %s", self.dtype_name, acc, mode, path.stat().st_size, path)


class HalfTechnique(Technique):
    """``export.dtype=fp16|bf16``: the tested student saved and measured in 16 bits."""

    name, setting, deploy_rank, label_rank, changes_weights = "export", "export.dtype", 40, 4, False
    callback_class = HalfPrecisionExport
    checks = EXPORT_CHECKS

    def enabled(self, cfg: DictConfig) -> bool:
        return cfg.export.dtype is not None

    def check(self, cfg: DictConfig, others: list[Technique]) -> None:
        if any(t.name == "quant" for t in others):
            raise ConfigError(f"export.dtype={cfg.export.dtype} with quant.bits={cfg.quant.bits}: the student is exported as "
                              "integers already; choose one")

    def callback(self, cfg: DictConfig, ctx: BuildContext) -> HalfPrecisionExport:
        return HalfPrecisionExport(cfg.export.dtype, ctx.output_dir, ctx.student_cfg, ctx.data_cfg, ctx.sample_shape,
                                   ctx.latency_batch_size, ctx.latency_threads, ctx.latency_device)

    def load_artifact(self, path: Path, payload: dict[str, Any], data_overrides: dict[str, Any]) -> LoadedArtifact | None:
        if payload.get("format") != FORMAT:
            return None
        datamodule = datamodule_from(payload["data"], data_overrides)
        model = build_student(OmegaConf.create(payload["student"]), **datamodule.shape)
        # The 16-bit weights, evaluated with fp32 arithmetic: what every CPU can run.
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
        return LoadedArtifact(model.eval(), datamodule, payload["student"]["name"], payload["data"]["name"],
                              f"{payload['dtype']} weights (fp32 arithmetic)", count_parameters(model), path.stat().st_size)

    def hparams(self, cfg: DictConfig) -> dict[str, Any]:
        return {"export_dtype": cfg.export.dtype}

    def tag(self, cfg: DictConfig, report: TechniqueReport | None) -> str:
        return str(cfg.export.dtype)
