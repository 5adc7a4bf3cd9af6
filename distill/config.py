"""Structured-config schemas and the range checks that run before any data is loaded.

The dataclasses below are registered in Hydra's ConfigStore as ``train_schema``; ``conf/train.yaml``
lists it first in its defaults, so every YAML file in ``conf/`` is merged *into* these types. A
mistyped key (``loss.temprature=4``) or a wrong type (``data.batch_size=abc``) therefore fails at
compose time with Hydra's own message naming the key. What a type cannot express (temperature > 0,
0 <= alpha <= 1, ...) is checked by :func:`validate`, which raises :class:`ConfigError` naming the
key and the allowed range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and what is allowed."""


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"  # cosine | step | none
    step_size: int = 10  # step scheduler: epochs between decays
    gamma: float = 0.1  # step scheduler: decay factor
    warmup_epochs: int = 0


@dataclass
class TeacherConfig:
    name: str = MISSING  # resnet50 | resnet18
    pretrained: bool = False  # start from torchvision's ImageNet weights (needs network once)
    checkpoint: str | None = None  # a teacher state dict or cache entry; skips training
    epochs: int = 20
    batch_size: int = 64
    augment: bool | None = None  # random augmentation while the teacher trains; null: data.augment
    # Run the teacher once over the training split before the student trains and reuse its logits
    # every epoch. Only valid when the student's training data is not randomly augmented (the
    # teacher must see the same view as the student); null: on exactly then.
    precompute_outputs: bool | None = None
    outputs_dtype: str = "float32"  # how precomputed logits are stored on disk: float32 | float16
    outputs_topk: int | None = None  # store only the k largest logits per sample (null: all)
    # With data.augment=true: cache the teacher's logits for K seeded augmented views per sample
    # and replay exactly those views to the student (Shen & Xing 2022); null: live teacher.
    cache_views: int | None = None
    # The live teacher (augmented data): channels-last memory format, and optional torch.compile.
    channels_last: bool = True
    compile: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache_dir: str = MISSING


@dataclass
class StudentConfig:
    name: str = MISSING  # mlp | cnn | resnet18 | mobilenet_v3_small
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 128])  # mlp
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # cnn
    dropout: float = 0.1  # mlp, cnn
    init: str | None = None  # null: random | teacher: copy the teacher's tensors that match by name and shape


@dataclass
class DataConfig:
    name: str = MISSING  # digits | synthetic | cifar10 | cifar100 | imagefolder
    root: str | None = None  # dataset directory (cifar*, imagefolder)
    download: bool = False  # cifar*: fetch from the internet when missing
    verify_checksums: bool = True  # cifar*: torchvision's md5 check of the archive files
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool | None = None  # null: on when CUDA is available
    persistent_workers: bool = True  # only used when num_workers > 0
    val_fraction: float = 0.1  # taken from the training split, stratified
    test_fraction: float = 0.2  # digits / synthetic only (others ship a test split)
    split_seed: int = 0
    augment: bool = False  # random crop + flip (cifar*, imagefolder); 1-px shifts (digits)
    # Shape. Fixed by the dataset for digits/cifar; free for synthetic and imagefolder.
    num_classes: int | None = None
    channels: int | None = None
    image_size: int | None = None
    num_samples: int = 2048  # synthetic only
    mean: list[float] | None = None  # normalisation; null = the dataset's own statistics
    std: list[float] | None = None


@dataclass
class HintConfig:
    """FitNets hints (distill/hints.py): ``weight`` > 0 and ``layers`` of '<student path>:<teacher path>'."""

    weight: float = 0.0
    layers: list[str] = field(default_factory=list)


@dataclass
class LossConfig:
    name: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the KD term; 0 = plain cross-entropy (no teacher is built)
    hint: HintConfig = field(default_factory=HintConfig)
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (exit 3, no step taken) | skip (drop the batch, count it)


@dataclass
class QuantConfig:
    """Quantization-aware training of the student (``quant.bits=N``); see distill/qat.py."""

    bits: int | None = None  # null: off; 2..8
    backend: str = "x86"  # x86 (fbgemm/onednn) | qnnpack (ARM)
    per_channel: bool = True  # per-output-channel weight scales
    start_epoch: int = 0  # fp32 distillation before fake quantization begins
    freeze_observers_epoch: int | None = None  # from this epoch on, scales and zero points are fixed
    freeze_bn_epoch: int | None = None  # from this epoch on, BatchNorm statistics are fixed
    latency_batch_size: int = 1024  # the "large batch" of the latency measurement (besides batch 1)
    latency_threads: int | None = None  # torch threads while measuring latency; null: torch's default


@dataclass
class PruneConfig:
    """Pruning of the student (``prune.method=magnitude|structured``); see distill/pruning.py."""

    method: str = "none"  # none | magnitude (unstructured L1) | structured (channels/neurons, Ln)
    amount: float = 0.5  # final sparsity: fraction of weights (magnitude) or channels (structured)
    scope: str = "global"  # global (one threshold for all layers) | layer; structured: layer only
    schedule: str = "gradual"  # oneshot (at start_epoch) | gradual (Zhu & Gupta 2017)
    start_epoch: int = 0
    end_epoch: int = 10  # gradual: the final sparsity is reached here
    frequency: int = 1  # gradual: prune every `frequency` epochs (or steps, with interval=step)
    interval: str = "epoch"  # epoch | step
    layers: list[str] = field(default_factory=lambda: ["Linear", "Conv2d"])
    norm: float = 2.0  # structured: the Ln norm that ranks channels
    prune_classifier: bool = False  # magnitude: also prune the last Linear layer
    remove_channels: bool = True  # structured: physically remove the zeroed channels after training


@dataclass
class LowRankConfig:
    """Low-rank factorization of the student (``lowrank.rank_ratio`` or ``lowrank.energy``); see distill/lowrank.py."""

    rank_ratio: float | None = None
    energy: float | None = None
    start_epoch: int = 0
    min_rank: int = 8  # never factorize a layer below this rank
    classifier: bool = False  # also factorize the last Linear layer


@dataclass
class SharingConfig:
    """Weight sharing by k-means (``sharing.bits``); see distill/weight_sharing.py."""

    bits: int | None = None
    start_epoch: int = 20


@dataclass
class StrategyConfig:
    """How training is spread over devices (``strategy=ddp`` etc.); see distill/strategies.py."""

    name: str = "auto"  # auto | ddp | deepspeed
    stage: int = 2  # deepspeed: ZeRO stage 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer state in host memory
    offload_parameters: bool = False  # deepspeed stage 3: parameters in host memory


@dataclass
class ExportConfig:
    """Extra artifacts of the tested student."""

    dtype: str | None = None  # fp16 | bf16: also save a 16-bit student and report its accuracy and size


@dataclass
class CheckpointConfig:
    """Besides the best (by val/acc) and last checkpoints, which are always kept."""

    every_n_epochs: int | None = None  # also keep epochNNN.ckpt of every Nth epoch (null: none)


@dataclass
class ObjectiveConfig:
    """What ``train.py`` returns to a Hydra sweeper (Optuna maximizes it); see distill/objective.py."""

    metric: str = "test_acc"  # a student/* number of summary.json: test_acc, acc_quant, ...
    size_penalty: float = 0.0  # subtracted per MB of the student's smallest artifact


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: int = 30
    min_epochs: int | None = None
    fast_dev_run: Any = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    deterministic: Any = False
    enable_progress_bar: bool = True
    benchmark: bool | None = None


@dataclass
class CSVLoggerConfig:
    name: str = "csv"


@dataclass
class WandbConfig:
    project: str = "distill"
    entity: str | None = None
    mode: str = "auto"  # auto (online when logged in, else offline) | online | offline | disabled
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_model: bool = False


@dataclass
class LoggerConfig:
    csv: CSVLoggerConfig | None = field(default_factory=CSVLoggerConfig)
    wandb: WandbConfig | None = field(default_factory=WandbConfig)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class TrainConfig:
    teacher: TeacherConfig = MISSING
    student: StudentConfig = MISSING
    data: DataConfig = MISSING
    loss: LossConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)  # the student's optimizer
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    task_name: str = "train"
    ckpt_path: str | None = None  # resume the student's training from this Lightning checkpoint
    resume: str = "auto"  # auto: continue from this run directory's newest valid checkpoint | never
    # Extra Lightning callbacks, by name: each a node with a ``_target_`` (see conf/train.yaml).
    callbacks: dict[str, Any] = field(default_factory=dict)
    experiment: Any = None
    debug: Any = None
    hparams_search: Any = None
    technique: Any = None


@dataclass
class ComparisonWandbConfig:
    """``runs=``: also push the comparison to W&B (set ``wandb.project``)."""

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    mode: str = "auto"  # auto | online | offline


@dataclass
class EvaluateConfig:
    ckpt_path: str | None = None  # a training checkpoint or a student_quant.pt.xz artifact
    runs: Any = None  # or: run directories / a multirun directory to compare (a path or a list)
    out_dir: str | None = None  # where runs= writes comparison.{md,csv}; null: the first runs path
    data: Any = None  # overrides of the checkpoint's data settings, e.g. data.root
    wandb: ComparisonWandbConfig = field(default_factory=lambda: ComparisonWandbConfig())
    batch_size: int | None = None
    accelerator: str = "cpu"
    task_name: str = "evaluate"
    paths: PathsConfig = MISSING


def register_configs() -> None:
    """Register the schemas; call before ``@hydra.main`` composes (train.py/evaluate.py do)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)


# ---------------------------------------------------------------------------------------------
# Range checks

Check = tuple[str, Callable[[Any], bool], str]


def _is_positive(x: Any) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _in_unit(x: Any) -> bool:
    return x is not None and math.isfinite(x) and 0.0 <= x <= 1.0


def _at_least(n: int) -> Callable[[Any], bool]:
    return lambda x: x is not None and x >= n


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda x: x in choices


def _fraction_open(x: Any) -> bool:
    return x is not None and 0.0 < x < 1.0


_OPTIM_CHECKS: list[Check] = [
    ("name", _one_of("sgd", "adamw"), "one of: sgd, adamw"),
    ("lr", _is_positive, "a finite number > 0"),
    ("weight_decay", lambda x: x >= 0, ">= 0"),
    ("momentum", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("scheduler", _one_of("cosine", "step", "none"), "one of: cosine, step, none"),
    ("step_size", _at_least(1), ">= 1"),
    ("gamma", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("warmup_epochs", _at_least(0), ">= 0"),
]

_TRAIN_CHECKS: list[Check] = [
    ("loss.temperature", _is_positive, "a finite number > 0"),
    ("loss.alpha", _in_unit, "in [0, 1]"),
    ("loss.name", _one_of("kd"), "one of: kd"),
    ("loss.on_nonfinite", _one_of("stop", "skip"), "one of: stop, skip"),
    ("loss.hint.weight", lambda x: x >= 0 and x == x, ">= 0"),
    ("trainer.max_epochs", _at_least(0), ">= 0"),
    ("trainer.num_nodes", _at_least(1), ">= 1"),
    ("trainer.log_every_n_steps", _at_least(1), ">= 1"),
    ("trainer.accumulate_grad_batches", _at_least(1), ">= 1"),
    ("teacher.epochs", _at_least(0), ">= 0"),
    ("teacher.batch_size", _at_least(1), ">= 1"),
    ("teacher.outputs_dtype", _one_of("float32", "float16"), "one of: float32, float16"),
    ("teacher.outputs_topk", lambda x: x is None or x >= 1, ">= 1 (or null: all logits)"),
    ("teacher.cache_views", lambda x: x is None or x >= 1, ">= 1 (or null: live teacher with augmentation)"),
    ("data.batch_size", _at_least(1), ">= 1"),
    ("data.num_workers", _at_least(0), ">= 0"),
    ("data.val_fraction", _fraction_open, "in (0, 1)"),
    ("data.test_fraction", _fraction_open, "in (0, 1)"),
    ("data.num_samples", _at_least(1), ">= 1"),
    ("student.dropout", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("student.hidden_sizes", lambda xs: all(h >= 1 for h in xs), "a list of sizes >= 1"),
    ("student.channels", lambda xs: len(xs) >= 1 and all(c >= 1 for c in xs), "a non-empty list of channel counts >= 1"),
    ("data.num_classes", lambda x: x is None or x >= 2, ">= 2 (or null for the dataset's own)"),
    ("data.channels", lambda x: x is None or x >= 1, ">= 1 (or null)"),
    ("data.image_size", lambda x: x is None or x >= 1, ">= 1 (or null)"),
    ("logger.wandb.mode", lambda x: x in ("auto", "online", "offline", "disabled"), "one of: auto, online, offline, disabled"),
    ("quant.bits", lambda x: x is None or 2 <= x <= 8, "an integer in [2, 8], or null (off)"),
    ("quant.backend", _one_of("x86", "qnnpack"), "one of: x86, qnnpack"),
    ("quant.start_epoch", _at_least(0), ">= 0"),
    ("quant.freeze_observers_epoch", lambda x: x is None or x >= 0, ">= 0 (or null: never)"),
    ("quant.freeze_bn_epoch", lambda x: x is None or x >= 0, ">= 0 (or null: never)"),
    ("quant.latency_batch_size", _at_least(1), ">= 1"),
    ("quant.latency_threads", lambda x: x is None or x >= 1, ">= 1 (or null)"),
    ("strategy.name", _one_of("auto", "ddp", "deepspeed"), "one of: auto, ddp, deepspeed"),
    ("strategy.stage", _one_of(1, 2, 3), "one of: 1, 2, 3"),
    ("prune.method", _one_of("none", "magnitude", "structured"), "one of: none, magnitude, structured"),
    ("prune.amount", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("prune.scope", _one_of("global", "layer"), "one of: global, layer"),
    ("prune.schedule", _one_of("oneshot", "gradual"), "one of: oneshot, gradual"),
    ("prune.start_epoch", _at_least(0), ">= 0"),
    ("prune.end_epoch", _at_least(0), ">= 0"),
    ("prune.frequency", _at_least(1), ">= 1"),
    ("prune.interval", _one_of("epoch", "step"), "one of: epoch, step"),
    ("prune.layers", lambda xs: len(xs) >= 1 and all(x in ("Linear", "Conv2d") for x in xs), "a non-empty list of: Linear, Conv2d"),
    ("prune.norm", lambda x: x > 0, "> 0"),
    ("objective.size_penalty", lambda x: x >= 0, ">= 0"),
    ("resume", _one_of("auto", "never"), "one of: auto, never"),
    ("student.init", lambda x: x in (None, "teacher"), "null or teacher"),
    ("lowrank.rank_ratio", lambda x: x is None or 0 < x <= 1, "in (0, 1], or null"),
    ("lowrank.energy", lambda x: x is None or 0 < x <= 1, "in (0, 1], or null"),
    ("lowrank.start_epoch", _at_least(0), ">= 0"),
    ("lowrank.min_rank", _at_least(1), ">= 1"),
    ("sharing.bits", lambda x: x is None or 1 <= x <= 8, "an integer in [1, 8], or null (off)"),
    ("sharing.start_epoch", _at_least(0), ">= 0"),
    ("export.dtype", lambda x: x in (None, "fp16", "bf16"), "null, fp16 or bf16"),
    ("checkpoint.every_n_epochs", lambda x: x is None or x >= 1, ">= 1 (or null: keep only best and last)"),
] + [(f"optim.{k}", f, m) for k, f, m in _OPTIM_CHECKS] + [
    (f"teacher.optim.{k}", f, m) for k, f, m in _OPTIM_CHECKS
]


def _run_checks(cfg: DictConfig, checks: list[Check]) -> None:
    for key, ok, allowed in checks:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None and key.startswith("logger.wandb"):
            continue  # wandb switched off
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={value!r} is out of range: must be {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check every range and every name against its registry, before any data is touched."""
    from distill.data import DATASETS
    from distill.models import STUDENTS, TEACHERS

    _run_checks(cfg, _TRAIN_CHECKS)
    from distill.objective import check_objective

    check_objective(cfg)
    for key, registry, what in (
        ("student.name", STUDENTS, "student"),
        ("teacher.name", TEACHERS, "teacher"),
        ("data.name", DATASETS, "dataset"),
    ):
        name = OmegaConf.select(cfg, key)
        if name not in registry:
            raise ConfigError(f"{key}: unknown {what} {name!r}; choose from: {', '.join(sorted(registry))}")
    _check_callbacks(cfg)
    data = cfg.data
    if data.name in ("cifar10", "cifar100", "imagefolder") and not data.root:
        raise ConfigError(f"data.root must be set for data={data.name} (the dataset directory)")
    if cfg.teacher.checkpoint and cfg.loss.alpha != 0:
        from pathlib import Path

        if not Path(cfg.teacher.checkpoint).is_file():
            raise ConfigError(f"teacher.checkpoint: no such file: {cfg.teacher.checkpoint}")
    quant = cfg.get("quant")
    if quant is not None and quant.bits is not None:
        if quant.freeze_observers_epoch is not None and quant.freeze_observers_epoch <= quant.start_epoch:
            raise ConfigError(
                f"quant.freeze_observers_epoch={quant.freeze_observers_epoch} must be > quant.start_epoch="
                f"{quant.start_epoch}: the observers need at least one epoch to set the scales"
            )
        epochs = cfg.trainer.max_epochs
        if not cfg.trainer.get("fast_dev_run") and epochs is not None and quant.start_epoch >= epochs:
            raise ConfigError(
                f"quant.start_epoch={quant.start_epoch} must be < trainer.max_epochs={epochs}, "
                "or quantization-aware training never starts"
            )
    if cfg.export.dtype is not None and quant is not None and quant.bits is not None:
        raise ConfigError(f"export.dtype={cfg.export.dtype} with quant.bits={quant.bits}: the student is exported as "
                          "integers already; choose one")
    lr_cfg = cfg.lowrank
    if lr_cfg.rank_ratio is not None or lr_cfg.energy is not None:
        if lr_cfg.rank_ratio is not None and lr_cfg.energy is not None:
            raise ConfigError("lowrank.rank_ratio and lowrank.energy are both set: choose one")
        if cfg.prune.method != "none":
            raise ConfigError(f"lowrank with prune.method={cfg.prune.method}: combining them is not supported; choose one")
        if quant is not None and quant.bits is not None:
            raise ConfigError("lowrank with quant.bits: combining them is not supported (the quantized artifact stores the "
                              "unfactorized architecture); choose one")
        if cfg.loss.hint.weight > 0:
            raise ConfigError("lowrank with loss.hint: the factorization replaces the hooked layers; choose one")
        if lr_cfg.start_epoch > 0 and (cfg.strategy.name != "auto" or str(cfg.trainer.devices) not in ("1", "auto")):
            raise ConfigError("lowrank.start_epoch > 0 needs one process (it rebuilds the optimizer mid-run); use lowrank.start_epoch=0")
        epochs = cfg.trainer.max_epochs
        if not cfg.trainer.get("fast_dev_run") and epochs is not None and lr_cfg.start_epoch >= epochs:
            raise ConfigError(f"lowrank.start_epoch={lr_cfg.start_epoch} must be < trainer.max_epochs={epochs}")
    if cfg.strategy.name == "deepspeed" and cfg.strategy.stage == 3:
        compression = [k for k, on in (("quant.bits", quant is not None and quant.bits is not None),
                                       ("prune.method", cfg.prune.method != "none"),
                                       ("lowrank", cfg.lowrank.rank_ratio is not None or cfg.lowrank.energy is not None),
                                       ("sharing.bits", cfg.sharing.bits is not None)) if on]
        if compression:
            raise ConfigError(f"{compression[0]} with strategy=deepspeed_stage_3 is not supported: ZeRO-3 partitions every "
                              "weight across ranks; use deepspeed_stage_2 or ddp")
    if cfg.loss.on_nonfinite == "skip" and (cfg.strategy.name != "auto" or str(cfg.trainer.devices) not in ("1", "auto")):
        raise ConfigError("loss.on_nonfinite=skip needs one process: a rank that skips a step would leave the others "
                          "waiting for its gradients; use loss.on_nonfinite=stop")
    hint = cfg.loss.hint
    if hint.weight > 0:
        from distill.hints import parse_pairs

        try:
            parse_pairs(list(hint.layers))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if not hint.layers:
            raise ConfigError("loss.hint.weight > 0 needs loss.hint.layers=[<student module>:<teacher module>, ...]")
        if cfg.loss.alpha == 0:
            raise ConfigError("loss.hint.weight > 0 needs a teacher: loss.alpha must be > 0")
        if cfg.teacher.precompute_outputs or cfg.teacher.cache_views:
            raise ConfigError("loss.hint needs the live teacher (its features at every step): "
                              "unset teacher.precompute_outputs / teacher.cache_views")
        if quant is not None and quant.bits is not None:
            raise ConfigError("loss.hint with quant.bits is not supported (QAT rewrites the student's modules)")
    sh = cfg.sharing
    if sh.bits is not None:
        others = [k for k, on in (("quant.bits", quant is not None and quant.bits is not None), ("prune.method", cfg.prune.method != "none"),
                                  ("lowrank", lr_cfg.rank_ratio is not None or lr_cfg.energy is not None)) if on]
        if others:
            raise ConfigError(f"sharing.bits={sh.bits} with {', '.join(others)}: combining them is not supported; choose one")
        if cfg.strategy.name != "auto" or str(cfg.trainer.devices) not in ("1", "auto"):
            raise ConfigError("sharing.bits needs one process (the codebooks join the optimizer mid-run)")
        epochs = cfg.trainer.max_epochs
        if not cfg.trainer.get("fast_dev_run") and epochs is not None and sh.start_epoch >= epochs:
            raise ConfigError(f"sharing.start_epoch={sh.start_epoch} must be < trainer.max_epochs={epochs}, or the weights are never shared")
    pr = cfg.get("prune")
    if pr is not None and pr.method != "none":
        if pr.method == "structured" and pr.scope != "layer":
            raise ConfigError("prune.scope=global is not supported with prune.method=structured: use prune.scope=layer")
        if pr.schedule == "gradual" and pr.end_epoch < pr.start_epoch:
            raise ConfigError(f"prune.end_epoch={pr.end_epoch} must be >= prune.start_epoch={pr.start_epoch}")
        epochs = cfg.trainer.max_epochs
        last = pr.end_epoch if pr.schedule == "gradual" else pr.start_epoch
        if not cfg.trainer.get("fast_dev_run") and epochs is not None and last >= epochs:
            raise ConfigError(
                f"prune.{'end_epoch' if pr.schedule == 'gradual' else 'start_epoch'}={last} must be < "
                f"trainer.max_epochs={epochs}, or the target sparsity is never reached"
            )
    if cfg.teacher.cache_views is not None:
        if not data.augment:
            raise ConfigError("teacher.cache_views needs data.augment=true (without augmentation every run already reuses one view)")
        if cfg.teacher.precompute_outputs is False:
            raise ConfigError("teacher.cache_views conflicts with teacher.precompute_outputs=false")
    elif cfg.teacher.precompute_outputs and data.augment:
        raise ConfigError(
            "teacher.precompute_outputs=true needs data.augment=false: with random augmentation the "
            "teacher must see the same random view as the student, so it runs live (or set "
            "teacher.cache_views=K to cache K replayable views per sample)"
        )
    if cfg.ckpt_path:
        from pathlib import Path

        # A file, or a DeepSpeed checkpoint directory of shards.
        if not Path(cfg.ckpt_path).exists():
            raise ConfigError(f"ckpt_path: no such file or directory: {cfg.ckpt_path}")
        if Path(cfg.ckpt_path).is_file():  # readable, and a checkpoint: before any work is done
            from distill.checkpoint_io import load_checkpoint

            load_checkpoint(cfg.ckpt_path, what="ckpt_path")
    _check_devices(cfg.trainer)


def _check_callbacks(cfg: DictConfig) -> None:
    """Every ``callbacks.<name>`` names an importable class: a typo fails here, not after the teacher is trained."""
    from hydra._internal.utils import _locate

    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:  # callbacks.<name>=null switches a callback off
            continue
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if not target:
            raise ConfigError(f"callbacks.{name}: needs a _target_ (e.g. lightning.pytorch.callbacks.EarlyStopping)")
        try:
            _locate(target)
        except Exception as err:  # ImportError, or a _target_ that is not a dotted path
            raise ConfigError(f"callbacks.{name}._target_: cannot import {target!r} ({err})") from err


def _check_devices(trainer: DictConfig) -> None:
    """More devices than this machine has, or a GPU where there is none: fail now, naming the key."""
    import os

    import torch

    accelerator, devices = str(trainer.accelerator), trainer.devices
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU (use trainer.accelerator=cpu or auto)")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    available = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    wanted = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()) else None
    if wanted is not None and wanted > available:
        kind = "CUDA GPUs" if gpu else "CPU cores"
        raise ConfigError(f"trainer.devices={wanted} but this machine has {available} {kind}")
