"""Structured-config schemas: every key of `conf/` and its type.

The dataclasses below are registered in Hydra's ConfigStore as ``train_schema``; ``conf/train.yaml``
lists it first in its defaults, so every YAML file in ``conf/`` is merged *into* these types. A
mistyped key (``loss.temprature=4``) or a wrong type (``data.batch_size=abc``) therefore fails at
compose time with Hydra's own message naming the key. What a type cannot express (temperature > 0,
0 <= alpha <= 1, ...) is checked by :func:`distill.checks.validate`, which raises :class:`ConfigError` naming the
key and the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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
    # Trainer settings for the teacher's own training and logit table, over the run's trainer.*
    # (e.g. +teacher.trainer.devices=1 keeps the teacher on one device in a multi-GPU run).
    trainer: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = MISSING
    # Multi-teacher: further teachers beside this one, each a teacher name (``[resnet18]``) or a node
    # of teacher settings over this one's (``[{name: resnet18, checkpoint: t.pt}]``); each is
    # provisioned and cached as this one is. The loss then learns from the weighted mixture of the
    # teachers' softened distributions.
    ensemble: list[Any] = field(default_factory=list)
    ensemble_weights: list[float] | None = None  # one per teacher, this one first (null: equal)
    # Models people bring (teacher=torchvision|timm|hf|custom; distill/models/sources.py):
    arch: str | None = None  # torchvision: a name of torchvision.models.list_models(); timm: a timm model name (with its tag)
    weights: str | None = None  # torchvision: null (random) | DEFAULT | an enum name (IMAGENET1K_V2)
    weights_file: str | None = None  # timm: pretrained weights from this local file instead of the hub
    repo: str | None = None  # hf: a hub id or a directory saved with save_pretrained
    _target_: str | None = None  # custom: your nn.Module class, as a dotted path
    kwargs: dict[str, Any] = field(default_factory=dict)  # custom: its keyword arguments
    resize: int | None = None  # the teacher sees the data resized to this many px (the student sees it as it is)
    checkpoint_key: str | None = None  # teacher.checkpoint: the state dict under this key (state_dict, model, ...)
    checkpoint_prefix: str | None = None  # teacher.checkpoint: strip this prefix from its keys (module.)
    # A loaded teacher (pretrained, hf, a checkpoint) that predicts the data's classes is used as it is (0);
    # N: fine-tune it N epochs first, its classifier only (head) or every layer (all).
    finetune_epochs: int = 0
    finetune: str = "head"


@dataclass
class StudentConfig:
    name: str = MISSING  # mlp | cnn | resnet18 | mobilenet_v3_small
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 128])  # mlp
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # cnn
    dropout: float = 0.1  # mlp, cnn
    init: str | None = None  # null: random | teacher: copy the teacher's tensors that match by name and shape
    # Models people bring (student=torchvision|timm|hf|custom): as for the teacher (TeacherConfig).
    arch: str | None = None
    weights: str | None = None
    pretrained: bool = False
    weights_file: str | None = None
    repo: str | None = None
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    resize: int | None = None


@dataclass
class DataConfig:
    name: str = MISSING  # digits | synthetic | cifar10 | cifar100 | imagefolder
    root: str | None = None  # dataset directory (cifar*, imagefolder); hf: a hub id or a directory written by save_to_disk
    image_key: str = "image"  # hf: the column of the images
    label_key: str = "label"  # hf: the column of the class labels
    transform: str = "standard"  # imagenet: standard (RandomResizedCrop, flip / resize, center crop) | model (a timm teacher's own)
    model_arch: str | None = None  # data.transform=model: the timm model whose data config is used (conf/data/imagenet.yaml: the teacher's)
    download: bool = False  # cifar*: fetch from the internet when missing
    verify_checksums: bool = True  # cifar*: torchvision's md5 check of the archive files
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool | None = None  # null: on when CUDA is available
    persistent_workers: bool = True  # only used when num_workers > 0
    val_fraction: float = 0.1  # taken from the training split, stratified
    # The student trains on a seeded stratified subset of the training split (data-limited runs); the
    # teacher on all of it, and its logit table covers the subset.
    train_fraction: float = 1.0
    test_fraction: float = 0.2  # digits / synthetic only (others ship a test split)
    split_seed: int = 0
    augment: bool = False  # random crop + flip (cifar*, imagefolder); 1-px shifts (digits)
    # Batch mixing of the training data, teacher's and student's (torchvision v2 MixUp / CutMix; both set:
    # one of the two per batch): the Beta(alpha, alpha) parameter, 0 = off. Labels become soft; the
    # teacher then runs live unless teacher.cache_views caches K mixed views per sample.
    mixup: float = 0.0
    cutmix: float = 0.0
    # Shape. Fixed by the dataset for digits/cifar; free for synthetic and imagefolder.
    num_classes: int | None = None
    channels: int | None = None
    image_size: int | None = None
    num_samples: int = 2048  # synthetic only
    mean: list[float] | None = None  # normalisation; null = the dataset's own statistics
    std: list[float] | None = None


@dataclass
class HintConfig:
    """FitNets hints (distill/distillation/features/fitnets.py): ``weight`` > 0 and ``layers`` of '<student path>:<teacher path>'."""

    weight: float = 0.0
    layers: list[str] = field(default_factory=list)


@dataclass
class FeatureTermConfig:
    """A feature or relation term (distill/distillation/features/): ``weight`` > 0 switches it on;
    ``layers`` '<student module>:<teacher module>' pairs, [] = the term's default for the pair."""

    weight: float = 0.0
    layers: list[str] = field(default_factory=list)


@dataclass
class AttentionConfig(FeatureTermConfig):
    p: float = 2.0  # the attention map is mean_c |f_c|^p


@dataclass
class CRDConfig(FeatureTermConfig):
    feat_dim: int = 128  # the embedding heads' width (Tian et al.'s defaults)
    nce_k: int = 16384  # negatives per sample, drawn from the other classes
    nce_t: float = 0.07  # the temperature of the critic
    momentum: float = 0.5  # of the memory banks' update


@dataclass
class RKDConfig(FeatureTermConfig):
    distance_weight: float = 25.0  # Park et al.'s lambda_D
    angle_weight: float = 50.0  # lambda_A


@dataclass
class LossConfig:
    """The logit loss ``name`` and the feature terms added to it. alpha, beta and gamma are named as
    each method's paper names them (see conf/loss/<name>.yaml and the loss's docstring)."""

    name: str = "kd"  # kd | dkd | dist | nkd
    temperature: float = 4.0
    alpha: float = 0.9  # kd: weight of the KD term, 0 = plain cross-entropy; dkd: TCKD weight; nkd: NKD weight
    beta: float = 8.0  # dkd: NCKD weight; dist: inter-class relation weight
    gamma: float = 1.5  # dist: intra-class relation weight; nkd: non-target term weight
    ce_weight: float = 1.0  # dkd, dist, nkd: weight of the cross-entropy with the labels
    warmup_epochs: int = 20  # dkd: the distillation weight ramps up linearly over these epochs
    divergence: str = "forward_kl"  # kd: forward_kl | reverse_kl | jsd | tv
    jsd_beta: float = 0.5  # divergence=jsd: the mixture's teacher share, in (0, 1)
    logit_standardize: bool = False  # every logit loss: z-score both logits per sample first (Sun et al. 2024)
    hint: HintConfig = field(default_factory=HintConfig)
    at: AttentionConfig = field(default_factory=lambda: AttentionConfig(weight=0.0))
    rkd: RKDConfig = field(default_factory=lambda: RKDConfig(weight=0.0))
    pkt: FeatureTermConfig = field(default_factory=FeatureTermConfig)
    sp: FeatureTermConfig = field(default_factory=FeatureTermConfig)
    crd: CRDConfig = field(default_factory=CRDConfig)
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (exit 3, no step taken) | skip (drop the batch, count it)


@dataclass
class QuantConfig:
    """Quantization-aware training of the student (``quant.bits=N``); see distill/compress/quant/callback.py."""

    bits: int | None = None  # null: off; 2..8
    backend: str = "x86"  # x86 (fbgemm/onednn) | qnnpack (ARM)
    per_channel: bool = True  # per-output-channel weight scales
    start_epoch: int = 0  # fp32 distillation before fake quantization begins
    freeze_observers_epoch: int | None = None  # from this epoch on, scales and zero points are fixed
    freeze_bn_epoch: int | None = None  # from this epoch on, BatchNorm statistics are fixed
    latency_batch_size: int | None = None  # the "large batch" of the latency measurement (besides batch 1); null: sized for the resolution
    latency_threads: int | None = None  # torch threads while measuring latency; null: torch's default


@dataclass
class MeasureConfig:
    """Where latency is timed; see distill/measure/latency.py."""

    latency: str = "auto"  # auto (the run's accelerator) | cpu | cuda | off


@dataclass
class PruneConfig:
    """Pruning of the student (``prune.method=unstructured|structured|nm``); see distill/compress/prune/callback.py."""

    method: str = "none"  # none | unstructured (alias: magnitude) | structured (channels/neurons) | nm (N:M semi-structured)
    importance: str = "magnitude"  # unstructured: magnitude|taylor|fisher|snip|random; structured: magnitude|taylor|hessian|fpgm|random
    importance_batches: int = 8  # taylor / fisher / snip / hessian: training batches whose gradients score a pruning event
    amount: float = 0.5  # final sparsity: fraction of weights (unstructured) or channels (structured)
    scope: str = "global"  # global (one threshold for all layers) | layer; structured: layer only
    schedule: str = "gradual"  # oneshot (at start_epoch) | gradual (Zhu & Gupta 2017)
    start_epoch: int = 0
    end_epoch: int = 10  # gradual: the final sparsity is reached here
    frequency: int = 1  # gradual: prune every `frequency` epochs (or steps, with interval=step)
    interval: str = "epoch"  # epoch | step
    layers: list[str] = field(default_factory=lambda: ["Linear", "Conv2d"])
    norm: float = 2.0  # structured with importance=magnitude: the Ln norm that ranks channels
    prune_classifier: bool = False  # unstructured: also prune the last Linear layer
    remove_channels: bool = True  # structured: physically remove the zeroed channels after training
    removal_tolerance: float = 1e-4  # structured: max |logit difference| of the removed vs masked model; above it, flagged
    n: int = 2  # nm: the weights kept in every group of m consecutive input weights (2:4: NVIDIA's sparse tensor cores)
    m: int = 4  # nm: the group size
    exclude: list[str] = field(default_factory=list)  # layer paths (fnmatch patterns) never pruned, e.g. [features.0]


@dataclass
class LowRankConfig:
    """Low-rank factorization of the student (``lowrank.rank_ratio`` or ``lowrank.energy``); see distill/compress/lowrank.py."""

    rank_ratio: float | None = None
    energy: float | None = None
    start_epoch: int = 0
    min_rank: int = 8  # never factorize a layer below this rank
    classifier: bool = False  # also factorize the last Linear layer


@dataclass
class SharingConfig:
    """Weight sharing: by k-means (``sharing.bits``; distill/compress/sharing.py) or whole filters by
    similarity (``sharing.method=filters``; distill/compress/filter_sharing.py)."""

    method: str = "kmeans"  # kmeans (on with sharing.bits) | filters (on by itself; needs sharing.threshold)
    bits: int | None = None
    metric: str = "euclidean"  # filters: euclidean | cosine
    threshold: float | None = None  # filters: euclidean: the largest distance within a group (>= 0); cosine: the least similarity, in (0, 1]
    start_epoch: int = 20


@dataclass
class StrategyConfig:
    """How training is spread over devices (``strategy=ddp`` etc.); see distill/runtime/strategies.py."""

    name: str = "auto"  # auto | ddp | deepspeed
    stage: int = 2  # deepspeed: ZeRO stage 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer state in host memory
    offload_parameters: bool = False  # deepspeed stage 3: parameters in host memory


@dataclass
class ExportConfig:
    """Extra artifacts of the tested student."""

    dtype: str | None = None  # fp16 | bf16: also save a 16-bit student and report its accuracy and size
    # Files that run outside eager PyTorch, each measured from the file (distill/compress/deploy.py):
    # onnx (student.onnx, in ONNX Runtime; student_fp16.onnx with dtype=fp16, student_int8.onnx with
    # quant.bits) | onnx_fp16 | onnx_int8 (that file alone) | torch_export (student.pt2).
    formats: list[str] = field(default_factory=lambda: ["onnx", "torch_export"])
    strict: bool = False  # true: a failed export fails the run (else it is recorded and the others written)
    max_acc_drop: float = 0.5  # points: an artifact further from the PyTorch model's accuracy is flagged
    eval_samples: int | None = None  # each file's accuracy on the first N test samples (null: the whole split)
    # student_int8.onnx: a first conv's input channels padded to a multiple of 4 (zero weights, the same
    # outputs) for ONNX Runtime's int8 conv kernels (distill/compress/quant/channels.py); false: as exported
    align_int8_channels: bool = True
    # student_int8.onnx: a Gemm whose output stays float (the classifier) given its bias as int32 codes,
    # so ONNX Runtime runs it as an integer QGemm instead of dequantizing its weight on every call
    # (distill/compress/quant/bias.py); false: as exported
    int32_biases: bool = True


@dataclass
class CheckpointConfig:
    """Besides the best (by val/acc) and last checkpoints, which are always kept."""

    every_n_epochs: int | None = None  # also keep epochNNN.ckpt of every Nth epoch (null: none)
    # Write checkpoints in a background thread (atomic either way). null: when training on a GPU,
    # whose host threads are otherwise idle; on CPU the writer would compete with the compute threads.
    background: bool | None = None


@dataclass
class ObjectiveConfig:
    """What ``train.py`` returns to a Hydra sweeper (Optuna maximizes it); see distill/report/objective.py."""

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
    measure: MeasureConfig = field(default_factory=MeasureConfig)
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
