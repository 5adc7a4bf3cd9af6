"""The interface of a feature term: lists of student and teacher features in, named parts out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn


class FeatureTerm(nn.Module, ABC):
    """One ``loss.<name>`` term. :meth:`forward` gets the hooked features of each layer pair (student
    features with their graph, teacher features detached) and returns its parts, unweighted, by
    logged name; :meth:`total` combines them into the term the ``weight`` multiplies.

    ``default_layers`` names the pairs used when ``loss.<name>.layers`` is empty: ``"embedding"``
    (the classifiers' inputs) or ``"stages"`` (the stage outputs, paired by resolution). ``build`` is called once, with one probe batch's features, before training
    (terms with learned parts, as FitNets' regressors, size them there)."""

    name: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]
    default_layers: ClassVar[str] = "embedding"
    min_batch: ClassVar[int] = 1

    def build(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
        """Size learned parts from one probe batch's features (default: nothing to build)."""

    @abstractmethod
    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The term's parts for one batch."""

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The term before its ``weight`` (default: the sum of the parts)."""
        return torch.stack(list(parts.values())).sum()
