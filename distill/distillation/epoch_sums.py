"""The training epoch's figures, summed on the device and synchronised once at the epoch's end.

Per step, the loss terms and the count of correct predictions are added into one tensor where the
batch lives: no host synchronisation and no Python per metric (torchmetrics' ``MeanMetric`` checks
every update for NaN on the host, a device sync per step on a GPU, and ``self.log`` of a metric per
step costs more than a small student's step). At the epoch's end the sums are all-reduced over the
data-parallel ranks in one collective, so the means are exact over every sample of the epoch.

The sums are a plain attribute, not a module buffer: DDP broadcasts rank 0's buffers to every rank
before each forward pass (which would replace each rank's sums with rank 0's), and a ``*-true``
half-precision run casts buffers to 16 bits (where a float sum stops growing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


class EpochSums:
    """Sample-weighted float64 sums of ``names`` (the loss terms), of correct predictions and of samples.

    ``update`` each step; ``means(reduce)`` at the epoch's end gives ``{name: mean, "acc": accuracy}``
    over the samples of every rank (``reduce`` sums a tensor over the ranks) and starts a new epoch."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = tuple(names)
        self.sums = torch.zeros(len(self.names) + 2, dtype=torch.float64)

    @torch.no_grad()
    def update(self, terms: Mapping[str, torch.Tensor], logits: torch.Tensor, target: torch.Tensor) -> None:
        if self.sums.device != logits.device:  # follows the batch (once: the first step on the device)
            self.sums = self.sums.to(logits.device)
        n = logits.shape[0]
        if target.ndim == 2:  # soft labels (Mixup / CutMix): the accuracy counts the dominant class
            target = target.argmax(dim=-1)
        values = torch.stack([terms[k].detach().to(self.sums.dtype) for k in self.names]) * n
        correct = (logits.detach().argmax(dim=-1) == target).sum().to(self.sums.dtype)
        self.sums[:-2] += values
        self.sums[-2] += correct
        self.sums[-1] += n

    @torch.no_grad()
    def means(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The epoch's means (0-d float32 tensors on the sums' device), then zeroed for the next epoch.
        An epoch with no sample (every batch skipped) gives no figure; every rank calls ``reduce`` alike."""
        total = reduce(self.sums.clone()) if reduce is not None else self.sums.clone()
        self.sums.zero_()
        count = total[-1]
        if float(count) == 0:  # the one host sync per epoch
            return {}
        out = {name: (total[i] / count).float() for i, name in enumerate(self.names)}
        out["acc"] = (total[-2] / count).float()
        return out
