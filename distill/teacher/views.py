"""Replayable augmented views, so that teacher outputs can be cached with random augmentation too.

With random augmentation the teacher must see the same random view as the student, so its outputs
cannot be a fixed table per sample. The "fast knowledge distillation" idea of Shen & Xing (2022,
"A Fast Knowledge Distillation Framework for Visual Recognition") removes the teacher anyway: draw
K augmented views per sample from *seeded* augmentation parameters, compute the teacher's logits
for those K x N views once, and let the student replay exactly those views (view ``v`` of sample
``i`` is the transform run under the RNG seed ``(seed, i, v)``). Each epoch the student sees one
of the K views of every sample, chosen at random.

When it fits: when K views cover the augmentation's variety well enough (small shifts, crops and
flips of small images; K of 8-32 is typical), and when the data is re-read many epochs. It is not
a substitute for heavy augmentation with a huge space of views (RandAugment on ImageNet over 300
epochs), where a live teacher sees more diversity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from distill.data.mixing import mix_pair


class ReplayedViews(Dataset):
    """``K`` seeded views per sample of ``base[indices]`` under ``transform``.

    ``view(i, v)`` is deterministic. ``self[i]`` draws a view ``v`` at random and returns
    ``(x, y, i * K + v)``: the last element is the row of that view in the teacher-output table.
    ``all_views()`` enumerates every (sample, view) in table order, for computing that table.
    """

    def __init__(self, base: Dataset, indices: list[int], transform: Callable, views: int, seed: int,
                 mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        if views < 1:
            raise ValueError(f"teacher.cache_views={views} must be >= 1")
        self.base, self.indices, self.transform = base, list(indices), transform
        self.views, self.seed, self.mix = views, seed, mix

    def __len__(self) -> int:
        return len(self.indices)

    def view(self, i: int, v: int) -> tuple[torch.Tensor, Any]:
        """View ``v`` of sample ``i``; with ``mix`` (Mixup / CutMix, distill/data/mixing.py) mixed with a
        partner sample (its own view, partner and λ all drawn under the view's seed) and a soft label."""
        image, label = self.base[self.indices[i]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + i) * 1_009 + v)
            x = self.transform(image)
            if self.mix is None:
                return x, label
            j = int(torch.randint(len(self.indices), ()))
            partner, partner_label = self.base[self.indices[j]]
            return mix_pair(self.mix, x, label, self.transform(partner), partner_label)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any, int]:
        v = int(torch.randint(self.views, ()))  # the loader's seeded RNG picks the view
        x, y = self.view(i, v)
        return x, y, i * self.views + v

    def all_views(self) -> Dataset:
        return _AllViews(self)


class _AllViews(Dataset):
    def __init__(self, replay: ReplayedViews) -> None:
        self.replay = replay

    def __len__(self) -> int:
        return len(self.replay) * self.replay.views

    def __getitem__(self, row: int) -> tuple[torch.Tensor, Any]:
        return self.replay.view(row // self.replay.views, row % self.replay.views)
