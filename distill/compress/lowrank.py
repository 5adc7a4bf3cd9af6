"""Low-rank factorization of the student (``lowrank.rank_ratio=…`` or ``lowrank.energy=…``).

A Linear layer ``W`` (out x in) becomes two thinner ones from its truncated SVD
``W ~= (U_r S_r^1/2)(S_r^1/2 V_r^T)``: ``Linear(in, r, bias=False)`` then ``Linear(r, out)``. A
convolution is factorized the same way after reshaping its kernel to (out, in*kh*kw): a
``Conv2d(in, r, kh x kw)`` with the original stride and padding, then a 1x1 ``Conv2d(r, out)``
(the "channel decomposition" of Jaderberg et al., 2014 / Zhang et al., 2015). Grouped and
depthwise convolutions are left alone. The rank ``r`` of each layer is ``rank_ratio`` times its
full rank, or the smallest rank that keeps the ``energy`` fraction of the squared singular values,
but at least ``lowrank.min_rank``; a layer is only replaced when that saves parameters, and the
classifier (the last Linear layer) only with ``lowrank.classifier=true``: at rank < number of
classes it cannot separate them all.

:class:`LowRankFactorization` factorizes at the start of epoch ``lowrank.start_epoch`` (0: before
training) and training then continues, so the student recovers. Its state (the rank of every
layer) is saved in checkpoints, and a resumed run factorizes the fresh student the same way before
the weights are restored.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn

from distill.compress.settings import LOWRANK_CHECKS
from distill.compress.technique import BuildContext, StudentFigures, Technique, TechniqueReport
from distill.config.loss_terms import active_features
from distill.config.validate import epochs_bound, one_process
from distill.distillation.optim import rebuild_optimizer
from distill.errors import ConfigError
from distill.measure import latency
from distill.measure.accuracy import loader_accuracy
from distill.measure.record import DeployedModel, Latency
from distill.measure.size import serialized_size_bytes
from distill.runtime.checkpoint_io import saved_callback_state

log = logging.getLogger(__name__)


def choose_rank(singular_values: torch.Tensor, rank_ratio: float | None, energy: float | None) -> int:
    full = singular_values.numel()
    if energy is not None:
        kept = torch.cumsum(singular_values.double() ** 2, 0) / (singular_values.double() ** 2).sum()
        return min(int(torch.searchsorted(kept, torch.tensor(energy, dtype=torch.float64)).item()) + 1, full)
    return max(1, min(full, round(float(rank_ratio) * full)))


def _split(weight2d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out x r, r x in) factors with ``first_factor @ second_factor`` the rank-r approximation."""
    u, s, vh = torch.linalg.svd(weight2d.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight2d.dtype), (root[:, None] * vh[:rank]).to(weight2d.dtype)


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    out_factor, in_factor = _split(layer.weight.detach(), rank)
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(in_factor)
        second.weight.copy_(out_factor)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device, layer.weight.dtype)


def factorize_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    out_ch, in_ch, kh, kw = conv.weight.shape
    out_factor, in_factor = _split(conv.weight.detach().reshape(out_ch, in_ch * kh * kw), rank)
    first = nn.Conv2d(in_ch, rank, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      bias=False, padding_mode=conv.padding_mode)
    second = nn.Conv2d(rank, out_ch, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(in_factor.reshape(rank, in_ch, kh, kw))
        second.weight.copy_(out_factor.reshape(out_ch, rank, 1, 1))
        if conv.bias is not None:
            second.bias.copy_(conv.bias)
    return nn.Sequential(first, second).to(conv.weight.device, conv.weight.dtype)


def plan_ranks(model: nn.Module, rank_ratio: float | None, energy: float | None, min_rank: int = 1,
               classifier: bool = False) -> dict[str, int]:
    """The rank of every layer worth factorizing, by module path: never below ``min_rank``, only
    where that saves parameters, and not the classifier (the last Linear) unless ``classifier``."""
    ranks: dict[str, int] = {}
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = linears[-1] if linears and not classifier else None
    for name, module in model.named_modules():
        if name == last:
            continue
        if isinstance(module, nn.Linear):
            out_f, in_f = module.weight.shape
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            out_f, in_f = module.weight.shape[0], module.weight[0].numel()
        else:
            continue
        s = torch.linalg.svdvals(module.weight.detach().reshape(out_f, in_f).double())
        rank = max(choose_rank(s, rank_ratio, energy), min(min_rank, s.numel()))
        if rank * (in_f + out_f) < in_f * out_f:
            ranks[name] = rank
    return ranks


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each named layer by its rank-r factorization, in place."""
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        setattr(parent, child, factorize_linear(layer, rank) if isinstance(layer, nn.Linear) else factorize_conv(layer, rank))
    return model


@dataclass
class LowRankReport(TechniqueReport):
    params_before_lowrank: int
    size_bytes_before_lowrank: int
    acc_before_lowrank: float | None  # None in a resumed run: the pre-factorization student is gone
    acc_lowrank_before_recovery: float | None
    lowrank_layers: int
    lowrank_ranks: dict[str, int]
    params_after_lowrank: int
    size_bytes_lowrank: int
    latency_ms_batch_before_lowrank: float | None  # None: measure.latency=off
    latency_ms_batch_after_lowrank: float | None
    latency_device: str | None = "cpu"

    def fp32_latency(self) -> Latency:
        # The student as configured (unfactorized), which the summary's params and size describe.
        return Latency(None, self.latency_ms_batch_before_lowrank, self.latency_device)

    def deployed(self, student: StudentFigures) -> DeployedModel:
        # The factorized student is the trained one: it deploys as the tested checkpoint.
        return DeployedModel(kind="lowrank", acc=student.test_acc, params=self.params_after_lowrank,
                             size_bytes=self.size_bytes_lowrank, bits=32, latency_ms=None,
                             latency_ms_batch=self.latency_ms_batch_after_lowrank, path=student.checkpoint,
                             latency_device=self.latency_device)


class LowRankFactorization(Callback):
    def __init__(self, rank_ratio: float | None, energy: float | None, start_epoch: int, sample_shape: tuple[int, int, int],
                 latency_batch_size: int, latency_threads: int | None, output_dir: str | Path, min_rank: int = 8,
                 classifier: bool = False, latency_device: str | None = "cpu") -> None:
        self.rank_ratio, self.energy, self.start_epoch = rank_ratio, energy, start_epoch
        self.min_rank, self.classifier = min_rank, classifier
        self.sample_shape, self.latency_batch_size, self.latency_threads = sample_shape, latency_batch_size, latency_threads
        self.latency_device = latency_device
        self.output_dir = Path(output_dir)
        self.ranks: dict[str, int] | None = None
        self._resumed = False
        self.resume_from: str | None = None  # the checkpoint this run resumes, if any
        self.before: dict[str, Any] = {}
        self.report: LowRankReport | None = None

    def _factorize(self, pl_module: L.LightningModule, ranks: dict[str, int] | None = None) -> None:
        student = pl_module.student
        self.before = {"params_before_lowrank": sum(p.numel() for p in student.parameters()),
                       "size_bytes_before_lowrank": serialized_size_bytes(student)}
        self._dense = copy.deepcopy(student).cpu().eval()
        self.ranks = ranks if ranks is not None else plan_ranks(student, self.rank_ratio, self.energy, self.min_rank, self.classifier)
        apply_ranks(student, self.ranks)
        self._just_factorized = copy.deepcopy(student).cpu().eval()  # before any recovery training
        log.info("lowrank: factorized %d layers: %s", len(self.ranks), ", ".join(f"{k}->r{v}" for k, v in self.ranks.items()))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # (Lightning sets trainer.ckpt_path only after the setup hooks: the pipeline passes it.)
        saved = saved_callback_state(self.resume_from, self.state_key).get("ranks")
        if saved is not None:  # resuming after the factorization: rebuild the factorized shapes first
            self._factorize(pl_module, saved)
            self._resumed = True  # the pre-factorization student of the first attempt is gone
        elif self.start_epoch == 0:
            self._factorize(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ranks is not None or trainer.current_epoch < self.start_epoch:
            return
        self._factorize(pl_module)
        # New layers, new parameters for the optimizer.
        rebuild_optimizer(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("ranks") is not None and self.ranks is None:
            raise RuntimeError("lowrank: the checkpoint holds a factorized student but it was not rebuilt before loading")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.ranks is None:
            return
        student = copy.deepcopy(pl_module.student).cpu().eval()
        test = trainer.datamodule.test_dataloader(shard=False)
        threads = self.latency_threads or torch.get_num_threads()
        lat = latency.measure_many({"before": self._dense, "after": student}, self.sample_shape, self.latency_batch_size, threads,
                                   device=self.latency_device)
        self.report = LowRankReport(
            **self.before,
            acc_before_lowrank=None if self._resumed else loader_accuracy(self._dense, test),
            acc_lowrank_before_recovery=None if self._resumed else loader_accuracy(self._just_factorized, test),
            lowrank_layers=len(self.ranks),
            lowrank_ranks=dict(self.ranks),
            params_after_lowrank=sum(p.numel() for p in student.parameters()),
            size_bytes_lowrank=serialized_size_bytes(student),
            latency_ms_batch_before_lowrank=lat["before"].ms_batch,
            latency_ms_batch_after_lowrank=lat["after"].ms_batch,
            latency_device=lat["after"].device,
        )


class LowRankTechnique(Technique):
    """``lowrank.rank_ratio`` or ``lowrank.energy``: SVD-factorized layers, then recovery training."""

    name, setting, deploy_rank, label_rank = "lowrank", "lowrank", 20, 0
    callback_class = LowRankFactorization
    reshapes_student = True
    checks = LOWRANK_CHECKS

    def enabled(self, cfg: DictConfig) -> bool:
        return cfg.lowrank.rank_ratio is not None or cfg.lowrank.energy is not None

    def check(self, cfg: DictConfig, others: list[Technique]) -> None:
        lr_cfg, on = cfg.lowrank, {t.name for t in others}
        if lr_cfg.rank_ratio is not None and lr_cfg.energy is not None:
            raise ConfigError("lowrank.rank_ratio and lowrank.energy are both set: choose one")
        if "prune" in on:
            raise ConfigError(f"lowrank with prune.method={cfg.prune.method}: combining them is not supported; choose one")
        if "quant" in on:
            raise ConfigError("lowrank with quant.bits: combining them is not supported (the quantized artifact stores the "
                              "unfactorized architecture); choose one")
        if active_features(cfg.loss):
            raise ConfigError(f"lowrank with loss.{active_features(cfg.loss)[0]}: the factorization replaces the hooked "
                              "layers; choose one")
        if lr_cfg.start_epoch > 0 and not one_process(cfg):
            raise ConfigError("lowrank.start_epoch > 0 needs one process (it rebuilds the optimizer mid-run); use lowrank.start_epoch=0")
        epochs = epochs_bound(cfg)
        if epochs is not None and lr_cfg.start_epoch >= epochs:
            raise ConfigError(f"lowrank.start_epoch={lr_cfg.start_epoch} must be < trainer.max_epochs={epochs}")

    def callback(self, cfg: DictConfig, ctx: BuildContext) -> LowRankFactorization:
        c = cfg.lowrank
        return LowRankFactorization(c.rank_ratio, c.energy, c.start_epoch, ctx.sample_shape, ctx.latency_batch_size,
                                    ctx.latency_threads, ctx.output_dir, c.min_rank, c.classifier, ctx.latency_device)

    def rebuild(self, student: nn.Module, cfg: DictConfig, state: dict[str, Any], example: torch.Tensor) -> nn.Module:
        return apply_ranks(student, state["ranks"]) if state.get("ranks") else student

    def hparams(self, cfg: DictConfig) -> dict[str, Any]:
        return {"lowrank": cfg.lowrank.rank_ratio if cfg.lowrank.rank_ratio is not None else cfg.lowrank.energy}

    def tag(self, cfg: DictConfig, report: TechniqueReport | None) -> str | None:
        if isinstance(report, LowRankReport) and not report.lowrank_layers:
            return None  # no layer was worth factorizing: the student is unchanged
        amount = cfg.lowrank.rank_ratio if cfg.lowrank.rank_ratio is not None else cfg.lowrank.energy
        return f"lowrank{amount:g}"
