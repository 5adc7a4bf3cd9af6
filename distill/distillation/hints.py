r"""Feature ("hint") distillation of Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015),
https://arxiv.org/abs/1412.6550: ``loss.hint.weight=w loss.hint.layers=[<student path>:<teacher path>, ...]``.

For each pair of named intermediate layers, the student's output ``f_s`` is mapped by a learned
regressor ``r`` to the teacher's width and compared with the teacher's output ``f_t``:

.. math::

    \mathrm{hint} = w \cdot \frac{1}{P} \sum_{p} \mathrm{MSE}\big(r_p(f_s^{(p)}),\, f_t^{(p)}\big)

``r`` is a 1x1 convolution for feature maps (the map is then resized to the teacher's spatial size
by adaptive average pooling), a linear layer for vectors, and the identity when the shapes already
agree. Features are taken with forward hooks: the models are not changed. The regressors train
with the student (they are in its optimizer) and are dropped from the deployed student.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from distill.errors import ConfigError


def check_hints(cfg: DictConfig) -> None:
    """``loss.hint.*``: well-formed, and with what hints need (a live teacher, no QAT)."""
    hint = cfg.loss.hint
    if hint.weight <= 0:
        return
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
    if cfg.quant.bits is not None:
        raise ConfigError("loss.hint with quant.bits is not supported (QAT rewrites the student's modules)")


def build_hints(cfg: DictConfig, student: nn.Module, teacher: nn.Module | None, shape: dict[str, int]) -> HintLoss | None:
    """The hint loss of ``cfg.loss.hint``, attached to both models (None when off)."""
    if cfg.loss.hint.weight <= 0:
        return None
    if teacher is None:
        raise ConfigError("loss.hint needs the live teacher, but its outputs were precomputed")
    hints = HintLoss(parse_pairs(list(cfg.loss.hint.layers)), cfg.loss.hint.weight)
    try:
        hints.attach(student, getattr(teacher, "_orig_mod", teacher),
                     torch.zeros(2, shape["channels"], shape["image_size"], shape["image_size"]))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return hints


def parse_pairs(layers: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in layers:
        student_path, sep, teacher_path = str(item).partition(":")
        if not sep or not student_path or not teacher_path:
            raise ValueError(f"loss.hint.layers: {item!r} is not '<student module path>:<teacher module path>'")
        pairs.append((student_path, teacher_path))
    return pairs


def _regressor(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
    if student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) == 4 and len(teacher_shape) == 4:
        return nn.Conv2d(student_shape[1], teacher_shape[1], 1, bias=False)
    if len(student_shape) == 4 and len(teacher_shape) == 2:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(student_shape[1], teacher_shape[1], bias=False))
    if len(student_shape) == 2 and len(teacher_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1], bias=False)
    raise ValueError(f"loss.hint.layers: cannot map a student feature of shape {tuple(student_shape)[1:]} to a teacher "
                     f"feature of shape {tuple(teacher_shape)[1:]}")


class HintLoss(nn.Module):
    def __init__(self, pairs: list[tuple[str, str]], weight: float) -> None:
        super().__init__()
        self.pairs, self.weight = pairs, float(weight)
        self.regressors = nn.ModuleList()
        self._features: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def attach(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
        """Hook the named layers and size the regressors from one forward pass on ``example``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for side, model in (("student", student), ("teacher", teacher)):
            names = dict(model.named_modules())
            for index, pair in enumerate(self.pairs):
                path = pair[0] if side == "student" else pair[1]
                if path not in names:
                    choices = ", ".join(n for n in names if n)[:400]
                    raise ValueError(f"loss.hint.layers: the {side} has no module {path!r}; its modules: {choices} ...")
                self._handles.append(names[path].register_forward_hook(self._keep(f"{side}{index}")))
        if len(self.regressors) == 0:  # first attach: build the regressors for the observed shapes
            with torch.no_grad():
                was_training = student.training
                student.eval()
                student(example)
                teacher(example)
                student.train(was_training)
            for index in range(len(self.pairs)):
                self.regressors.append(_regressor(self._features[f"student{index}"].shape, self._features[f"teacher{index}"].shape))
        self._features.clear()

    def _keep(self, key: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._features[key] = output
        return hook

    def forward(self) -> torch.Tensor:
        """The hint loss of the last student and teacher forward passes."""
        terms = []
        for index, regressor in enumerate(self.regressors):
            student, teacher = self._features.pop(f"student{index}"), self._features.pop(f"teacher{index}").detach()
            mapped = regressor(student)
            if mapped.dim() == 4 and mapped.shape[-2:] != teacher.shape[-2:]:
                mapped = F.adaptive_avg_pool2d(mapped, teacher.shape[-2:])
            terms.append(F.mse_loss(mapped, teacher.to(mapped.dtype)))
        return self.weight * torch.stack(terms).mean()
