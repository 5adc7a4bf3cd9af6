"""The interface every compression technique implements, and the report it leaves.

A technique (QAT, pruning, low-rank, weight sharing, 16-bit export, ...) is one :class:`Technique`
object in :data:`distill.compress.registry.TECHNIQUES`, keyed by its config group. It says

- whether the config turns it on (:meth:`Technique.enabled`) and which key does (``setting``);
- its range checks (``checks``: they run whether it is on or not, so a typo in an unused group
  still fails) and what it does not combine with (:meth:`Technique.check`);
- its Lightning callback (:meth:`Technique.callback`), which after testing holds a typed
  :class:`TechniqueReport` in ``callback.report`` (None until then);
- how to rebuild a student it trained from a checkpoint (:meth:`Technique.rebuild`), and how to
  load the file it deploys (:meth:`Technique.load_artifact`), so ``evaluate.py`` reloads every
  technique's student and artifact the same way.

A report is a dataclass of what the technique measured. :meth:`TechniqueReport.summary` gives its
``student/*`` keys of ``summary.json``; :meth:`TechniqueReport.deployed` the model it deploys, if
any (a :class:`distill.measure.record.DeployedModel`). The run's deployed model is the one of the
technique with the highest ``deploy_rank`` that reported one, else the student as trained.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn

from distill.config.validate import Check
from distill.measure.record import DeployedModel, Latency


@dataclass(frozen=True)
class BuildContext:
    """What a technique's callback is built from, besides its own config group."""

    shape: dict[str, int]  # num_classes, channels, image_size (from the data module)
    output_dir: Path  # the run directory: artifacts are written here
    student_cfg: dict[str, Any]  # the resolved, redacted student config (stored in artifacts)
    data_cfg: dict[str, Any]  # likewise for the data
    latency_batch_size: int
    latency_threads: int | None
    latency_device: str | None = "cpu"  # measure.latency resolved: cpu | cuda | None (off)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.shape["channels"], self.shape["image_size"], self.shape["image_size"])


@dataclass(frozen=True)
class LoadedArtifact:
    """A deployed file loaded back for evaluation: the model, its data, and how to describe it."""

    model: nn.Module
    datamodule: Any  # a distill.data.datamodules.BaseDataModule
    arch: str
    data: str
    kind: str  # e.g. "8-bit quantized", "fp32 (pruned, sparse file)"
    params: int
    size_bytes: int
    cpu_only: bool = False  # integer kernels run on CPU only


@dataclass
class TechniqueReport:
    """Base of the typed reports. Subclasses are dataclasses whose fields are ``student/*`` keys."""

    def summary(self) -> dict[str, Any]:
        """The report's keys in ``summary.json``'s ``student`` section."""
        return asdict(self)

    def deployed(self, student: StudentFigures) -> DeployedModel | None:
        """The model this technique deploys, measured; None when it deploys none of its own."""
        return None

    def describe(self) -> list[str]:
        """What the technique did, in words, for the end-of-run printout."""
        return []

    def fp32_latency(self) -> Latency | None:
        """The uncompressed student's latency, when the technique measured it beside its own model
        (then the pipeline does not time the student again)."""
        return None

    def fp32_size_bytes(self) -> int | None:
        """The fp32 artifact the compressed model is measured against, when not the trained student's."""
        return None


@dataclass(frozen=True)
class StudentFigures:
    """The student as trained and tested, as the pipeline measured it."""

    arch: str
    params: int
    size_bytes: int
    test_acc: float
    checkpoint: str | None
    latency: Latency | None

    def deployed_as(self, kind: str, params: int | None, size_bytes: int, bits: int, path: str | None) -> DeployedModel:
        """This student deployed in another file (same accuracy and latency: it runs as the trained student)."""
        lat = self.latency
        return DeployedModel(kind=kind, acc=self.test_acc, params=params, size_bytes=size_bytes, bits=bits,
                             latency_ms=lat.ms if lat else None, latency_ms_batch=lat.ms_batch if lat else None, path=path,
                             latency_device=lat.device if lat else None)


@dataclass
class QuantizedDeployable:
    """A quantized student for the deployable files: the converted integer model (PyTorch's int8
    kernels, the reference of ``student_int8.onnx``), its QDQ form and the same weights in fp32 (both
    None when the QDQ form could not be built: ``error`` says why)."""

    integer: nn.Module
    bits: int
    qdq: nn.Module | None
    fp32: nn.Module | None
    error: str | None = None
    runtime: nn.Module | None = None  # the integer model as PyTorch runs it fast (timed); None: ``integer``
    engine: str = "eager"  # that runtime: fbgemm / qnnpack kernels, inductor (oneDNN), or eager


@runtime_checkable
class RemovesChannels(Protocol):
    """A technique's callback that leaves channels to remove (structured pruning): a quantized
    student's deployable forms are shrunk by them (``student_int8.onnx`` of the smaller network)."""

    def channels_to_remove(self) -> dict[str, list[int]] | None: ...


@runtime_checkable
class ProvidesQuantized(Protocol):
    """A technique's callback that makes an integer student (QAT): ``student_int8.onnx`` is of it."""

    def deployable_quantized(self) -> QuantizedDeployable | None: ...


@runtime_checkable
class ProvidesDeployable(Protocol):
    """A technique's callback that makes an fp32 module to deploy in place of the trained student
    (structured pruning's channel-removed model): the ONNX and torch.export files are of it."""

    def deployable_fp32(self) -> nn.Module | None: ...


class Technique(ABC):
    """One compression technique. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # the config group (``quant``, ``prune``, ...): the registry key
    setting: ClassVar[str]  # the key that turns it on, for messages (``quant.bits``)
    callback_class: ClassVar[type[Callback]]  # its checkpoint state is keyed by this class's name
    checks: ClassVar[list[Check]] = []  # range checks of its keys
    # Higher wins when several techniques each deploy a model (QAT's integer model over a pruned one).
    deploy_rank: ClassVar[int] = 0
    # Position of its tag in a run's label (``lowrank0.25+prune0.7+int8``): lower first.
    label_rank: ClassVar[int] = 0
    # True when the last weights, not the best-by-validation ones, are the compressed model.
    changes_weights: ClassVar[bool] = True
    # False when it cannot run under DeepSpeed ZeRO-3 (which partitions every weight across ranks).
    zero3: ClassVar[bool] = False
    # True when its callback changes the student's structure, and so must be told the checkpoint a
    # run resumes from (``callback.resume_from``) to rebuild that structure before the weights load.
    reshapes_student: ClassVar[bool] = False

    @abstractmethod
    def enabled(self, cfg: DictConfig) -> bool:
        """Whether ``cfg`` turns this technique on."""

    def check(self, cfg: DictConfig, others: list[Technique]) -> None:  # noqa: B027 (optional: most have combination checks)
        """Combination checks, when enabled; ``others``: the other enabled techniques."""

    def check_disabled(self, cfg: DictConfig) -> None:  # noqa: B027 (optional)
        """When off: settings of its own that only mean something when on (a typo'd switch would
        otherwise leave them silently unused). The default: none."""

    def check_student(self, cfg: DictConfig, student: nn.Module, others: list[Technique]) -> None:  # noqa: B027 (optional)
        """Checks of the student's layers (a freshly built student, before the teacher is trained or
        any data is read for training), when enabled. The default: none."""

    @abstractmethod
    def callback(self, cfg: DictConfig, ctx: BuildContext) -> Callback:
        """The Lightning callback that applies the technique during training and reports after testing."""

    def rebuild(self, student: nn.Module, cfg: DictConfig, state: dict[str, Any], example: torch.Tensor) -> nn.Module:
        """The trained student's structure, from a fresh student and the callback's saved ``state``
        (before the checkpoint's weights load). The default: unchanged."""
        return student

    def load_artifact(self, path: Path, payload: dict[str, Any], data_overrides: dict[str, Any]) -> LoadedArtifact | None:
        """The model in ``path`` if it is this technique's deployed file (``payload``: its contents),
        else None. The default: the technique writes no file of its own."""
        return None

    def after_load(self, student: nn.Module, cfg: DictConfig) -> nn.Module:
        """Put a rebuilt student, its weights loaded, in its evaluation state. The default: as is."""
        return student

    @abstractmethod
    def hparams(self, cfg: DictConfig) -> dict[str, Any]:
        """Its settings in ``summary.json``'s ``hparams`` (on or off: a sweep compares both)."""

    def tag(self, cfg: DictConfig, report: TechniqueReport | None) -> str | None:
        """A short label for comparisons (``int8``, ``prune0.7``)."""
        return None
