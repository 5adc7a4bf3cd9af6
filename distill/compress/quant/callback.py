"""Quantization-aware training as a Lightning callback (``quant.bits=N``).

The LightningModule knows nothing about quantization. This callback

1. at ``setup`` (before Lightning restores a checkpoint, so a resumed run loads the fake-quant
   state: observer ranges, scales, zero points) replaces ``module.student`` with its QAT version
   (conv-BN fused, fake quantizers on weights and activations; see distill/compress/quant/backend.py);
2. at every epoch start applies the schedule, a pure function of the epoch (so resuming lands in
   the same state): fp32 distillation before ``start_epoch``, fake quantization from then on,
   observers frozen from ``freeze_observers_epoch``, BatchNorm statistics from ``freeze_bn_epoch``
   (observers never run on validation or test data);
3. after testing (the weights that were tested: the best checkpoint) converts the student to a
   real integer model, evaluates the **converted** model on the test split, saves it (b-bit packed
   artifact; an FX student also as a TorchScript file) and measures sizes and CPU latencies (PT2E's
   integer model compiled by Inductor, see ``backend.pytorch_runtime``).

The flow (PT2E, or FX where PT2E fails or pruning needs modules: see distill/compress/quant/backend.py)
is chosen at the first ``setup`` and recorded in the callback state, so a resumed run and a loaded
checkpoint take the same one. :attr:`report` holds
   the numbers; the pipeline puts them in ``summary.json``, the table and the loggers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill.compress.export import save_torchscript
from distill.compress.quant import backend as quant_backend
from distill.compress.quant.artifact import FORMATS as ARTIFACT_FORMATS
from distill.compress.quant.artifact import load_quantized, save_quantized, save_quantized_program
from distill.compress.quant.graph import IntegerGraph
from distill.compress.quant.qdq import QDQModels, qdq_models, remove_channels
from distill.compress.settings import QUANT_CHECKS
from distill.compress.technique import (
    BuildContext,
    LoadedArtifact,
    QuantizedDeployable,
    RemovesChannels,
    StudentFigures,
    Technique,
    TechniqueReport,
)
from distill.config.validate import epochs_bound
from distill.data.datamodules import datamodule_from
from distill.errors import CheckpointError, ConfigError
from distill.measure import latency
from distill.measure.accuracy import loader_accuracy
from distill.measure.record import DeployedModel, Latency
from distill.measure.size import count_parameters, serialized_size_bytes
from distill.models.registry import build_student
from distill.runtime.checkpoint_io import saved_callback_state
from distill.runtime.rank_sync import broadcast_buffers, every_rank, verify_identical

log = logging.getLogger(__name__)

ARTIFACT = "student_quant.pt.xz"
TORCHSCRIPT = "student_quant.torchscript.pt"


@dataclass
class QATReport(TechniqueReport):
    """The converted integer student against its fp32 weights: accuracy, sizes, CPU latencies."""

    bits: int
    backend: str
    acc_fp32: float  # the trained weights with fake quantization off
    acc_fakequant: float
    acc_quant: float  # the converted integer model
    size_bytes_fp32: int
    size_bytes_quant: int  # the b-bit packed artifact
    size_bytes_torchscript: int | None  # None: a PT2E student (its graph's quantize ops are not TorchScript builtins)
    compression: float
    latency_ms_fp32: float | None  # None: measure.latency=off
    latency_ms_quant: float | None
    latency_ms_fp32_batch: float | None
    latency_ms_quant_batch: float | None
    latency_batch_size: int
    latency_threads: int
    artifact: str
    torchscript: str | None
    flow: str = "fx"  # pt2e | fx
    pytorch_runtime: str = ""  # how the integer model was timed: fbgemm / qnnpack, inductor, eager
    # structured pruning's channels (per group root) removed from the int8 and fp32 files' models; the
    # integer model measured here keeps them masked. None: nothing removed
    channels_removed: dict[str, int] | None = None

    def deployed(self, student: StudentFigures) -> DeployedModel:
        return DeployedModel(kind=f"int{self.bits}", acc=self.acc_quant, params=student.params, size_bytes=self.size_bytes_quant,
                             bits=self.bits, latency_ms=self.latency_ms_quant, latency_ms_batch=self.latency_ms_quant_batch,
                             path=self.artifact, latency_device="cpu" if self.latency_ms_quant is not None else None)

    def fp32_latency(self) -> Latency:
        # timed on CPU beside the integer model (None when measure.latency=off)
        return Latency(self.latency_ms_fp32, self.latency_ms_fp32_batch, "cpu" if self.latency_ms_fp32 is not None else None)

    def describe(self) -> list[str]:
        files = f"TorchScript: {self.torchscript}; " if self.torchscript else ""
        if self.channels_removed:
            files += f"the deployable files without the {sum(self.channels_removed.values())} pruned channels; "
        return [f"quantized student ({self.flow} flow): {self.compression:.2f}x smaller than fp32 (fp32 weights: "
                f"{100 * self.acc_fp32:.2f} %); {files}latency with {self.latency_threads} thread(s), "
                f"PyTorch int8 as {self.pytorch_runtime}"]

    def fp32_size_bytes(self) -> int:
        return self.size_bytes_fp32


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
        latency_device: str | None = "cpu",
        student_cfg: dict[str, Any] | None = None,
        data_cfg: dict[str, Any] | None = None,
        flow: str = "auto",
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
        self.latency_device = latency_device
        self.student_cfg, self.data_cfg = student_cfg or {}, data_cfg
        self.flow = flow  # asked for: auto (PT2E, FX where it fails) or fx
        self.flow_used: str | None = None  # taken, at setup
        self.resume_from: str | None = None  # the checkpoint this run resumes, if any
        self.float_student: nn.Module | None = None  # the fp32 architecture, for size and latency
        self.report: QATReport | None = None
        self.exportable: QuantizedDeployable | None = None  # the models the ONNX / torch.export files are of

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.shape["channels"], self.shape["image_size"], self.shape["image_size"])

    # -- training ---------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if quant_backend.is_prepared(pl_module.student):
            return
        self.float_student = copy.deepcopy(pl_module.student).cpu().eval()
        example = torch.zeros(1, *self.sample_shape)
        # A resumed run prepares the student the way its checkpoint was trained (its weights load next;
        # Lightning sets trainer.ckpt_path only after the setup hooks: the pipeline passes it).
        saved = saved_callback_state(self.resume_from, self.state_key)
        flow = (saved.get("flow") or "fx") if saved else self.flow  # QAT state without a flow: from before PT2E
        # Each rank prepares its own copy, and the ranks agree on the outcome (their gradients and
        # collectives must meet in one graph structure): a rank that cannot prepare at all stops every
        # rank (rather than leaving them waiting in the next collective), and if PT2E failed on one
        # rank only, every rank takes FX.
        device = getattr(getattr(trainer, "strategy", None), "root_device", "cpu")
        try:
            prepared, error = quant_backend.prepare_qat(pl_module.student, self.bits, self.per_channel, example, self.backend, flow), None
        except Exception as err:  # noqa: BLE001  (re-raised below, after the other ranks know)
            prepared, error = None, err
        everywhere = every_rank(error is None, device)
        if error is not None:
            raise error
        if not everywhere:
            raise RuntimeError("qat: another rank could not prepare the student for quantization-aware training (its log says why)")
        if not every_rank(quant_backend.flow_of(prepared) == "pt2e", device) and quant_backend.flow_of(prepared) == "pt2e":
            log.warning("qat: PT2E failed on another rank: this rank takes the FX flow too")
            prepared = quant_backend.prepare_qat(copy.deepcopy(self.float_student).train(), self.bits, self.per_channel, example,
                                                 self.backend, "fx")
        pl_module.student = prepared
        self.flow_used = quant_backend.flow_of(pl_module.student)
        self.apply_schedule(pl_module.student, trainer.current_epoch)
        log.info("qat: student prepared for %d-bit quantization-aware training (%s flow, %s backend)",
                 self.bits, self.flow_used, self.backend)

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
        suffixes = ("scale", "zero_point", "min_val", "max_val")
        broadcast_buffers(pl_module.student, suffixes)
        verify_identical(pl_module.student, suffixes, "qat: scales and zero points")

    def state_dict(self) -> dict[str, Any]:
        # The fake-quant state itself (scales, zero points, observer ranges) is in the model's
        # state dict; this records what it was trained for, so a resume with other settings fails.
        return {"bits": self.bits, "backend": self.backend, "per_channel": self.per_channel, "flow": self.flow_used}

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
        # structured pruning's channels, removed from the deployable forms (student_int8.onnx, student.onnx)
        pruned = next((p for c in trainer.callbacks if isinstance(c, RemovesChannels) and (p := c.channels_to_remove())), None)
        self.report = self.convert_and_measure(pl_module.student, datamodule.test_dataloader(shard=False), pruned)

    def deployable_fp32(self) -> nn.Module | None:
        """The trained weights without quantization, conv-BN folded (``student.onnx`` of a QAT run)."""
        return copy.deepcopy(self.exportable.fp32) if self.exportable is not None else None

    def deployable_quantized(self) -> QuantizedDeployable | None:
        """The integer student and its QDQ form (``student_int8.onnx``); None before conversion. The
        compiled runtime is shared, not copied (a copy would compile again, outside its fallback)."""
        if self.exportable is None:
            return None
        return dataclasses.replace(copy.deepcopy(dataclasses.replace(self.exportable, runtime=None)), runtime=self.exportable.runtime)

    @torch.inference_mode()
    def convert_and_measure(self, prepared: nn.Module, test_loader: Any, pruned: dict[str, list[int]] | None = None) -> QATReport:
        """The integer model (converted, saved, measured) and the forms of the deployable files;
        ``pruned`` (structured pruning's channels): those forms without them."""
        prepared = copy.deepcopy(prepared).cpu().eval()
        flow = quant_backend.flow_of(prepared)
        quantized = quant_backend.convert(prepared, self.backend)
        float_view = copy.deepcopy(prepared)
        quant_backend.set_fake_quant(float_view, False)  # the same weights, unquantized
        float_student = self.float_student if self.float_student is not None else float_view
        x = next(iter(test_loader))[0][:64].float().cpu()  # a batch to check the export forms on
        try:  # the ONNX files' models (the run goes on without them: their records say why)
            # Outside inference mode: these modules are exported and saved later, which inference tensors refuse.
            with torch.inference_mode(False), torch.no_grad():
                forms: QDQModels | str = qdq_models(prepared, x, self.bits, self.backend, integer=quantized if flow == "pt2e" else None,
                                                    float_student=self.float_student)
        except Exception as err:  # noqa: BLE001
            log.warning("qat: no QDQ form of the student for ONNX (%s: %s)", type(err).__name__, err)
            forms = f"{type(err).__name__}: {err}"
        # An FX student's packed artifact is its QDQ form as a program (the representation of PT2E's
        # integer model), which loads with no prepare / convert step; fbgemm's model runs it fast.
        integer = quantized
        if flow == "fx" and isinstance(forms, QDQModels):
            with torch.inference_mode(False), torch.no_grad():  # a copy of ordinary tensors: it is exported
                integer = IntegerGraph(copy.deepcopy(forms.qdq)).eval()
        removed = None
        if pruned and isinstance(forms, QDQModels):
            try:
                with torch.inference_mode(False), torch.no_grad():
                    shrunk = remove_channels(forms, x, pruned)
                forms, removed = shrunk.forms, shrunk.removed
                log.info("qat: structured pruning's channels removed from the deployable int8 and fp32 forms: %s", removed)
            except Exception as err:  # noqa: BLE001  (the masked forms still deploy the same function)
                log.warning("qat: the deployable forms keep the pruned channels, masked (%s: %s)", type(err).__name__, err)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        saved = {"bits": self.bits, "backend": self.backend, "per_channel": self.per_channel, "student_cfg": self.student_cfg,
                 "shape": self.shape, "data_cfg": self.data_cfg}
        torchscript = None
        with torch.inference_mode(False), torch.no_grad():
            if isinstance(integer, IntegerGraph):
                artifact = save_quantized_program(self.output_dir / ARTIFACT, integer, torch.zeros(2, *self.sample_shape), **saved)
            else:  # an FX student with no QDQ form: the state-dict format, rebuilt by FX at load
                artifact = save_quantized(self.output_dir / ARTIFACT, quantized, **saved)
            if flow == "fx":
                meta = {"bits": self.bits, "backend": self.backend, "student": self.student_cfg, "shape": self.shape}
                torchscript = save_torchscript(self.output_dir / TORCHSCRIPT, quantized, torch.zeros(1, *self.sample_shape), meta)

        threads = self.latency_threads or torch.get_num_threads()
        # Integer kernels run on CPU only: both models are timed there (unless measure.latency=off).
        # Timed as PyTorch runs the integer model fastest: PT2E's compiled by Inductor, FX's as fbgemm's modules.
        runtime, engine = integer, "eager"
        if self.latency_device is not None:  # compiling (PT2E) costs seconds: only for a timing
            runtime, engine = quant_backend.pytorch_runtime(quantized, torch.zeros(1, *self.sample_shape))
        lat = latency.measure_many({"fp32": copy.deepcopy(float_student), "quant": runtime}, self.sample_shape,
                                   self.latency_batch_size, threads, device=None if self.latency_device is None else "cpu")
        lat_fp32, lat_quant = lat["fp32"], lat["quant"]
        size_fp32 = serialized_size_bytes(float_student)
        size_quant = artifact.stat().st_size
        report = QATReport(
            bits=self.bits,
            backend=self.backend,
            acc_fp32=loader_accuracy(float_view, test_loader),
            acc_fakequant=loader_accuracy(prepared, test_loader),
            acc_quant=loader_accuracy(integer, test_loader),
            size_bytes_fp32=size_fp32,
            size_bytes_quant=size_quant,
            size_bytes_torchscript=torchscript.stat().st_size if torchscript is not None else None,
            compression=size_fp32 / size_quant,
            latency_ms_fp32=lat_fp32.ms,
            latency_ms_quant=lat_quant.ms,
            latency_ms_fp32_batch=lat_fp32.ms_batch,
            latency_ms_quant_batch=lat_quant.ms_batch,
            latency_batch_size=self.latency_batch_size,
            latency_threads=threads,
            artifact=str(artifact),
            torchscript=str(torchscript) if torchscript is not None else None,
            flow=flow,
            pytorch_runtime=engine,
            channels_removed=removed,
        )
        self.exportable = QuantizedDeployable(
            integer=integer, bits=self.bits,
            qdq=forms.qdq if isinstance(forms, QDQModels) else None, fp32=forms.fp32 if isinstance(forms, QDQModels) else None,
            error=forms if isinstance(forms, str) else None, runtime=runtime, engine=engine,
        )
        log.info(
            "qat: %d-bit student (%s flow): test acc %.4f (fp32 weights %.4f), %d -> %d bytes (%.2fx)",
            self.bits, flow, report.acc_quant, report.acc_fp32, size_fp32, size_quant, report.compression,
        )
        return report


class QuantTechnique(Technique):
    """``quant.bits=N``: quantization-aware training, then the converted integer student."""

    name, setting, deploy_rank, label_rank = "quant", "quant.bits", 50, 3
    callback_class = QuantizationAwareTraining
    reshapes_student = True  # PT2E or FX: a resumed run must prepare the student as its checkpoint was
    checks = QUANT_CHECKS

    def enabled(self, cfg: DictConfig) -> bool:
        return cfg.quant.bits is not None

    def check(self, cfg: DictConfig, others: list[Technique]) -> None:
        quant = cfg.quant
        if quant.freeze_observers_epoch is not None and quant.freeze_observers_epoch <= quant.start_epoch:
            raise ConfigError(
                f"quant.freeze_observers_epoch={quant.freeze_observers_epoch} must be > quant.start_epoch="
                f"{quant.start_epoch}: the observers need at least one epoch to set the scales"
            )
        epochs = epochs_bound(cfg)
        if epochs is not None and quant.start_epoch >= epochs:
            raise ConfigError(
                f"quant.start_epoch={quant.start_epoch} must be < trainer.max_epochs={epochs}, "
                "or quantization-aware training never starts"
            )

    def callback(self, cfg: DictConfig, ctx: BuildContext) -> QuantizationAwareTraining:
        q = cfg.quant
        # Pruning masks need the nn.Conv2d / nn.Linear modules an exported (PT2E) graph does not have.
        flow = "fx" if OmegaConf.select(cfg, "prune.method", default="none") != "none" else "auto"
        return QuantizationAwareTraining(
            bits=q.bits, shape=ctx.shape, output_dir=ctx.output_dir, backend=q.backend, per_channel=q.per_channel,
            start_epoch=q.start_epoch, freeze_observers_epoch=q.freeze_observers_epoch, freeze_bn_epoch=q.freeze_bn_epoch,
            latency_batch_size=ctx.latency_batch_size, latency_threads=ctx.latency_threads, latency_device=ctx.latency_device,
            student_cfg=ctx.student_cfg, data_cfg=ctx.data_cfg, flow=flow,
        )

    def rebuild(self, student: nn.Module, cfg: DictConfig, state: dict[str, Any], example: torch.Tensor) -> nn.Module:
        # A checkpoint taken during QAT holds the QAT student (fake quantizers with their scales),
        # prepared by the flow its callback state records (FX: a checkpoint from before PT2E).
        return quant_backend.prepare_qat(student, cfg.quant.bits, cfg.quant.per_channel, example, cfg.quant.backend,
                                         state.get("flow") or "fx")

    def load_artifact(self, path: Path, payload: dict[str, Any], data_overrides: dict[str, Any]) -> LoadedArtifact | None:
        if payload.get("format") not in ARTIFACT_FORMATS:
            return None
        model, meta = load_quantized(path, payload)
        if not meta.get("data"):
            raise CheckpointError(f"quantized student {path} does not record its data settings; cannot evaluate it")
        datamodule = datamodule_from(meta["data"], data_overrides)
        params = count_parameters(build_student(OmegaConf.create(meta["student"]), **meta["shape"]))
        return LoadedArtifact(model, datamodule, meta["student"]["name"], meta["data"]["name"], f"{meta['bits']}-bit quantized",
                              params, path.stat().st_size, cpu_only=True)

    def after_load(self, student: nn.Module, cfg: DictConfig) -> nn.Module:
        quant_backend.set_observers(student, False)  # evaluate with the trained scales; never re-calibrate on test data
        return student

    def hparams(self, cfg: DictConfig) -> dict[str, Any]:
        return {"bits": cfg.quant.bits}

    def tag(self, cfg: DictConfig, report: TechniqueReport | None) -> str:
        return f"int{cfg.quant.bits}"
