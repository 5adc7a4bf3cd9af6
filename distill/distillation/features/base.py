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
    needs_index: ClassVar[bool] = False  # forward also gets ``index``, the batch's sample indices (CRD's memory)

    def build(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
        """Size learned parts from one probe batch's features (default: nothing to build)."""

    def teacher_form(self, pair: int, feature: torch.Tensor) -> torch.Tensor:
        """The teacher's feature of layer pair ``pair`` in the form :meth:`forward` consumes, per sample:
        what the teacher-feature cache stores (:mod:`distill.teacher.features`), so that a cached run and a
        live one compute the same term. Default: the feature as it is, in fp32."""
        return feature.float()

    def form(self, pair: int) -> str:
        """What :meth:`teacher_form` does to pair ``pair``, for the cache key (two forms, two entries)."""
        return "as-is"

    @abstractmethod
    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The term's parts for one batch (``teacher``: each pair's :meth:`teacher_form`)."""

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The term before its ``weight`` (default: the sum of the parts)."""
        return torch.stack(list(parts.values())).sum()
