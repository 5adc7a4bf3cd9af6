r"""Feature ("hint") distillation of Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015),
https://arxiv.org/abs/1412.6550: ``loss.hint.weight=w loss.hint.layers=[<student path>:<teacher path>, ...]``.

For each pair of named intermediate layers, the student's output ``f_s`` is mapped by a learned
regressor ``r`` to the teacher's width and compared with the teacher's output ``f_t``:

.. math::

    \mathrm{hint} = \frac{1}{P} \sum_{p} \mathrm{MSE}\big(r_p(f_s^{(p)}),\, f_t^{(p)}\big)

and ``w * hint`` is added to the loss. ``r`` is a 1x1 convolution for feature maps (the map is then
resized to the teacher's spatial size by adaptive average pooling), a linear layer for vectors, and
the identity when the shapes already agree. The regressors train with the student (they are in its
optimizer) and are dropped from the deployed student. Default layers (``loss=fitnets`` without
``loss.hint.layers``): the stage outputs of both models paired by resolution, as for attention transfer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.distillation.features.base import FeatureTerm


def regressor(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
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


class HintTerm(FeatureTerm):
    name, parts, default_layers = "hint", ("hint",), "stages"

    def __init__(self) -> None:
        super().__init__()
        self.regressors = nn.ModuleList()

    def build(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
        if len(self.regressors) == 0:  # not when re-attached: the trained regressors stay
            self.regressors.extend(regressor(s.shape, t.shape) for s, t in zip(student, teacher, strict=True))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = []
        for reg, f_s, f_t in zip(self.regressors, student, teacher, strict=True):
            mapped = reg(f_s)
            if mapped.dim() == 4 and mapped.shape[-2:] != f_t.shape[-2:]:
                mapped = F.adaptive_avg_pool2d(mapped, f_t.shape[-2:])
            terms.append(F.mse_loss(mapped, f_t.to(mapped.dtype)))
        return {"hint": torch.stack(terms).mean()}
