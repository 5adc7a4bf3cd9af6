"""Quantization-aware training as a Lightning callback (``quant.bits=N``).

The LightningModule knows nothing about quantization. This callback

1. at ``setup`` (before Lightning restores a checkpoint, so a resumed run loads the fake-quant
   state: observer ranges, scales, zero points) replaces ``module.student`` with its QAT version
   (conv-BN fused, fake quantizers on weights and activations; see distill/quant_backend.py);
2. at every epoch start applies the schedule, a pure function of the epoch (so resuming lands in
   the same state): fp32 distillation before ``start_epoch``, fake quantization from then on,
   observers frozen from ``freeze_observers_epoch``, BatchNorm statistics from ``freeze_bn_epoch``
   (observers never run on validation or test data);
3. after testing (the weights that were tested: the best checkpoint) converts the student to a
   real integer model, evaluates the **converted** model on the test split, saves it (b-bit packed
   artifact plus a TorchScript file) and measures sizes and CPU latencies. :attr:`report` holds
   the numbers; the pipeline puts them in ``summary.json``, the table and the loggers.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from distill import latency, quant_backend
from distill.quant_artifact import save_quantized, save_torchscript
from distill.report import serialized_size_bytes

log = logging.getLogger(__name__)

ARTIFACT = "student_quant.pt.xz"
TORCHSCRIPT = "student_quant.torchscript.pt"


class QuantizationAwareTraining(Callback):
    def __init__(
        self,
        bits: int,
        shape: dict[str, int],
        output_dir: str | Path,
        backend: str = "x86",
        per_channel: bool = True,
        start_epoch: int = 0,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        latency_batch_size: int = 256,
        latency_threads: int | None = None,
        student_cfg: dict[str, Any] | None = None,
        data_cfg: dict[str, Any] | None = None,
    ) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"quant.bits={bits} is out of range: must be in [2, 8]")
        self.bits, self.backend, self.per_channel = bits, backend, per_channel
        self.start_epoch = start_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.shape = shape
        self.output_dir = Path(output_dir)
        self.latency_batch_size, self.latency_threads = latency_batch_size, latency_threads
        self.student_cfg, self.data_cfg = student_cfg or {}, data_cfg
        self.float_student: nn.Module | None = None  # the fp32 architecture, for size and latency
        self.report: dict[str, Any] = {}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.shape["channels"], self.shape["image_size"], self.shape["image_size"])

    # -- training ---------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if quant_backend.is_prepared(pl_module.student):
            return
        self.float_student = copy.deepcopy(pl_module.student).cpu().eval()
        example = torch.zeros(1, *self.sample_shape)
        pl_module.student = quant_backend.prepare_qat(pl_module.student, self.bits, self.per_channel, example, self.backend)
        self.apply_schedule(pl_module.student, trainer.current_epoch)
        log.info("qat: student prepared for %d-bit quantization-aware training (%s backend)", self.bits, self.backend)

    def apply_schedule(self, student: nn.Module, epoch: int) -> None:
        """Put the fake quantizers and BatchNorm in the state the schedule gives for ``epoch``."""
        active = epoch >= self.start_epoch
        observing = active and (self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch)
        quant_backend.set_fake_quant(student, active)
        quant_backend.set_observers(student, observing)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            quant_backend.freeze_bn_stats(student)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply_schedule(pl_module.student, trainer.current_epoch)

    # Observers update their ranges whenever they run, in eval mode too. Only training data may
    # move the scales: evaluation must measure the model, not change it.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        quant_backend.set_observers(pl_module.student, False)
        if trainer.sanity_checking and not self._calibrated(pl_module.student):
            quant_backend.set_fake_quant(pl_module.student, False)  # no ranges yet: check in fp32

    @staticmethod
    def _calibrated(student: nn.Module) -> bool:
        """Whether every observer has seen data (a fresh one holds an empty or infinite range)."""
        for m in quant_backend.fake_quant_modules(student):
            low = m.activation_post_process.min_val
            if low.numel() == 0 or not torch.isfinite(low).all():
                return False
        return True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply_schedule(pl_module.student, trainer.current_epoch)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        quant_backend.set_observers(pl_module.student, False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Each rank's observers saw its own last batch: make rank 0's ranges everyone's, and check.
        from distill.rank_sync import broadcast_buffers, verify_identical

        suffixes = ("scale", "zero_point", "min_val", "max_val")
        broadcast_buffers(pl_module.student, suffixes)
        verify_identical(pl_module.student, suffixes, "qat: scales and zero points")

    def state_dict(self) -> dict[str, Any]:
        # The fake-quant state itself (scales, zero points, observer ranges) is in the model's
        # state dict; this records what it was trained for, so a resume with other settings fails.
        return {"bits": self.bits, "backend": self.backend, "per_channel": self.per_channel}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("bits", "backend", "per_channel"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"quant.{key}={getattr(self, key)!r} but the checkpoint being resumed was trained "
                    f"with quant.{key}={state_dict[key]!r}"
                )

    # -- conversion and measurement ---------------------------------------------------------------

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not self._calibrated(pl_module.student):
            # e.g. a fast_dev_run that ended before quant.start_epoch: there are no scales to convert with
            log.warning("qat: no quantized model: the observers never saw training data "
                        "(training ended before quant.start_epoch=%d)", self.start_epoch)
            return
        datamodule = trainer.datamodule
        self.report = self.convert_and_measure(pl_module.student, datamodule.test_dataloader(shard=False))

    @torch.inference_mode()
    def convert_and_measure(self, prepared: nn.Module, test_loader: Any) -> dict[str, Any]:
        from distill.evaluation import loader_accuracy

        prepared = copy.deepcopy(prepared).cpu().eval()
        quantized = quant_backend.convert(prepared, self.backend)
        float_view = copy.deepcopy(prepared)
        quant_backend.set_fake_quant(float_view, False)  # the same weights, unquantized

        self.output_dir.mkdir(parents=True, exist_ok=True)
        artifact = save_quantized(
            self.output_dir / ARTIFACT, quantized, bits=self.bits, backend=self.backend,
            per_channel=self.per_channel, student_cfg=self.student_cfg, shape=self.shape, data_cfg=self.data_cfg,
        )
        meta = {"bits": self.bits, "backend": self.backend, "student": self.student_cfg, "shape": self.shape}
        torchscript = save_torchscript(self.output_dir / TORCHSCRIPT, quantized, torch.zeros(1, *self.sample_shape), meta)

        float_student = self.float_student if self.float_student is not None else float_view
        threads = self.latency_threads or torch.get_num_threads()
        lat = latency.measure_many({"fp32": float_student, "quant": quantized}, self.sample_shape, self.latency_batch_size, threads)
        lat_fp32, lat_quant = lat["fp32"], lat["quant"]
        size_fp32 = serialized_size_bytes(float_student)
        size_quant = artifact.stat().st_size
        report = {
            "bits": self.bits,
            "backend": self.backend,
            "acc_fp32": loader_accuracy(float_view, test_loader),
            "acc_fakequant": loader_accuracy(prepared, test_loader),
            "acc_quant": loader_accuracy(quantized, test_loader),
            "size_bytes_fp32": size_fp32,
            "size_bytes_quant": size_quant,
            "size_bytes_torchscript": torchscript.stat().st_size,
            "compression": size_fp32 / size_quant,
            "latency_ms_fp32": lat_fp32["latency_ms"],
            "latency_ms_quant": lat_quant["latency_ms"],
            "latency_ms_fp32_batch": lat_fp32["latency_ms_batch"],
            "latency_ms_quant_batch": lat_quant["latency_ms_batch"],
            "latency_batch_size": self.latency_batch_size,
            "latency_threads": threads,
            "artifact": str(artifact),
            "torchscript": str(torchscript),
        }
        log.info(
            "qat: %d-bit student: test acc %.4f (fp32 weights %.4f), %d -> %d bytes (%.2fx)",
            self.bits, report["acc_quant"], report["acc_fp32"], size_fp32, size_quant, report["compression"],
        )
        return report
