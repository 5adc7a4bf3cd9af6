"""Every compression technique, by config group, in the order their callbacks run.

Adding a technique: a module in ``distill/compress`` with its :class:`~distill.compress.technique.Technique`
subclass, a config group in ``conf/``, and one entry below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn

from distill.compress.half import HalfTechnique
from distill.compress.lowrank import LowRankTechnique
from distill.compress.prune.callback import PruneTechnique
from distill.compress.quant.callback import QuantTechnique
from distill.compress.sharing import SharingTechnique
from distill.compress.technique import (
    BuildContext,
    ProvidesDeployable,
    ProvidesQuantized,
    QuantizedDeployable,
    StudentFigures,
    Technique,
    TechniqueReport,
)
from distill.errors import ConfigError
from distill.measure.record import DeployedModel, Latency
from distill.models.registry import build_student

# Callback order: low-rank replaces layers before QAT prepares the student (in its setup()), then
# pruning masks the replaced modules; the 16-bit export sees the final student.
TECHNIQUES: dict[str, Technique] = {
    t.name: t for t in (LowRankTechnique(), SharingTechnique(), QuantTechnique(), PruneTechnique(), HalfTechnique())
}


def get_technique(name: str) -> Technique:
    if name not in TECHNIQUES:
        raise ConfigError(f"unknown compression technique {name!r}; choose from: {', '.join(TECHNIQUES)}")
    return TECHNIQUES[name]


def enabled_techniques(cfg: DictConfig) -> list[Technique]:
    """The techniques ``cfg`` turns on. A config without a technique's group (a checkpoint written
    before the technique existed) does not use it."""
    on = []
    for technique in TECHNIQUES.values():
        try:
            enabled = technique.enabled(cfg)
        except (AttributeError, KeyError):  # omegaconf's ConfigAttributeError / ConfigKeyError: no such group
            enabled = False
        if enabled:
            on.append(technique)
    return on


def check_techniques(cfg: DictConfig) -> None:
    """What the techniques the config turns on do not combine with: ZeRO-3 first, then each one's own."""
    on = enabled_techniques(cfg)
    refused = [t for t in on if not t.zero3]
    if refused and cfg.strategy.name == "deepspeed" and cfg.strategy.stage == 3:
        raise ConfigError(f"{refused[0].setting} with strategy=deepspeed_stage_3 is not supported: ZeRO-3 partitions every "
                          "weight across ranks; use deepspeed_stage_2 or ddp")
    for technique in on:
        technique.check(cfg, [t for t in on if t is not technique])
    for technique in TECHNIQUES.values():
        if technique not in on:
            technique.check_disabled(cfg)


def check_student(cfg: DictConfig, shape: dict[str, int]) -> None:
    """The enabled techniques' checks of the student's layers (e.g. prune.m against each layer's
    input size), on a student built for them: before the teacher is trained."""
    on = enabled_techniques(cfg)
    if not any(type(t).check_student is not Technique.check_student for t in on):
        return
    with torch.random.fork_rng():  # building it draws from the global RNG: the teacher built next must not see that
        student = build_student(cfg.student, **shape)
    for technique in on:
        technique.check_student(cfg, student, [t for t in on if t is not technique])


@dataclass
class Compression:
    """The callbacks of one run's techniques, and after testing what they report."""

    applied: list[tuple[Technique, Callback]] = field(default_factory=list)

    @property
    def callbacks(self) -> list[Callback]:
        return [callback for _, callback in self.applied]

    @property
    def changes_weights(self) -> bool:
        """True when the last weights, not the best-by-validation ones, are the compressed model."""
        return any(t.changes_weights for t, _ in self.applied)

    def resume_from(self, ckpt_path: str | None) -> None:
        """Callbacks that reshape the student rebuild it from the checkpoint before its weights load
        (Lightning sets ``trainer.ckpt_path`` only after the setup hooks)."""
        for technique, callback in self.applied:
            if technique.reshapes_student:
                callback.resume_from = ckpt_path

    def reported(self) -> list[tuple[Technique, TechniqueReport]]:
        """(technique, report) of every technique that reported (after testing, on rank 0), in callback order."""
        return [(t, c.report) for t, c in self.applied if getattr(c, "report", None) is not None]

    def reports(self) -> list[tuple[Technique, TechniqueReport]]:
        """:meth:`reported`, highest ``deploy_rank`` first."""
        return sorted(self.reported(), key=lambda tr: -tr[0].deploy_rank)

    def summary(self) -> dict[str, Any]:
        """Every report's ``student/*`` keys, merged in callback order."""
        out: dict[str, Any] = {}
        for _, report in self.reported():
            out.update(report.summary())
        return out

    def fp32_latency(self) -> Latency | None:
        """The uncompressed student's latency if a technique measured it (else the pipeline does)."""
        return next((lat for _, r in self.reports() if (lat := r.fp32_latency()) is not None), None)

    def fp32_size_bytes(self) -> int | None:
        """The fp32 artifact the compressed model is measured against, if a technique says which."""
        return next((size for _, r in self.reports() if (size := r.fp32_size_bytes()) is not None), None)

    def deployable_fp32(self) -> nn.Module | None:
        """The fp32 module a technique made to deploy instead of the trained student (structured
        pruning's channel-removed model), for the ONNX and torch.export files; None: the student."""
        # The strongest technique's (QAT's folded fp32 weights over a pruned model's), as for ``deployed``.
        for _, callback in sorted(self.applied, key=lambda tc: -tc[0].deploy_rank):
            module = callback.deployable_fp32() if isinstance(callback, ProvidesDeployable) else None
            if module is not None:
                return module
        return None

    def deployable_quantized(self) -> QuantizedDeployable | None:
        """The integer student and its QDQ form, when a technique quantized it (``student_int8.onnx``)."""
        return next((q for _, c in self.applied if isinstance(c, ProvidesQuantized) and (q := c.deployable_quantized()) is not None), None)

    def deployed(self, student: StudentFigures) -> DeployedModel:
        """The run's deployed model: the strongest technique's, else the student as trained."""
        for _, report in self.reports():
            model = report.deployed(student)
            if model is not None:
                return model
        return student.deployed_as("fp32", student.params, student.size_bytes, 32, student.checkpoint)

    def label(self, cfg: DictConfig) -> list[str]:
        """Short labels of the techniques that reported (``lowrank0.25``, ``prune0.7``, ``int8``)."""
        done = sorted(self.reported(), key=lambda tr: tr[0].label_rank)
        return [tag for t, report in done if (tag := t.tag(cfg, report))]

    def describe(self) -> list[str]:
        """Every report's description lines, in callback order."""
        return [line for _, report in self.reported() for line in report.describe()]


def technique_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Every technique's settings for ``summary.json``'s ``hparams``."""
    out: dict[str, Any] = {}
    for technique in TECHNIQUES.values():
        out.update(technique.hparams(cfg))
    return out


def build_compression(cfg: DictConfig, ctx: BuildContext) -> Compression:
    """The callbacks of the techniques ``cfg`` turns on (checked by :func:`check_techniques`)."""
    return Compression([(t, t.callback(cfg, ctx)) for t in enabled_techniques(cfg)])


def rebuild_student(student: nn.Module, cfg: DictConfig, callback_states: dict[str, Any], example: torch.Tensor) -> nn.Module:
    """A fresh ``student`` given the structure training left it in (QAT-prepared, factorized, shared),
    from the run's config and the checkpoint's callback states, before the weights load."""
    for technique in enabled_techniques(cfg):
        state = next((v for k, v in callback_states.items() if _callback_of(technique, k)), {})
        student = technique.rebuild(student, cfg, state or {}, example)
    return student


def after_load(student: nn.Module, cfg: DictConfig) -> nn.Module:
    for technique in enabled_techniques(cfg):
        student = technique.after_load(student, cfg)
    return student


def _callback_of(technique: Technique, state_key: str) -> bool:
    """Whether a checkpoint's callback state key (Lightning's: the class name) is ``technique``'s."""
    return state_key.split("{")[0] == technique.callback_class.__qualname__
