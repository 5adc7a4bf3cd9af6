"""Mixup and CutMix of training batches, through torchvision's v2 transforms.

Mixup (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization") trains on
``λ x_i + (1 - λ) x_j`` with the label ``λ e_i + (1 - λ) e_j``; CutMix (Yun et al., 2019) pastes a
box of ``x_j`` into ``x_i`` and mixes the labels by the box's area. In both ``λ ~ Beta(α, α)``.
``v2.MixUp`` / ``v2.CutMix`` pair each sample of a batch with its neighbour (the batch rolled by
one); with both set, one of the two is drawn per batch (``v2.RandomChoice``), as torchvision's
classification reference does. The labels become soft ``(B, C)`` probabilities, which
``F.cross_entropy`` takes as they are.

Applied after collation (the collate function of the training loader, so in the loader's workers),
never to validation or test batches. With ``teacher.cache_views`` the mixing is instead part of each
replayed view (:class:`distill.teacher.views.ReplayedViews`: its partner and λ seeded with the view),
so that the teacher's outputs for the mixed views can be cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torchvision.transforms import v2


def mixing_of(data: DictConfig) -> dict[str, float]:
    """The batch mixing a data config asks for, ``{"mixup": α, "cutmix": α}`` of the nonzero ones (for
    cache keys and summaries); empty when off."""
    return {name: float(data.get(name) or 0.0) for name in ("mixup", "cutmix") if float(data.get(name) or 0.0) > 0}


def batch_mix(data: DictConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """``(x, y) -> (mixed x, soft y)`` for ``data.mixup`` / ``data.cutmix``, or None when both are 0."""
    alphas = mixing_of(data)
    mixes: list[v2.Transform] = []
    if "mixup" in alphas:
        mixes.append(v2.MixUp(alpha=alphas["mixup"], num_classes=num_classes))
    if "cutmix" in alphas:
        mixes.append(v2.CutMix(alpha=alphas["cutmix"], num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


class MixedCollate:
    """A training loader's collate function followed by the batch mixing (picklable, for workers)."""

    def __init__(self, collate: Callable[[Any], Any], mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.collate, self.mix = collate, mix

    def __call__(self, samples: Any) -> Any:
        x, y, *rest = self.collate(samples)
        x, y = self.mix(x, torch.as_tensor(y, dtype=torch.long))
        return (x, y, *rest)


def mix_pair(mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, y: int,
             partner: torch.Tensor, partner_y: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample mixed with its partner by the same transform as a batch (a batch of the two: row 0
    is ``x`` mixed with ``partner``), for a replayed view."""
    mixed, soft = mix(torch.stack([x, partner]), torch.tensor([int(y), int(partner_y)]))
    return mixed[0], soft[0]
