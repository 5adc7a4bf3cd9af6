"""Normalized knowledge distillation (``loss=nkd``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distill.distillation.losses.base import DistillationLoss, LossTerms
from distill.distillation.settings import LOSS_CHECKS


class NKDLoss(DistillationLoss):
    r"""Normalized KD of Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A
    Unified Approach with Normalized Loss and Customized Soft Labels" (ICCV 2023),
    https://arxiv.org/abs/2303.13005.

    The KD loss splits into the target class's term and a non-target term; NKD normalises the
    non-target probabilities to sum to one (a distribution over the other classes, at temperature
    :math:`T`) so the non-target term no longer shrinks as the target probability grows:

    .. math::

        \mathrm{target} &= -\tfrac1B \textstyle\sum_b p^t_{y}\, \log p^s_{y} \quad (T = 1) \\
        \mathrm{non\_target} &= -T^2\, \tfrac1B \textstyle\sum_b \sum_{c \ne y} \hat p^t_c \log \hat p^s_c,
        \quad \hat p_c = \mathrm{softmax}_{c \ne y}(z_c / T) \\
        \mathrm{loss} &= w_{ce}\,\mathrm{CE}(z_s, y) + \alpha\,(\mathrm{target} + \gamma\,\mathrm{non\_target})

    Conventions of the authors' code (yzd-v/cls_KD, ``mmcls/models/losses/nkd.py``): the target term
    at temperature 1 without :math:`T^2`; the non-target term over the logits with the target
    column removed, times :math:`T^2`; the class defaults ``temp=1.0``, ``gamma=1.5`` (their ImageNet
    setting; ``configs/distillers/cifar100/res34_distill_res18_cifar.py`` uses ``temp=3.0, gamma=3.5``),
    loss weight 1, added to the cross-entropy. Logged terms are unweighted (``non_target`` without :math:`\gamma`).
    """

    name, terms = "nkd", ("target", "non_target", "ce")
    needs_one_class = True
    checks = LOSS_CHECKS["nkd"]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> NKDLoss:
        return cls(cfg.temperature, cfg.alpha, cfg.gamma, cfg.ce_weight, cfg.logit_standardize)

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0, gamma: float = 1.5, ce_weight: float = 1.0,
                 logit_standardize: bool = False) -> None:
        super().__init__(logit_standardize)
        self.check_ranges(temperature, alpha=alpha, gamma=gamma, ce_weight=ce_weight)
        self.temperature, self.alpha, self.gamma, self.ce_weight = float(temperature), float(alpha), float(gamma), float(ce_weight)
        self.uses_teacher = self.alpha > 0

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor) -> LossTerms:
        ce = F.cross_entropy(student_logits, target)
        if not self.uses_teacher:  # every teacher weight 0: cross-entropy alone (no teacher is built for it)
            return self.labels_only(ce)
        s, t = self.prepared(student_logits, self.need_teacher(teacher_logits))
        label = target.view(-1, 1)
        log_s_y = torch.gather(F.log_softmax(s, dim=1), 1, label)
        t_y = torch.gather(F.softmax(t, dim=1), 1, label)
        target_term = -(t_y * log_s_y).mean()
        n, c = s.shape
        keep = torch.ones_like(s, dtype=torch.bool).scatter_(1, label, False)
        s_rest, t_rest = s[keep].reshape(n, c - 1), t[keep].reshape(n, c - 1)
        temp = self.temperature
        non_target = -(temp * temp) * (F.softmax(t_rest / temp, dim=1) * F.log_softmax(s_rest / temp, dim=1)).sum(1).mean()
        loss = self.ce_weight * ce + self.alpha * (target_term + self.gamma * non_target)
        return {"loss": loss, "target": target_term, "non_target": non_target, "ce": ce}
