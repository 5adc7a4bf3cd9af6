"""DIST: distillation from a stronger teacher by correlation of the predictions (``loss=dist``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distill.distillation.losses.base import DistillationLoss, LossTerms
from distill.distillation.settings import LOSS_CHECKS


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation: the cosine similarity of the mean-centred rows (eps in the denominator)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DISTLoss(DistillationLoss):
    r"""DIST of Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022),
    https://arxiv.org/abs/2205.10536.

    With :math:`Y^s = \mathrm{softmax}(z_s/\tau)` and :math:`Y^t` the batch's :math:`B \times C`
    prediction matrices and :math:`\rho` the Pearson correlation:

    .. math::

        \mathrm{inter} &= \tau^2 \big(1 - \tfrac1B \textstyle\sum_i \rho(Y^s_{i,:}, Y^t_{i,:})\big) \quad
        \text{(each sample's prediction over the classes)} \\
        \mathrm{intra} &= \tau^2 \big(1 - \tfrac1C \textstyle\sum_j \rho(Y^s_{:,j}, Y^t_{:,j})\big) \quad
        \text{(each class's scores over the batch)} \\
        \mathrm{loss} &= w_{ce}\,\mathrm{CE}(z_s, y) + \beta\,\mathrm{inter} + \gamma\,\mathrm{intra}

    Conventions of the authors' code (hunto/DIST_KD, ``classification/lib/models/losses/dist_kd.py``):
    :math:`\tau^2` on both relations, eps = 1e-8 added to the product of the norms; defaults
    :math:`\beta = \gamma = 1, \tau = 1` of the class (the authors' ImageNet configs, ``resnet_dist.yaml``,
    add ``kd_loss_weight: 2``: effectively :math:`\beta = \gamma = 2, \tau = 1`; their CIFAR-100 setting,
    conf/loss/dist.yaml's, is :math:`\beta = \gamma = 2, \tau = 4`). ``inter`` and ``intra`` are logged with their
    :math:`\tau^2`, without :math:`\beta, \gamma`. The intra-class relation needs a batch of more than one sample (0 for a batch of one).
    """

    name, terms = "dist", ("inter", "intra", "ce")
    checks = LOSS_CHECKS["dist"]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DISTLoss:
        return cls(cfg.temperature, cfg.beta, cfg.gamma, cfg.ce_weight, cfg.logit_standardize)

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0, ce_weight: float = 1.0,
                 logit_standardize: bool = False) -> None:
        super().__init__(logit_standardize)
        self.check_ranges(temperature, beta=beta, gamma=gamma, ce_weight=ce_weight)
        self.temperature, self.beta, self.gamma, self.ce_weight = float(temperature), float(beta), float(gamma), float(ce_weight)
        self.uses_teacher = self.beta > 0 or self.gamma > 0

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor) -> LossTerms:
        ce = F.cross_entropy(student_logits, target)
        if not self.uses_teacher:  # every teacher weight 0: cross-entropy alone (no teacher is built for it)
            return self.labels_only(ce)
        s, t = self.prepared(student_logits, self.need_teacher(teacher_logits))
        tau = self.temperature
        y_s, y_t = F.softmax(s / tau, dim=1), F.softmax(t / tau, dim=1)
        inter = tau * tau * (1 - pearson(y_s, y_t).mean())
        # One sample has no intra-class relation (its correlation over the batch is undefined): 0.
        intra = tau * tau * (1 - pearson(y_s.t(), y_t.t()).mean()) if len(y_s) > 1 else y_s.sum() * 0
        loss = self.ce_weight * ce + self.beta * inter + self.gamma * intra
        return {"loss": loss, "inter": inter, "intra": intra, "ce": ce}
