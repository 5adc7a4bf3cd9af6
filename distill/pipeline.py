"""One distillation run, as named stages, top to bottom:

check config -> data -> teacher -> student -> fit -> test -> measure -> report.

``train.py`` is a thin Hydra entry point around :func:`run`. Each stage is a function below, in
the order :func:`run` calls them; what one stage hands the next is a typed record.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig
from torch import nn

from distill.checks import validate
from distill.compress.deploy import ExportedArtifact, export_artifacts
from distill.compress.prune.masks import bake
from distill.compress.registry import (
    Compression,
    build_compression,
    check_student,
    technique_hparams,
)
from distill.compress.technique import BuildContext, StudentFigures
from distill.config.redaction import redacted_container
from distill.data.datamodules import BaseDataModule, build_datamodule
from distill.data.mixing import mixing_of
from distill.distillation.features.combined import build_features
from distill.distillation.losses.registry import build_loss
from distill.distillation.module import DistillationModule
from distill.distillation.settings import (
    active_features,
    logits_use_teacher,
    loss_label,
    loss_weights,
    uses_teacher,
)
from distill.errors import ConfigError, Preempted
from distill.measure import latency
from distill.measure.accuracy import accuracy_on_test_split
from distill.measure.size import count_parameters, serialized_size_bytes
from distill.models.registry import build_student
from distill.report.summary import final_metrics, write_summary
from distill.report.table import print_comparison
from distill.runtime.atomic import atomic_write_text
from distill.runtime.checkpoint_io import (
    AtomicCheckpointIO,
    BackgroundCheckpointIO,
    find_resume_checkpoint,
)
from distill.runtime.console import quiet_third_party
from distill.runtime.cuda_probe import skip_nvml_check_without_nvml
from distill.runtime.loggers import build_loggers
from distill.runtime.preemption import Preemption
from distill.runtime.rng_state import RNGState
from distill.runtime.strategies import build_strategy
from distill.teacher.ensemble import ensemble_weights, member_configs
from distill.teacher.features import FeatureTablesTooLarge, teacher_features_for
from distill.teacher.outputs import (
    StackedRows,
    TableRows,
    table_rows,
    teacher_identity,
    teacher_outputs_for,
)
from distill.teacher.provision import TeacherInfo, provision_teacher, teacher_fingerprint
from distill.teacher.student_init import init_from_teacher
from distill.teacher.training import (
    progress_callbacks,
    teacher_trainer_kwargs,
    train_teacher,
    trainer_kwargs,
)

log = logging.getLogger(__name__)

class EpochCheckpoint(ModelCheckpoint):
    """Keeps every Nth epoch's checkpoint (a class of its own: Lightning keys callback state by class)."""


@dataclass
class Teacher:
    """What the teacher stage provides: the teacher the student learns from, if any."""

    provisioned: nn.Module | None = None  # the teacher as loaded, cached or trained
    info: TeacherInfo | None = None
    live: nn.Module | None = None  # the teacher run at every step (None: precomputed outputs, or no teacher)
    outputs: Any = None  # its precomputed logits (a tensor, or a memory-mapped table), read by the training loader
    outputs_source: str | None = None
    seconds: float = 0.0
    rows: TableRows | None = None  # what the cached tables' rows are (None: the teacher runs live)
    # Multi-teacher (teacher.ensemble): the further teachers, as provisioned, and their records.
    members: list[nn.Module] = field(default_factory=list)
    member_infos: list[TeacherInfo] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        """Whether the teacher's outputs (logits, features) are read from tables instead of computed live."""
        return self.rows is not None


@dataclass
class Fit:
    """The trained student and what trained it."""

    module: DistillationModule
    trainer: L.Trainer
    compression: Compression
    best: ModelCheckpoint
    last: ModelCheckpoint
    init_report: dict[str, Any] = field(default_factory=dict)
    params: int = 0
    size_bytes: int = 0
    started: float = 0.0


@dataclass
class Tested:
    test_acc: float
    checkpoint: str | None  # the checkpoint that was tested
    which: str  # "best by val/acc" | "last"
    seconds: float
    test_acc5: float | None = None  # top-5, where the data has more than 10 classes


def run(cfg: DictConfig) -> dict[str, Any]:
    """Distil a student as ``cfg`` says; write and return the run summary."""
    start = time.perf_counter()
    skip_nvml_check_without_nvml()  # no per-step NVML probe on a machine without an NVIDIA driver
    quiet_third_party()
    extra_callbacks = check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = load_data(cfg)
    check_student(cfg, datamodule.shape)  # e.g. prune.m against the student's layers: before the teacher trains
    stages, mark = {"setup": time.perf_counter() - start}, time.perf_counter()  # where the run's time goes (summary)

    def lap(name: str) -> None:
        nonlocal mark
        stages[name], mark = time.perf_counter() - mark, time.perf_counter()

    teacher = provide_teacher(cfg, datamodule, output_dir, start)
    lap("teacher")
    L.seed_everything(int(cfg.seed), workers=True)
    fit = fit_student(cfg, datamodule, teacher, output_dir, extra_callbacks)
    lap("fit")
    tested = evaluate_student(cfg, fit, datamodule)
    lap("test")
    artifacts = export_student(cfg, fit, datamodule, output_dir)
    lap("export")
    student = measure_student(cfg, fit, tested, datamodule.shape)
    summary = make_summary(cfg, fit, tested, student, teacher, datamodule, output_dir, start)
    summary["artifacts"] = [a.as_dict() for a in artifacts]
    lap("measure")
    summary["stage_seconds"] = stages
    log.info("time: %s", ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stages.items()))
    report(cfg, fit.trainer, fit.compression, summary)
    return summary


def check_config(cfg: DictConfig) -> list[Callback]:
    """Every range, name and combination, then the user's extra callbacks built: before any data is read."""
    validate(cfg)
    return user_callbacks(cfg)  # a wrong argument fails now, not after the teacher is trained


def load_data(cfg: DictConfig) -> BaseDataModule:
    """The data module, read now (it fixes every model's shape; a missing dataset fails before any model work)."""
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_and_check()
    return datamodule


def provide_teacher(cfg: DictConfig, datamodule: BaseDataModule, output_dir: Path, start: float) -> Teacher:
    """The teacher (loaded, cached or trained), the ensemble's further teachers, and, where the inputs
    allow, their precomputed logits."""
    # kd with alpha = 0 is the no-distillation baseline: no teacher at all, unless the student starts from it.
    if not uses_teacher(cfg.loss) and cfg.student.init != "teacher":
        return Teacher(seconds=time.perf_counter() - start)
    _, world = teacher_trainer_kwargs(cfg)  # the processes that train the teacher (the run's, by default)
    # The teacher trains on the full training split (data.train_fraction limits the student's data only).
    full_data = datamodule.fingerprint(subset=False)  # hashes the dataset's file list: once for every teacher
    fingerprint = teacher_fingerprint(cfg, full_data, world)

    def measure(model: nn.Module) -> float:  # a teacher used as it is: its test accuracy, measured once (cached)
        return accuracy_on_test_split(model, datamodule, device=_device(cfg))

    classes = datamodule.class_names
    model, info = provision_teacher(cfg, datamodule.shape, fingerprint, lambda m, epochs=None: train_teacher(cfg, m, output_dir, epochs),
                                    world, measure, classes)
    teacher = Teacher(provisioned=model, info=info, live=model if uses_teacher(cfg.loss) else None)
    members = member_configs(cfg)
    for index, member in enumerate(members):  # each provisioned and cached as the first is
        member_fingerprint = teacher_fingerprint(member, full_data, world)
        own_dir = output_dir / f"ensemble{index + 1}"
        m_model, m_info = provision_teacher(member, datamodule.shape, member_fingerprint,
                                            lambda m, epochs=None, c=member, d=own_dir: train_teacher(c, m, d, epochs), world,
                                            measure, classes)
        teacher.members.append(m_model)
        teacher.member_infos.append(m_info)
    precompute, features = cfg.teacher.precompute_outputs, bool(active_features(cfg.loss))
    mixing = mixing_of(cfg.data)
    if teacher.live is not None and mixing and not cfg.teacher.cache_views:
        log.info("%s: every batch is a new mix of two samples, so the teacher runs live on each (its outputs are "
                 "not cached; teacher.cache_views=K caches K mixed views per sample)",
                 " ".join(f"data.{name}={alpha:g}" for name, alpha in mixing.items()))
    fixed_inputs = precompute is None and not cfg.data.augment and not mixing
    if teacher.live is not None and (cfg.teacher.cache_views or precompute or fixed_inputs):
        # The teacher sees the same input for a sample in every epoch: its logits (and, once the
        # student is built, its features: fit_student) are tables, and the training step runs no teacher.
        teacher.rows = table_rows(cfg, datamodule)
        if logits_use_teacher(cfg.loss):
            tables = [teacher_outputs_for(cfg, model, info, datamodule, teacher.rows)]
            tables += [teacher_outputs_for(c, m, i, datamodule, teacher.rows)
                       for c, m, i in zip(members, teacher.members, teacher.member_infos, strict=True)]
            teacher.outputs = tables[0][0] if len(tables) == 1 else StackedRows([table for table, _ in tables])
            teacher.outputs_source = tables[0][1]
        teacher.live = None  # the module then holds no teacher: in no DDP bucket, no DeepSpeed partition
    elif teacher.live is not None and cfg.teacher.compile and not features:
        teacher.live = torch.compile(model)  # the live teacher runs every step: compiling pays off
    teacher.seconds = time.perf_counter() - start
    return teacher


def fit_student(cfg: DictConfig, datamodule: BaseDataModule, teacher: Teacher, output_dir: Path,
                extra_callbacks: list[Callback]) -> Fit:
    """Build the student and its Trainer, and train it (resuming when a checkpoint says so)."""
    shape = datamodule.shape
    student = build_student(cfg.student, **shape)
    init_report = init_from_teacher(student, teacher.provisioned, cfg.student.name, cfg.teacher.name) \
        if cfg.student.init == "teacher" else {}
    features = None
    if active_features(cfg.loss):
        datamodule.setup("fit")
        features = build_features(cfg, student, teacher.provisioned, shape, labels=datamodule.train_labels())
        datamodule.with_index = features.needs_index  # CRD: the batches carry their samples' indices
    columns = {} if teacher.outputs is None else {"logits": teacher.outputs}
    if features is not None and teacher.cached:
        assert teacher.rows is not None and teacher.info is not None
        try:
            feature_columns, source = teacher_features_for(cfg.teacher.cache_dir, features, teacher.provisioned,
                                                           teacher_identity(teacher.info), teacher.rows, cfg.teacher.outputs_dtype,
                                                           _device(cfg))
        except FeatureTablesTooLarge as err:
            if cfg.teacher.precompute_outputs:  # asked for: say why it cannot be
                raise
            log.warning("%s; the teacher runs live instead (teacher.precompute_outputs=null)", err)
            teacher.live, feature_columns, source = teacher.provisioned, {}, "live"
        columns.update(feature_columns)
        if teacher.outputs_source is None:
            teacher.outputs_source = "live" if source == "live" else f"precomputed ({source})"
    # The batches carry the teacher's rows: its logits alone as a tensor, or every column by name.
    datamodule.teacher_table = columns.get("logits") if set(columns) <= {"logits"} else columns
    resolved = redacted_container(cfg)  # the config as W&B, checkpoints and artifacts see it: no secret
    info = teacher.info
    loss = build_loss(cfg.loss)
    loss.teacher_weights = ensemble_weights(cfg)
    module = DistillationModule(
        student, teacher.live, loss, cfg.optim, shape["num_classes"],
        # The teacher's file by name only: its directory may come from the environment (DISTILL_CACHE_DIR).
        hparams={"config": resolved, "shape": shape,
                 "teacher": {**info.as_dict(), "path": Path(info.path).name if info.path else None} if info else None},
        teacher_channels_last=cfg.teacher.channels_last and teacher.live is not None,
        skip_nonfinite=cfg.loss.on_nonfinite == "skip", features=features,
        ensemble=teacher.members if teacher.live is not None else None,
    )
    ctx = BuildContext(shape, output_dir, resolved["student"], resolved["data"], _latency_batch(cfg, shape), cfg.quant.latency_threads,
                       _latency_device(cfg))
    fit = _trainer(cfg, module, build_compression(cfg, ctx), output_dir, build_loggers(cfg, output_dir, resolved, loss_label(cfg.loss), uses_teacher(cfg.loss)), extra_callbacks)
    fit.init_report = init_report
    # Parameter count and fp32 size depend only on the architecture; taken before training because
    # DeepSpeed ZeRO-3 partitions the parameters across ranks (each rank then holds a slice).
    fit.params, fit.size_bytes, fit.started = count_parameters(student), serialized_size_bytes(student), time.perf_counter()
    ckpt_path = resume_checkpoint(cfg, output_dir)
    fit.compression.resume_from(ckpt_path)
    try:
        fit.trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as err:
        preemption = next(c for c in fit.trainer.callbacks if isinstance(c, Preemption))
        raise Preempted(preemption.signum or signal.SIGTERM, preemption.saved) from err
    return fit


def _trainer(cfg: DictConfig, module: DistillationModule, compression: Compression, output_dir: Path,
             loggers: list[Any], extra_callbacks: list[Callback]) -> Fit:
    """The Trainer: checkpoints (best, last, every Nth), resume state, preemption, compression, loggers."""
    ckpt_dir = str(output_dir / "checkpoints")
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:03d}-val_acc{val/acc:.4f}", auto_insert_metric_name=False,
                           monitor="val/acc", mode="max")
    # last.ckpt after every epoch, for resuming. (Lightning's save_last only refreshes it when a
    # new best is written, which leaves it epochs behind once validation accuracy plateaus.)
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    callbacks: list[Callback] = [best, last, RNGState(), Preemption(output_dir / "checkpoints" / "last.ckpt"), *progress_callbacks(cfg)]
    if cfg.checkpoint.every_n_epochs:
        callbacks.append(EpochCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:03d}", auto_insert_metric_name=False, monitor=None,
                                         save_top_k=-1, every_n_epochs=cfg.checkpoint.every_n_epochs))
    callbacks += compression.callbacks
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    deepspeed = cfg.strategy.name == "deepspeed"  # DeepSpeed writes its own shard directories
    trainer = L.Trainer(
        **trainer_kwargs(cfg), strategy=build_strategy(cfg.strategy, cfg.trainer.accelerator),
        default_root_dir=str(output_dir), logger=loggers or False, callbacks=callbacks + extra_callbacks,
        plugins=None if deepspeed else [checkpoint_writer(cfg)],
        # The data module shards the training data itself (EpochShuffleSampler), resumable mid-epoch.
        use_distributed_sampler=False,
    )
    return Fit(module, trainer, compression, best, last)


def checkpoint_writer(cfg: DictConfig) -> AtomicCheckpointIO | BackgroundCheckpointIO:
    """Atomic checkpoint writes, in a background thread when ``checkpoint.background`` (null: on GPU runs).
    On CPU the writer thread takes a core from the training threads: measured on the 2-core machine,
    background writes made a 32-px CNN's fit 12 % slower than writing in the loop (bench/throughput.py)."""
    background = cfg.checkpoint.get("background")
    if background is None:
        background = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
    return BackgroundCheckpointIO() if background else AtomicCheckpointIO()


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """``ckpt_path``, else (``resume=auto``) the newest valid checkpoint an earlier attempt left here."""
    # (an earlier attempt: a crash, a preemption, a SLURM requeue)
    if cfg.ckpt_path is not None or cfg.resume != "auto":
        return cfg.ckpt_path
    found = find_resume_checkpoint(output_dir / "checkpoints", extra_dirs=[output_dir])
    if found is not None:
        log.info("resume: continuing from %s (resume=auto)", found)
    return str(found) if found is not None else None


def _zero3(cfg: DictConfig) -> bool:
    return cfg.strategy.name == "deepspeed" and cfg.strategy.stage == 3


def evaluate_student(cfg: DictConfig, fit: Fit, datamodule: BaseDataModule) -> Tested:
    """Test the best checkpoint by validation accuracy, or the last weights when compressing or under ZeRO-3."""
    # Compressing: an earlier "best" epoch may predate the final sparsity or the start of QAT, and
    # would not be the compressed model. ZeRO-3: DeepSpeed 0.19 cannot restore a ZeRO-3 checkpoint
    # without its optimizer, as trainer.test would; the final weights in memory are what last.ckpt holds.
    use_last = fit.compression.changes_weights or _zero3(cfg)
    best = (fit.last.best_model_path if use_last else fit.best.best_model_path) or None
    [result] = fit.trainer.test(fit.module, datamodule=datamodule, ckpt_path=None if _zero3(cfg) else best, verbose=False)
    return Tested(float(result["test/acc"]), best, "last" if use_last else "best by val/acc", time.perf_counter() - fit.started,
                  float(result["test/acc5"]) if "test/acc5" in result else None)


def measure_student(cfg: DictConfig, fit: Fit, tested: Tested, shape: dict[str, int]) -> StudentFigures:
    """The student's figures: size, accuracy and CPU latency (timed here unless a technique timed it)."""
    measured = fit.compression.fp32_latency()  # reports exist on rank 0 only
    device = _latency_device(cfg)
    if measured is not None and measured.device != device:  # e.g. QAT times on CPU; this run times on its GPU
        measured = None
    timed_here = measured is None and device is not None and fit.trainer.is_global_zero and not cfg.trainer.get("fast_dev_run")
    # Under ZeRO-3 the copy gathers the partitioned weights, a collective every rank takes part in.
    if timed_here or (_zero3(cfg) and not cfg.trainer.get("fast_dev_run")):
        trained = _trained_student_copy(cfg, fit.module, shape)
        if timed_here:
            measured = latency.measure_many({"student": trained}, _sample_shape(shape), _latency_batch(cfg, shape),
                                            _threads(cfg), rounds=1, device=device)["student"]
    return StudentFigures(cfg.student.name, fit.params, fit.size_bytes, tested.test_acc, tested.checkpoint, measured)


def export_student(cfg: DictConfig, fit: Fit, datamodule: BaseDataModule, output_dir: Path) -> list[ExportedArtifact]:
    """``export.formats``: the deployed fp32 student (channels removed when structured pruning removed
    them) as ONNX and ``torch.export`` files, each loaded back and measured on the test split, on rank 0."""
    formats = list(cfg.export.formats or [])
    if not formats:
        return []
    # The trained student; under ZeRO-3 the copy is a collective every rank takes part in.
    # (not for a QAT run: its fp32 files are of the folded weights its callback made)
    copy_trained = cfg.quant.bits is None and (_zero3(cfg) or fit.trainer.is_global_zero)
    trained = _trained_student_copy(cfg, fit.module, datamodule.shape) if copy_trained else None
    if not fit.trainer.is_global_zero:
        return []
    # A technique's own fp32 model when it made one (the channel-removed student; QAT's weights
    # conv-BN folded), else the trained student; QAT's integer model besides (student_int8.onnx).
    shrunk, quantized = fit.compression.deployable_fp32(), fit.compression.deployable_quantized()
    if cfg.quant.bits is not None and (quantized is None or quantized.fp32 is None):
        # The prepared student holds fake quantizers: an fp32 file of it would be neither the model
        # trained nor the one deployed.
        why = "no quantized student was made" if quantized is None else quantized.error or "no QDQ form"
        if cfg.export.strict:
            raise RuntimeError(f"export.strict=true: export.formats={formats} not written: {why}")
        log.warning("export.formats=%s: not written (%s); the TorchScript int8 artifact is", formats, why)
        return [ExportedArtifact(f, None, "-", error=why) for f in formats]
    model = shrunk if shrunk is not None else trained
    datamodule.setup("test")
    resolved = redacted_container(cfg)  # carried by each file: evaluate.py ckpt_path=student.onnx rebuilds the data from it
    return export_artifacts(model, formats, output_dir, datamodule.test_dataloader(shard=False), _sample_shape(datamodule.shape),
                            _latency_batch(cfg, datamodule.shape), _threads(cfg), float(cfg.export.max_acc_drop),
                            fp16=cfg.export.dtype == "fp16", device=_latency_device(cfg), strict=bool(cfg.export.strict),
                            meta={"student": resolved["student"], "data": resolved["data"], "format": "distill-export-1"},
                            quantized=quantized, eval_samples=cfg.export.eval_samples,
                            align_int8_channels=bool(cfg.export.align_int8_channels), int32_biases=bool(cfg.export.int32_biases))


def _device(cfg: DictConfig) -> str:
    """Where this process runs the teacher outside training (its feature tables, its accuracy): its own
    GPU under a multi-GPU launch (LOCAL_RANK), not every rank on cuda:0."""
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def _sample_shape(shape: dict[str, int]) -> tuple[int, int, int]:
    return (shape["channels"], shape["image_size"], shape["image_size"])


def _threads(cfg: DictConfig) -> int:
    return cfg.quant.latency_threads or torch.get_num_threads()


def _latency_device(cfg: DictConfig) -> str | None:
    """Where latency is timed (``measure.latency``): cpu, cuda, or None (off)."""
    return latency.resolve_device(cfg.measure.latency, str(cfg.trainer.accelerator))


def _latency_batch(cfg: DictConfig, shape: dict[str, int]) -> int:
    """``quant.latency_batch_size``, or one sized for the input resolution when it is null."""
    return cfg.quant.latency_batch_size or latency.auto_batch_size(shape["image_size"])


def _trained_student_copy(cfg: DictConfig, module: DistillationModule, shape: dict[str, int]) -> nn.Module:
    """A plain CPU copy of the trained student (pruning masks baked in). Under ZeRO-3 each rank holds
    a slice of every weight: all ranks gather them (a collective), and the copy is a fresh student
    loaded with the gathered state."""
    if not _zero3(cfg):
        return bake(copy.deepcopy(module.student)).cpu().eval()
    import deepspeed  # deferred: heavy, and only ZeRO-3 runs need it

    with deepspeed.zero.GatheredParameters(list(module.student.parameters()), modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in module.student.state_dict().items()}
    fresh = build_student(cfg.student, **shape)
    fresh.load_state_dict(state)
    return fresh.eval()


def make_summary(cfg: DictConfig, fit: Fit, tested: Tested, student: StudentFigures, teacher: Teacher,
                 datamodule: BaseDataModule, output_dir: Path, start: float) -> dict[str, Any]:
    """``summary.json``: teacher, student, every technique's report, the deployed model, settings and timings."""
    measure, shape = fit.trainer.is_global_zero and not cfg.trainer.get("fast_dev_run"), datamodule.shape
    student_summary: dict[str, Any] = {
        "arch": cfg.student.name, "params": fit.params, "test_acc": tested.test_acc, "size_bytes": fit.size_bytes,
        "best_checkpoint": tested.checkpoint, "tested_checkpoint": tested.which, "train_seconds": tested.seconds,
        **({"test_acc5": tested.test_acc5} if tested.test_acc5 is not None else {}),
        **fit.compression.summary(), **fit.init_report,
    }
    student_summary["size_bytes"] = fit.compression.fp32_size_bytes() or fit.size_bytes
    if measure and student.latency is not None and student.latency.device is not None:  # as configured (uncompressed)
        student_summary.update(latency_ms=student.latency.ms, latency_ms_batch=student.latency.ms_batch,
                               latency_batch_size=_latency_batch(cfg, shape), latency_threads=_threads(cfg),
                               latency_device=student.latency.device)
    teacher_summary = None
    if teacher.info:
        teacher_summary = {**teacher.info.as_dict(), "size_bytes": serialized_size_bytes(teacher.provisioned)}
        if measure and _latency_device(cfg) is not None:
            teacher_summary.update(_teacher_latency(teacher.provisioned, teacher.info, _sample_shape(shape),
                                                    _latency_batch(cfg, shape), _threads(cfg), _latency_device(cfg)))
        if teacher.member_infos:  # multi-teacher: the further teachers, and the mixture's weights
            teacher_summary["ensemble"] = [{**i.as_dict(), "path": Path(i.path).name if i.path else None} for i in teacher.member_infos]
            teacher_summary["ensemble_weights"] = ensemble_weights(cfg)
    return {
        "teacher": teacher_summary,
        "student": student_summary,
        "deployed": fit.compression.deployed(student).as_dict(),
        "technique": "+".join(_labels(cfg, fit)) or "fp32",
        # test_split only where the test accuracy is not from a test split (an image folder without test/)
        "data": {"name": cfg.data.name, **shape, **({"test_split": datamodule.test_split} if datamodule.test_split != "test" else {}),
                 **({"mix": mixing_of(cfg.data)} if mixing_of(cfg.data) else {})},
        "hparams": _hparams(cfg),
        "teacher_outputs": None if teacher.info is None or not uses_teacher(cfg.loss) else (teacher.outputs_source or "live"),
        # each feature term's weight and resolved layer pairs (the defaults made explicit)
        "features": fit.module.features.describe() if fit.module.features is not None else None,
        "wall_time_s": time.perf_counter() - start,
        "teacher_time_s": teacher.seconds,
        "run_dir": str(output_dir),
    }


def _labels(cfg: DictConfig, fit: Fit) -> list[str]:
    """The run's technique label, e.g. ``init:teacher+hints+prune0.7+int8``."""
    extra = ([f"init:{cfg.student.init}"] if cfg.student.init else []) + (["hints"] if cfg.loss.hint.weight else [])
    extra += [name for name in active_features(cfg.loss) if name != "hint"]
    return extra + fit.compression.label(cfg)


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    return {
        "loss": cfg.loss.name, **loss_weights(cfg.loss),
        "temperature": cfg.loss.temperature, "alpha": cfg.loss.alpha, "optimizer": cfg.optim.name, "lr": cfg.optim.lr,
        "max_epochs": cfg.trainer.max_epochs, "batch_size": cfg.data.batch_size, "seed": cfg.seed,
        "hint_weight": cfg.loss.hint.weight or None, "student_init": cfg.student.init, **technique_hparams(cfg),
        **({"ensemble": [str(m.teacher.name) for m in member_configs(cfg)], "ensemble_weights": ensemble_weights(cfg)}
           if cfg.teacher.ensemble else {}),
    }


def _teacher_latency(teacher: nn.Module, info: TeacherInfo, sample_shape: tuple[int, int, int], batch: int,
                     threads: int, device: str) -> dict[str, Any]:
    """The teacher's latency on ``device``. A cached teacher's is measured once per (device, host,
    batch, threads) and kept next to it (``<teacher>.latency.json``): the teacher does not change
    between runs, and timing a large teacher at a large batch costs more than a warm run's training.
    The key names the machine (host name; the GPU's model on CUDA), so a cache directory shared by a
    cluster never hands one machine's figure to another."""
    store = Path(info.path).with_suffix(".latency.json") if info.path and info.source in ("cache", "trained", "fine-tuned") else None
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    key = f"{device}:{where}@{socket.gethostname()}-batch{batch}-threads{threads}"
    try:
        known = json.loads(store.read_text()) if store is not None and store.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        lat = latency.measure_many({"teacher": teacher.eval()}, sample_shape, batch, threads, rounds=1, device=device)["teacher"]
        known[key] = {"latency_ms": lat.ms, "latency_ms_batch": lat.ms_batch}
        if store is not None:
            atomic_write_text(store, json.dumps(known, indent=1))
    return {**known[key], "latency_device": device}


def report(cfg: DictConfig, trainer: L.Trainer, compression: Compression, summary: dict[str, Any]) -> None:
    """On rank 0: the final metrics to every logger, summary.json, the printed table; then close the loggers."""
    if trainer.is_global_zero:
        _log_final_metrics(trainer, summary, cfg)
        path = write_summary(Path(summary["run_dir"]) / "summary.json", summary)
        print_comparison(summary, notes=compression.describe())
        log.info("summary written to %s (wall time %.1fs)", path, summary["wall_time_s"])
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def _log_final_metrics(trainer: L.Trainer, summary: dict[str, Any], cfg: DictConfig) -> None:
    metrics = final_metrics(summary)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        if isinstance(logger, WandbLogger):
            # Summary metrics and a one-row table drive the dashboard's scatter and
            # parallel-coordinates panels across the runs of a sweep.
            logger.experiment.summary.update(metrics)
            row = {**{f"hparams/{k}": v for k, v in summary["hparams"].items() if v is not None}, **metrics}
            columns = sorted(row)
            logger.log_table(key="trade_off", columns=columns, data=[[row[c] for c in columns]])
            if cfg.logger.wandb.log_model:
                _upload_model(logger, summary)
        logger.save()


def _upload_model(logger: WandbLogger, summary: dict[str, Any]) -> None:
    """The deployed student as a W&B Artifact: its file (the quantized, sparse, 16-bit or shared one), else the tested checkpoint."""
    import wandb  # deferred: only runs that upload the model need it

    deployed, student = summary["deployed"], summary["student"]
    path = Path(deployed["path"]) if deployed.get("path") else None
    if path is None or not path.is_file():
        path = Path(student["best_checkpoint"]) if student.get("best_checkpoint") else None
    if path is None or not path.is_file():
        log.warning("wandb: log_model is set but there is no student file to upload")
        return
    numbers = {k: v for k, v in student.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    artifact = wandb.Artifact(f"student-{logger.experiment.id}", type="model", metadata=numbers)
    artifact.add_file(str(path))
    logger.experiment.log_artifact(artifact)


def user_callbacks(cfg: DictConfig) -> list[Callback]:
    """The config's ``callbacks.<name>`` entries (checked by validate()), instantiated."""
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        try:
            callback = instantiate(node)
        except Exception as err:  # a wrong or missing argument: Hydra's message names it
            raise ConfigError(f"callbacks.{name}: {err}") from err
        if not isinstance(callback, Callback):
            raise ConfigError(f"callbacks.{name}: {node._target_} is not a Lightning Callback")
        built.append(callback)
    return built
