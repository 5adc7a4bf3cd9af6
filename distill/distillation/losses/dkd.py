"""Decoupled knowledge distillation (``loss=dkd``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distill.distillation.losses.base import DistillationLoss, LossTerms
from distill.distillation.settings import LOSS_CHECKS


class DKDLoss(DistillationLoss):
    r"""Decoupled KD of Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022),
    https://arxiv.org/abs/2203.08679.

    Eq. (3) of the paper splits Hinton's KL into a target-class part and a non-target part,
    :math:`\mathrm{KD} = \mathrm{KL}(b^t \| b^s) + (1 - p^t_{y})\,\mathrm{KL}(\hat p^t \| \hat p^s)`,
    with :math:`b = [p_y, 1 - p_y]` the binary target / non-target probabilities and :math:`\hat p`
    the distribution over the non-target classes alone. DKD drops the coupling weight
    :math:`1 - p^t_y` and weights the parts on their own:

    .. math::

        \mathrm{tckd} &= T^2\,\tfrac1B \textstyle\sum_b \mathrm{KL}(b^t \| b^s), \qquad
        \mathrm{nckd} = T^2\,\tfrac1B \textstyle\sum_b \mathrm{KL}(\hat p^t \| \hat p^s) \\
        \mathrm{loss} &= w_{ce}\,\mathrm{CE}(z_s, y) + \min\!\big(\tfrac{e + 1}{E_w}, 1\big)\,(\alpha\,\mathrm{tckd} + \beta\,\mathrm{nckd})

    All probabilities at temperature :math:`T`. Conventions of the authors' code (mdistiller,
    ``mdistiller/distillers/DKD.py``), followed here: sums over classes divided by the batch size,
    times :math:`T^2` for both parts; :math:`\hat p` computed by subtracting 1000 from the target
    logit before the softmax; the warm-up factor ``min(epoch / warmup, 1)`` with mdistiller's epochs
    counted from 1 (here ``e`` counts from 0, hence ``e + 1``); defaults ``CE_WEIGHT=1``, ``ALPHA=1``,
    ``BETA=8``, ``T=4``, ``WARMUP=20`` (their CIFAR-100 setting; ImageNet uses ``BETA=0.5, T=1``).
    The logged ``tckd`` and ``nckd`` are unweighted (no alpha, beta or warm-up).
    """

    name, terms = "dkd", ("tckd", "nckd", "ce")
    needs_one_class = True
    checks = LOSS_CHECKS["dkd"]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DKDLoss:
        return cls(cfg.temperature, cfg.alpha, cfg.beta, cfg.ce_weight, cfg.warmup_epochs, cfg.logit_standardize)

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, ce_weight: float = 1.0,
                 warmup_epochs: int = 20, logit_standardize: bool = False) -> None:
        super().__init__(logit_standardize)
        self.check_ranges(temperature, alpha=alpha, beta=beta, ce_weight=ce_weight, warmup_epochs=warmup_epochs)
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        self.ce_weight, self.warmup_epochs = float(ce_weight), int(warmup_epochs)
        self.uses_teacher = self.alpha > 0 or self.beta > 0

    def warmup(self) -> float:
        """The distillation part's weight this epoch: linear from 1 / warmup_epochs to 1."""
        return 1.0 if self.warmup_epochs == 0 else min((self.epoch + 1) / self.warmup_epochs, 1.0)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor) -> LossTerms:
        ce = F.cross_entropy(student_logits, target)
        if not self.uses_teacher:  # every teacher weight 0: cross-entropy alone (no teacher is built for it)
            return self.labels_only(ce)
        s, t = self.prepared(student_logits, self.need_teacher(teacher_logits))
        tckd, nckd = decoupled_kl(s, t, target, self.temperature)
        loss = self.ce_weight * ce + self.warmup() * (self.alpha * tckd + self.beta * nckd)
        return {"loss": loss, "tckd": tckd, "nckd": nckd, "ce": ce}


def decoupled_kl(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of one batch, each times T² and averaged over the batch, as mdistiller's ``dkd_loss``."""
    t = temperature
    gt = F.one_hot(target, student.shape[-1]).to(student.dtype)
    p_s, p_t = F.softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1)
    # b = [p_y, 1 - p_y], as the sums over the masks (mdistiller's cat_mask)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * (1 - gt)).sum(-1)], dim=-1)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * (1 - gt)).sum(-1)], dim=-1)
    batch = target.shape[0]
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * (t * t) / batch
    log_q_s = F.log_softmax(student / t - 1000.0 * gt, dim=-1)
    q_t = F.softmax(teacher / t - 1000.0 * gt, dim=-1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * (t * t) / batch
    return tckd, nckd
