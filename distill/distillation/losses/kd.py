"""Hinton knowledge distillation: softened teacher probabilities as targets (``loss=kd``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distill.distillation.losses.base import DistillationLoss, LossTerms
from distill.distillation.settings import LOSS_CHECKS


class KDLoss(DistillationLoss):
    r"""Knowledge-distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a
    Neural Network" (2015), https://arxiv.org/abs/1503.02531.

    With student logits :math:`z_s`, teacher logits :math:`z_t`, labels :math:`y`, temperature
    :math:`T` and weight :math:`\alpha`:

    .. math::

        \mathrm{kd} &= T^2 \cdot \frac{1}{B}\sum_{b} \mathrm{KL}\big(\mathrm{softmax}(z_t/T)
                       \,\|\, \mathrm{softmax}(z_s/T)\big) \\
        \mathrm{ce} &= \mathrm{CrossEntropy}(z_s, y) \\
        \mathrm{loss} &= \alpha \cdot \mathrm{kd} + (1 - \alpha) \cdot \mathrm{ce}

    The :math:`T^2` factor keeps the gradient magnitude of the soft term independent of
    :math:`T` (the soft-target gradients scale as :math:`1/T^2`), so ``alpha`` means the same
    thing at every temperature.

    ``teacher_logits=None`` is allowed only when ``alpha == 0`` (plain cross-entropy training);
    ``kd`` is then reported as 0.
    """

    name, terms = "kd", ("kd", "ce")
    checks = LOSS_CHECKS["kd"]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> KDLoss:
        return cls(cfg.temperature, cfg.alpha)

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"loss.temperature={temperature!r} is out of range: must be > 0")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.alpha={alpha!r} is out of range: must be in [0, 1]")
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor
    ) -> LossTerms:
        ce = F.cross_entropy(student_logits, target)
        if teacher_logits is None:
            if self.alpha != 0:
                raise ValueError("KDLoss: teacher_logits is required when alpha > 0")
            kd = torch.zeros((), device=student_logits.device, dtype=ce.dtype)
        else:
            t = self.temperature
            # At least fp32 even under autocast: log-softmax of small differences loses bits in half precision.
            dtype = torch.promote_types(student_logits.dtype, torch.float32)
            log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
            log_p_t = F.log_softmax(teacher_logits.to(dtype) / t, dim=-1)
            # KL(p_t || p_s) summed over classes, averaged over the batch ("batchmean").
            kd = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
        loss = self.alpha * kd + (1.0 - self.alpha) * ce
        return {"loss": loss, "kd": kd, "ce": ce}
