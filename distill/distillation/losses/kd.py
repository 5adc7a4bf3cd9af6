"""Hinton knowledge distillation, with the divergence between the softened distributions as a choice (``loss=kd``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distill.distillation.losses.base import DistillationLoss, LossTerms
from distill.distillation.settings import DIVERGENCES, LOSS_CHECKS


def divergence(log_p_s: torch.Tensor, log_p_t: torch.Tensor, kind: str, jsd_beta: float = 0.5) -> torch.Tensor:
    r"""Per-sample divergence between teacher :math:`p_t` and student :math:`p_s` (log-probabilities in).

    - ``forward_kl``: :math:`\mathrm{KL}(p_t \| p_s)`, Hinton's (mean-seeking);
    - ``reverse_kl``: :math:`\mathrm{KL}(p_s \| p_t)` (mode-seeking, as in MiniLLM);
    - ``jsd``: the generalized Jensen–Shannon divergence of GKD (Agarwal et al., ICLR 2024) with
      :math:`m = \beta p_t + (1 - \beta) p_s`: :math:`\beta\,\mathrm{KL}(p_t \| m) + (1-\beta)\,\mathrm{KL}(p_s \| m)`,
      as TRL's ``generalized_jsd_loss`` (its mixture in log space); :math:`\beta = 0.5` is the symmetric JSD;
    - ``tv``: total variation :math:`\tfrac12 \sum_c |p_t - p_s|` (as in DistiLLM's comparisons).
    """
    if kind == "forward_kl":
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if kind == "reverse_kl":
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p_t + math.log(jsd_beta), log_p_s + math.log(1.0 - jsd_beta)]), dim=0)
        kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
        kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
        return jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s
    if kind == "tv":
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(-1)
    raise ValueError(f"loss.divergence={kind!r} is unknown; choose from {', '.join(DIVERGENCES)}")


class KDLoss(DistillationLoss):
    r"""Knowledge-distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a
    Neural Network" (2015), https://arxiv.org/abs/1503.02531.

    With student logits :math:`z_s`, teacher logits :math:`z_t`, labels :math:`y`, temperature
    :math:`T`, weight :math:`\alpha` and divergence :math:`D` (``loss.divergence``, forward KL by default):

    .. math::

        \mathrm{kd} &= T^2 \cdot \frac{1}{B}\sum_{b} D\big(\mathrm{softmax}(z_t/T),\, \mathrm{softmax}(z_s/T)\big) \\
        \mathrm{ce} &= \mathrm{CrossEntropy}(z_s, y) \\
        \mathrm{loss} &= \alpha \cdot \mathrm{kd} + (1 - \alpha) \cdot \mathrm{ce}

    Conventions: summed over classes and averaged over the batch (``batchmean``, as mdistiller's
    ``kd_loss`` and torchdistill's ``KDLoss``), times :math:`T^2`, which keeps the gradient of the soft
    term independent of :math:`T` (its gradients scale as :math:`1/T^2`), so ``alpha`` means the same
    at every temperature. The :math:`T^2` is kept for every divergence. ``loss.logit_standardize``
    z-scores both logits first (:func:`~distill.distillation.losses.base.standardize`).

    ``teacher_logits=None`` is allowed only when ``alpha == 0`` (plain cross-entropy training);
    ``kd`` is then reported as 0.
    """

    name, terms = "kd", ("kd", "ce")
    checks = LOSS_CHECKS["kd"]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> KDLoss:
        return cls(cfg.temperature, cfg.alpha, divergence=cfg.get("divergence", "forward_kl"),
                   jsd_beta=cfg.get("jsd_beta", 0.5), logit_standardize=cfg.get("logit_standardize", False))

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, divergence: str = "forward_kl",
                 jsd_beta: float = 0.5, logit_standardize: bool = False) -> None:
        super().__init__(logit_standardize)
        if not temperature > 0:
            raise ValueError(f"loss.temperature={temperature!r} is out of range: must be > 0")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.alpha={alpha!r} is out of range: must be in [0, 1]")
        if divergence not in DIVERGENCES:
            raise ValueError(f"loss.divergence={divergence!r} is unknown; choose from {', '.join(DIVERGENCES)}")
        if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"loss.jsd_beta={jsd_beta!r} is out of range: must be in (0, 1)")
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.divergence, self.jsd_beta = divergence, float(jsd_beta)
        self.uses_teacher = self.alpha > 0

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
            s_logits, t_logits = self.prepared(student_logits, teacher_logits)
            log_p_s = F.log_softmax(s_logits / t, dim=-1)
            log_p_t = F.log_softmax(t_logits / t, dim=-1)
            if self.divergence == "forward_kl":  # KL(p_t || p_s): torch's fused kernel
                kd = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
            else:
                kd = divergence(log_p_s, log_p_t, self.divergence, self.jsd_beta).mean()
            kd = kd * (t * t)
        loss = self.alpha * kd + (1.0 - self.alpha) * ce
        return {"loss": loss, "kd": kd, "ce": ce}
