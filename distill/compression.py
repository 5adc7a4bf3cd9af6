"""The compression callbacks a config asks for, built in the order they must run, and their reports
merged into the run summary.

Each technique is a Lightning callback of its own module (low-rank: distill/lowrank.py, weight
sharing: distill/weight_sharing.py, QAT: distill/qat.py, pruning: distill/pruning.py, 16-bit
export: distill/half_export.py); after testing each leaves a ``report`` dict of ``student/*`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from distill.pruning import Pruning
from distill.qat import QuantizationAwareTraining


@dataclass
class CompressionCallbacks:
    lowrank: Any = None  # distill.lowrank.LowRankFactorization
    sharing: Any = None  # distill.weight_sharing.WeightSharing
    qat: QuantizationAwareTraining | None = None
    pruning: Pruning | None = None
    half_export: Any = None  # distill.half_export.HalfPrecisionExport

    @property
    def callbacks(self) -> list[Callback]:
        """In the order they must run: low-rank replaces layers before QAT prepares the student (in
        its setup()), then pruning masks the replaced modules; export sees the final student."""
        order = (self.lowrank, self.sharing, self.qat, self.pruning, self.half_export)
        return [c for c in order if c is not None]

    @property
    def changes_weights(self) -> bool:
        """True when the last weights, not the best-by-validation ones, are the compressed model."""
        return any(c is not None for c in (self.qat, self.pruning, self.lowrank, self.sharing))

    def resume_from(self, ckpt_path: str | None) -> None:
        """Low-rank and sharing rebuild the student's shape from the checkpoint before its weights load
        (Lightning sets ``trainer.ckpt_path`` only after the setup hooks)."""
        for shape_changer in (self.lowrank, self.sharing):
            if shape_changer is not None:
                shape_changer.resume_from = ckpt_path

    def update_summary(self, student: dict[str, Any]) -> None:
        """Merge every report into the student's summary; ``size_bytes`` becomes the fp32 artifact
        the compressed model is measured against."""
        if self.qat is not None and self.qat.report:
            student.update(self.qat.report)
            student["size_bytes"] = self.qat.report["size_bytes_fp32"]
        if self.pruning is not None and self.pruning.report:
            student.update(self.pruning.report)
            if self.qat is None:  # the pruned student's fp32 artifact, masks baked in
                student["size_bytes"] = self.pruning.report["size_bytes_dense"]
        for callback in (self.sharing, self.lowrank, self.half_export):
            if callback is not None and callback.report:
                student.update(callback.report)


def build_compression(cfg: DictConfig, shape: dict[str, int], output_dir: Path, resolved: dict[str, Any]) -> CompressionCallbacks:
    """The callbacks of ``lowrank.*``, ``sharing.*``, ``quant.*``, ``prune.*`` and ``export.*``
    (checked by distill.config.validate, which refuses the combinations that do not compose)."""
    sample_shape = (shape["channels"], shape["image_size"], shape["image_size"])
    q, p, built = cfg.quant, cfg.prune, CompressionCallbacks()
    if cfg.lowrank.rank_ratio is not None or cfg.lowrank.energy is not None:
        from distill.lowrank import LowRankFactorization

        built.lowrank = LowRankFactorization(
            cfg.lowrank.rank_ratio, cfg.lowrank.energy, cfg.lowrank.start_epoch, sample_shape,
            q.latency_batch_size, q.latency_threads, output_dir, cfg.lowrank.min_rank, cfg.lowrank.classifier,
        )
    if cfg.sharing.bits is not None:
        from distill.weight_sharing import WeightSharing

        built.sharing = WeightSharing(cfg.sharing.bits, cfg.sharing.start_epoch, output_dir,
                                      {"student": resolved["student"], "data": resolved["data"]})
    if q.bits is not None:
        built.qat = QuantizationAwareTraining(
            bits=q.bits, shape=shape, output_dir=output_dir, backend=q.backend, per_channel=q.per_channel,
            start_epoch=q.start_epoch, freeze_observers_epoch=q.freeze_observers_epoch,
            freeze_bn_epoch=q.freeze_bn_epoch, latency_batch_size=q.latency_batch_size,
            latency_threads=q.latency_threads, student_cfg=resolved["student"], data_cfg=resolved["data"],
        )
    if p.method != "none":
        built.pruning = Pruning(
            method=p.method, amount=p.amount, scope=p.scope, schedule=p.schedule, start_epoch=p.start_epoch,
            end_epoch=p.end_epoch, frequency=p.frequency, interval=p.interval, layers=list(p.layers),
            norm=p.norm, prune_classifier=p.prune_classifier, remove_channels=p.remove_channels,
            sample_shape=sample_shape, latency_batch_size=q.latency_batch_size, latency_threads=q.latency_threads,
            output_dir=output_dir,
        )
    if cfg.export.dtype is not None:
        from distill.half_export import HalfPrecisionExport

        built.half_export = HalfPrecisionExport(cfg.export.dtype, output_dir, resolved["student"], resolved["data"],
                                                sample_shape, q.latency_batch_size, q.latency_threads)
    return built
