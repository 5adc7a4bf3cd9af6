"""The interface of a distillation loss: student and teacher outputs and the labels in, named terms out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from distill.config.validate import Check

# {"loss": the total to minimise, <term>: each weighted part of it, for logging}
LossTerms = dict[str, torch.Tensor]


class DistillationLoss(nn.Module, ABC):
    """A loss of the ``loss=`` group. ``forward(student_logits, teacher_logits, target)`` returns
    :data:`LossTerms`; ``teacher_logits`` is None only for a run without a teacher (``alpha == 0``).

    Subclasses set ``name`` (the registry key), ``terms`` (the names of the logged terms besides
    ``loss``) and ``checks`` (range checks of their ``loss.*`` keys), and build themselves from the
    ``loss`` config in :meth:`from_config`."""

    name: ClassVar[str]
    terms: ClassVar[tuple[str, ...]]
    checks: ClassVar[list[Check]] = []
    alpha: float  # weight of the teacher's part; 0: no teacher is needed at all

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: DictConfig) -> DistillationLoss:
        """The loss for ``cfg`` (the run's ``loss`` node)."""

    @abstractmethod
    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor) -> LossTerms:
        """The loss of one batch and its named terms."""
