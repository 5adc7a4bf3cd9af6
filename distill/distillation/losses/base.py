"""The interface of a distillation loss: student and teacher outputs and the labels in, named terms out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from distill.config.validate import Check

# {"loss": the total to minimise, <term>: each part of it, unweighted, for logging}
LossTerms = dict[str, torch.Tensor]


def standardize(logits: torch.Tensor) -> torch.Tensor:
    r"""Logit standardization of Sun et al., "Logit Standardization in Knowledge Distillation"
    (CVPR 2024), https://arxiv.org/abs/2403.01427: each sample's logits z-scored over the classes,
    :math:`(z - \bar z) / (\sigma(z) + 10^{-7})`, before the temperature is applied.

    As the authors' ``normalize`` (sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py):
    ``torch.std``'s unbiased (n - 1) deviation, and the 1e-7 added to the deviation, not under the root.
    The authors pair it with other weights than plain KD's (CIFAR-100 KD: T = 2, 0.1 CE + 9 KD; DKD:
    alpha and beta times 9), since standardized logits have unit spread: retune the temperature with it.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (logits.std(dim=-1, keepdim=True) + 1e-7)


class DistillationLoss(nn.Module, ABC):
    """A loss of the ``loss=`` group. ``forward(student_logits, teacher_logits, target)`` returns
    :data:`LossTerms`; ``teacher_logits`` is None only for a run that does not use them
    (``uses_teacher`` false: ``kd`` with ``alpha=0``).

    Subclasses set ``name`` (the registry key), ``terms`` (the names of the logged terms besides
    ``loss``, unweighted) and ``checks`` (range checks of their ``loss.*`` keys), and build
    themselves from the ``loss`` config in :meth:`from_config`. ``epoch`` is the training epoch
    (0-based), set by the module at each epoch's start, for losses with a schedule (DKD's warm-up).
    """

    name: ClassVar[str]
    terms: ClassVar[tuple[str, ...]]
    checks: ClassVar[list[Check]] = []
    # The loss singles out each sample's one class (DKD's target / non-target split, NKD's target
    # term): soft labels (Mixup / CutMix, data.mixup / data.cutmix) have no such class.
    needs_one_class: ClassVar[bool] = False
    uses_teacher: bool  # whether forward reads teacher_logits (False: no teacher is needed for the logits)

    def __init__(self, logit_standardize: bool = False) -> None:
        super().__init__()
        self.logit_standardize = bool(logit_standardize)
        self.epoch = 0
        self.teacher_weights: list[float] | None = None  # multi-teacher: the mixture's weights (teacher.ensemble)

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: DictConfig) -> DistillationLoss:
        """The loss for ``cfg`` (the run's ``loss`` node)."""

    @abstractmethod
    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor) -> LossTerms:
        """The loss of one batch and its named terms."""

    def prepared(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both logits in at least fp32 (log-softmax of small differences loses bits in half
        precision, and the cached table may be fp16), z-scored with ``loss.logit_standardize``;
        several teachers' logits (B x K x C) mixed into one teacher's (:meth:`mixture`)."""
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        s, t = student_logits.to(dtype), teacher_logits.to(dtype)
        if self.logit_standardize:  # each teacher's own logits, before they are mixed
            s, t = standardize(s), standardize(t)
        if t.dim() == 3:
            t = self.mixture(t)
        return s, t

    def mixture(self, teachers: torch.Tensor) -> torch.Tensor:
        r"""The logits of the teachers' mixture (``teachers``: B x K x C, teacher k at ``[:, k]``):

        .. math:: \bar z = T \log \sum_k w_k\, \mathrm{softmax}(z_k / T)

        whose softmax at the loss's temperature T is the weighted mixture of the teachers' softened
        distributions exactly, so every loss softens the mixture as it would one teacher's logits
        (NKD's target term, at T = 1, reads the mixture's target probability sharpened to T = 1).
        Weights: ``teacher.ensemble_weights`` normalised (:func:`distill.teacher.ensemble.ensemble_weights`), else equal."""
        count, temperature = teachers.shape[1], float(getattr(self, "temperature", 1.0))
        weights = self.teacher_weights if self.teacher_weights is not None else [1.0 / count] * count
        if len(weights) != count:
            raise ValueError(f"{count} teachers' logits but {len(weights)} ensemble weights")
        log_w = teachers.new_tensor(weights).log().view(1, count, 1)  # a zero weight: -inf, that teacher drops out
        return temperature * torch.logsumexp(torch.log_softmax(teachers / temperature, dim=-1) + log_w, dim=1)

    @staticmethod
    def check_ranges(temperature: float, **weights: float) -> None:
        """``temperature`` > 0 and every weight >= 0, or a ValueError naming the ``loss.*`` key (the
        same ranges ``distill.distillation.settings.LOSS_CHECKS`` checks in a config)."""
        if not temperature > 0:
            raise ValueError(f"loss.temperature={temperature!r} is out of range: must be > 0")
        for key, value in weights.items():
            if not value >= 0:
                raise ValueError(f"loss.{key}={value!r} is out of range: must be >= 0")

    def labels_only(self, ce: torch.Tensor) -> LossTerms:
        """The terms of a batch when every teacher weight is 0: ``ce_weight`` times the cross-entropy,
        every teacher term 0 (logged as such)."""
        zero = torch.zeros((), device=ce.device, dtype=ce.dtype)
        return {"loss": getattr(self, "ce_weight", 1.0) * ce, **{t: zero for t in self.terms if t != "ce"}, "ce": ce}

    def need_teacher(self, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        if teacher_logits is None:
            raise ValueError(f"loss={self.name}: teacher logits are required with these weights")
        return teacher_logits
