"""One distillation run, top to bottom: check config -> data -> teacher -> student -> fit -> test -> report.

``train.py`` is a thin Hydra entry point around :func:`run`.
"""

from __future__ import annotations

import copy
import logging
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill import latency
from distill.checkpoint_io import AtomicCheckpointIO, find_resume_checkpoint
from distill.compression import build_compression
from distill.config import ConfigError, validate
from distill.data import BaseDataModule, build_datamodule
from distill.loggers import build_loggers
from distill.losses import KDLoss
from distill.models import build_student, count_parameters
from distill.module import DistillationModule
from distill.preemption import Preempted, Preemption
from distill.redaction import redacted_container
from distill.report import print_comparison, serialized_size_bytes, write_summary
from distill.rng_state import RNGState
from distill.strategies import build_strategy
from distill.teacher import TeacherInfo, provision_teacher
from distill.teacher_outputs import TeacherOutputCache, file_checksum, outputs_key

log = logging.getLogger(__name__)

# Trainer settings that change what a (debug) teacher learns, so they belong in its cache key.
_TEACHER_KEY_TRAINER = ("fast_dev_run", "limit_train_batches")


class EpochCheckpoint(ModelCheckpoint):
    """Keeps every Nth epoch's checkpoint (a class of its own: Lightning keys callback state by class)."""


def user_callbacks(cfg: DictConfig) -> list[Callback]:
    """The config's ``callbacks.<name>`` entries (checked by validate()), instantiated."""
    from hydra.utils import instantiate

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


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as Trainer keyword arguments; unset (null) settings keep Lightning's defaults."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {k: v for k, v in kwargs.items() if v is not None}


def _progress_callbacks(cfg: DictConfig) -> list[Callback]:
    return [RichProgressBar(leave=True)] if cfg.trainer.enable_progress_bar else []


def train_teacher(cfg: DictConfig, model: nn.Module, output_dir: Path) -> float:
    """Train ``model`` with plain cross-entropy on the run's data; return its test accuracy."""
    tcfg = cfg.teacher
    overrides: dict[str, Any] = {"batch_size": tcfg.batch_size}
    if tcfg.augment is not None:
        overrides["augment"] = tcfg.augment
    datamodule = build_datamodule(OmegaConf.merge(cfg.data, overrides))
    module = DistillationModule(model, None, KDLoss(temperature=1.0, alpha=0.0), tcfg.optim, datamodule.num_classes)
    kwargs = trainer_kwargs(cfg)
    # The teacher trains in this process on one device; distributed settings apply to the student.
    kwargs.update(
        max_epochs=tcfg.epochs, devices=1, num_nodes=1, enable_checkpointing=False,
        logger=CSVLogger(save_dir=str(output_dir), name="teacher", version=""),
        default_root_dir=str(output_dir / "teacher"), callbacks=_progress_callbacks(cfg),
    )
    L.seed_everything(int(cfg.seed), workers=True)
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, datamodule=datamodule)
    [result] = trainer.test(module, datamodule=datamodule, verbose=False)
    model.eval()
    return float(result["test/acc"])


def _teacher_outputs(cfg: DictConfig, teacher: nn.Module, info: TeacherInfo, datamodule: BaseDataModule) -> tuple[Any, str]:
    """The teacher's logits for the training split, from the on-disk cache or computed into it."""
    tcfg = cfg.teacher
    datamodule.setup("fit")
    if tcfg.outputs_topk is not None and tcfg.outputs_topk > datamodule.num_classes:
        raise ConfigError(f"teacher.outputs_topk={tcfg.outputs_topk} exceeds the {datamodule.num_classes} classes of data={cfg.data.name}")
    identity = info.key if info.key else file_checksum(info.path)
    fingerprint = datamodule.fingerprint()
    table_data: Any = datamodule.train_set
    if tcfg.cache_views:
        # K seeded views per sample; the student replays exactly those (distill/teacher_views.py).
        from distill.data import TransformedSubset
        from distill.teacher_views import ReplayedViews

        train = datamodule.train_set
        if not isinstance(train, TransformedSubset):
            raise ConfigError(f"teacher.cache_views: data={cfg.data.name} has no per-sample training transform to replay")
        replay = ReplayedViews(train.dataset, train.indices, train.transform, tcfg.cache_views, int(cfg.seed))
        datamodule.train_set = replay  # yields (x, y, row of its view)
        table_data = replay.all_views()
        fingerprint = {**fingerprint, "views": tcfg.cache_views, "view_seed": int(cfg.seed)}
    else:
        datamodule.index_train = True  # batches carry the sample index
    key = outputs_key(f"{info.arch}:{identity}", fingerprint, tcfg.outputs_dtype, tcfg.outputs_topk)
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    outputs, source = TeacherOutputCache(tcfg.cache_dir).get_or_build(
        key, teacher, table_data, datamodule.num_classes, dtype=tcfg.outputs_dtype,
        topk=tcfg.outputs_topk, device=device, meta={"teacher": info.arch, "teacher_identity": identity},
    )
    log.info("teacher: logits for %d training %s %s (%s)", len(outputs), "views" if tcfg.cache_views else "samples",
             "read from the cache" if source == "cache" else "computed and cached", TeacherOutputCache(tcfg.cache_dir).paths(key)["values"])
    # A table that fits comfortably in memory is kept dense on the device (no per-step copy);
    # a large one (ImageNet-scale) stays memory-mapped and each step reads only its rows.
    small = len(outputs) * datamodule.num_classes * 4 <= 256 * 2**20
    return (outputs.dense() if small else outputs), f"precomputed ({source})"


def _hint_loss(cfg: DictConfig, student: nn.Module, teacher: nn.Module | None, shape: dict[str, int]) -> nn.Module | None:
    if cfg.loss.hint.weight <= 0:
        return None
    from distill.hints import HintLoss, parse_pairs

    if teacher is None:
        raise ConfigError("loss.hint needs the live teacher, but its outputs were precomputed")
    hints = HintLoss(parse_pairs(list(cfg.loss.hint.layers)), cfg.loss.hint.weight)
    try:
        hints.attach(student, getattr(teacher, "_orig_mod", teacher),
                     torch.zeros(2, shape["channels"], shape["image_size"], shape["image_size"]))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return hints


def run(cfg: DictConfig) -> dict[str, Any]:
    """Distil a student as ``cfg`` says; write and return the run summary."""
    start = time.perf_counter()
    validate(cfg)  # every range and name, before any data is loaded
    extra_callbacks = user_callbacks(cfg)  # a wrong argument fails now, not after the teacher is trained
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)

    # Data first: it fixes the shape every model is built for.
    datamodule: BaseDataModule = build_datamodule(cfg.data)
    datamodule.prepare_and_check()  # a missing or empty dataset fails here, before any model work
    shape = datamodule.shape

    teacher: nn.Module | None = None
    teacher_info: TeacherInfo | None = None
    # alpha = 0 is the no-distillation baseline: no teacher at all, unless the student starts from it.
    if cfg.loss.alpha > 0 or cfg.student.init == "teacher":
        fingerprint = datamodule.fingerprint()
        fingerprint["trainer"] = {k: cfg.trainer.get(k) for k in _TEACHER_KEY_TRAINER}
        teacher, teacher_info = provision_teacher(cfg, shape, fingerprint, lambda m: train_teacher(cfg, m, output_dir))
    provisioned_teacher = teacher
    if cfg.loss.alpha == 0:
        teacher = None  # only provisioned to initialise the student from
    teacher_outputs = None
    outputs_source = None
    precompute = cfg.teacher.precompute_outputs
    views = cfg.teacher.cache_views
    hints = cfg.loss.hint.weight > 0  # hints need the teacher's features at every step: a live teacher
    if teacher is not None and (views or precompute or (precompute is None and not cfg.data.augment and not hints)):
        teacher_outputs, outputs_source = _teacher_outputs(cfg, teacher, teacher_info, datamodule)
    if teacher is not None and teacher_outputs is None and cfg.teacher.compile and not hints:
        teacher = torch.compile(teacher)  # the live teacher runs every step: compiling pays off
    teacher_seconds = time.perf_counter() - start

    L.seed_everything(int(cfg.seed), workers=True)
    student = build_student(cfg.student, **shape)
    init_report: dict[str, Any] = {}
    if cfg.student.init == "teacher":
        from distill.teacher_init import init_from_teacher

        init_report = init_from_teacher(student, provisioned_teacher, cfg.student.name, cfg.teacher.name)
    # The config as W&B, the checkpoints and the artifacts see it: no secret, no environment value.
    resolved = redacted_container(cfg)
    module = DistillationModule(
        student,
        # With precomputed outputs the module needs no teacher: it then is in no DDP bucket and no
        # DeepSpeed partition, and costs no device memory.
        teacher if teacher_outputs is None else None,
        KDLoss(cfg.loss.temperature, cfg.loss.alpha),
        cfg.optim,
        shape["num_classes"],
        # The teacher's file by name only: its directory may come from the environment (DISTILL_CACHE_DIR).
        hparams={"config": resolved, "shape": shape,
                 "teacher": {**teacher_info.as_dict(), "path": Path(teacher_info.path).name if teacher_info.path else None}
                 if teacher_info else None},
        teacher_outputs=teacher_outputs,
        teacher_channels_last=cfg.teacher.channels_last and teacher_outputs is None,
        skip_nonfinite=cfg.loss.on_nonfinite == "skip",
        hints=_hint_loss(cfg, student, teacher if teacher_outputs is None else None, shape),
    )

    checkpoint_cb = ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints"),
        filename="epoch{epoch:03d}-val_acc{val/acc:.4f}",
        auto_insert_metric_name=False,
        monitor="val/acc",
        mode="max",
    )
    # last.ckpt after every epoch, for resuming. (Lightning's save_last only refreshes it when a
    # new best is written, which leaves it epochs behind once validation accuracy plateaus.)
    last_cb = ModelCheckpoint(dirpath=str(output_dir / "checkpoints"), filename="last", monitor=None,
                              save_top_k=1, enable_version_counter=False)
    loggers = build_loggers(cfg, output_dir, resolved)
    preemption = Preemption(output_dir / "checkpoints" / "last.ckpt")
    callbacks: list[Callback] = [checkpoint_cb, last_cb, RNGState(), preemption, *_progress_callbacks(cfg)]
    if cfg.checkpoint.every_n_epochs:
        callbacks.append(EpochCheckpoint(
            dirpath=str(output_dir / "checkpoints"), filename="epoch{epoch:03d}", auto_insert_metric_name=False,
            monitor=None, save_top_k=-1, every_n_epochs=cfg.checkpoint.every_n_epochs,
        ))
    compression = build_compression(cfg, shape, output_dir, resolved)
    callbacks += compression.callbacks
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    callbacks += extra_callbacks
    deepspeed = cfg.strategy.name == "deepspeed"  # DeepSpeed writes its own shard directories
    trainer = L.Trainer(
        **trainer_kwargs(cfg), strategy=build_strategy(cfg.strategy, cfg.trainer.accelerator),
        default_root_dir=str(output_dir), logger=loggers or False, callbacks=callbacks,
        plugins=None if deepspeed else [AtomicCheckpointIO()],
        # The data module shards the training data itself (EpochShuffleSampler), resumable mid-epoch.
        use_distributed_sampler=False,
    )

    # Parameter count and fp32 size depend only on the architecture; taken before training because
    # DeepSpeed ZeRO-3 partitions the parameters across ranks (each rank then holds a slice).
    student_params, student_size = count_parameters(student), serialized_size_bytes(student)
    student_start = time.perf_counter()
    # Resume: an explicit ckpt_path, else (resume=auto) the newest valid checkpoint of this run
    # directory, left by an earlier attempt (a crash, a preemption, a SLURM requeue).
    ckpt_path = cfg.ckpt_path
    if ckpt_path is None and cfg.resume == "auto":
        found = find_resume_checkpoint(output_dir / "checkpoints", extra_dirs=[output_dir])
        if found is not None:
            log.info("resume: continuing from %s (resume=auto)", found)
            ckpt_path = str(found)
    compression.resume_from(ckpt_path)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as err:
        raise Preempted(preemption.signum or signal.SIGTERM, preemption.saved) from err
    # Test the best checkpoint by validation accuracy (the last weights in a debug run). With
    # compression, the last weights: an earlier "best" epoch may predate the final sparsity or
    # the start of quantization-aware training, and would not be the compressed model.
    compressing = compression.changes_weights
    # DeepSpeed 0.19 cannot restore a ZeRO-3 checkpoint without its optimizer (as trainer.test
    # would): test the final weights in memory instead, which are what last.ckpt holds.
    zero3 = cfg.strategy.name == "deepspeed" and cfg.strategy.stage == 3
    best = (last_cb.best_model_path if compressing or zero3 else checkpoint_cb.best_model_path) or None
    [result] = trainer.test(module, datamodule=datamodule, ckpt_path=None if zero3 else best, verbose=False)
    student_seconds = time.perf_counter() - student_start

    student_summary: dict[str, Any] = {
        "arch": cfg.student.name,
        "params": student_params,
        "test_acc": float(result["test/acc"]),
        "size_bytes": student_size,
        "best_checkpoint": best,  # the checkpoint that was tested (see above)
        "tested_checkpoint": "last" if compressing or zero3 else "best by val/acc",
        "train_seconds": student_seconds,
    }
    compression.update_summary(student_summary)
    student_summary.update(init_report)
    # Every run reports latency (CPU, batch 1 and quant.latency_batch_size) next to accuracy and
    # size: the student as trained, when no compression callback measured it, and the teacher.
    measure = trainer.is_global_zero and not cfg.trainer.get("fast_dev_run")
    sample_shape = (shape["channels"], shape["image_size"], shape["image_size"])
    threads = cfg.quant.latency_threads or torch.get_num_threads()
    trained = _trained_student_copy(cfg, module, shape, zero3) if not cfg.trainer.get("fast_dev_run") else None
    if measure and "latency_ms_fp32_batch" not in student_summary:
        lat = latency.measure(trained, sample_shape, cfg.quant.latency_batch_size, threads)
        student_summary.update(latency_ms=lat["latency_ms"], latency_ms_batch=lat["latency_ms_batch"],
                               latency_batch_size=cfg.quant.latency_batch_size, latency_threads=threads)
    teacher_summary = None
    if teacher_info:
        teacher_summary = {**teacher_info.as_dict(), "size_bytes": serialized_size_bytes(provisioned_teacher)}
        if measure:
            teacher_summary.update(_teacher_latency(provisioned_teacher, teacher_info, sample_shape, cfg.quant.latency_batch_size, threads))
    summary = {
        "teacher": teacher_summary,
        "student": student_summary,
        "data": {"name": cfg.data.name, **shape},
        "hparams": {
            "temperature": cfg.loss.temperature,
            "alpha": cfg.loss.alpha,
            "optimizer": cfg.optim.name,
            "lr": cfg.optim.lr,
            "max_epochs": cfg.trainer.max_epochs,
            "batch_size": cfg.data.batch_size,
            "seed": cfg.seed,
            "bits": cfg.quant.bits,
            "prune_method": cfg.prune.method,
            "prune_amount": cfg.prune.amount if cfg.prune.method != "none" else None,
            "lowrank": cfg.lowrank.rank_ratio if cfg.lowrank.rank_ratio is not None else cfg.lowrank.energy,
            "sharing_bits": cfg.sharing.bits,
            "hint_weight": cfg.loss.hint.weight or None,
            "student_init": cfg.student.init,
            "export_dtype": cfg.export.dtype,
        },
        "teacher_outputs": None if teacher is None else (outputs_source or "live"),
        "wall_time_s": time.perf_counter() - start,
        "teacher_time_s": teacher_seconds,
        "run_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        _log_final_metrics(trainer, summary, cfg)
        path = write_summary(output_dir / "summary.json", summary)
        print_comparison(summary)
        log.info("summary written to %s (wall time %.1fs)", path, summary["wall_time_s"])
    _finish_loggers(trainer)
    return summary


def _trained_student_copy(cfg: DictConfig, module: DistillationModule, shape: dict[str, int], zero3: bool) -> nn.Module:
    """A plain CPU copy of the trained student (pruning masks baked in). Under ZeRO-3 each rank holds
    a slice of every weight: all ranks gather them (a collective), and the copy is a fresh student
    loaded with the gathered state."""
    from distill.pruning import bake

    if not zero3:
        return bake(copy.deepcopy(module.student)).cpu().eval()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.student.parameters()), modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in module.student.state_dict().items()}
    fresh = build_student(cfg.student, **shape)
    fresh.load_state_dict(state)
    return fresh.eval()


def _teacher_latency(teacher: nn.Module, info: TeacherInfo, sample_shape: tuple[int, int, int], batch: int,
                     threads: int) -> dict[str, float]:
    """The teacher's CPU latency. A cached teacher's is measured once per (batch, threads) and kept
    next to it (``<teacher>.latency.json``): the teacher does not change between runs, and timing
    a large teacher at a large batch costs more than a warm run's training."""
    import json

    from distill.atomic import atomic_write_text

    store = Path(info.path).with_suffix(".latency.json") if info.path and info.source in ("cache", "trained") else None
    key = f"batch{batch}-threads{threads}"
    try:
        known = json.loads(store.read_text()) if store is not None and store.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        lat = latency.measure(teacher.cpu().eval(), sample_shape, batch, threads)
        known[key] = {"latency_ms": lat["latency_ms"], "latency_ms_batch": lat["latency_ms_batch"]}
        if store is not None:
            atomic_write_text(store, json.dumps(known, indent=1))
    return dict(known[key])


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The trade-off as flat ``teacher/*`` and ``student/*`` numbers, for loggers and dashboards."""
    out: dict[str, float] = {}
    for role in ("teacher", "student"):
        for key, value in (summary.get(role) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{role}/{key}"] = float(value)
            elif isinstance(value, dict):  # e.g. sparsity_per_layer -> student/sparsity_per_layer/<layer>
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out[f"{role}/{key}/{sub}"] = float(v)
    return out


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
    """The smallest deployable student as a W&B Artifact: the quantized file, else the tested checkpoint."""
    import wandb

    run_dir, student = Path(summary["run_dir"]), summary["student"]
    path = run_dir / "student_quant.pt.xz"
    if not path.is_file():
        path = Path(student["best_checkpoint"]) if student.get("best_checkpoint") else None
    if path is None or not path.is_file():
        log.warning("wandb: log_model is set but there is no student file to upload")
        return
    numbers = {k: v for k, v in student.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    artifact = wandb.Artifact(f"student-{logger.experiment.id}", type="model", metadata=numbers)
    artifact.add_file(str(path))
    logger.experiment.log_artifact(artifact)


def _finish_loggers(trainer: L.Trainer) -> None:
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
