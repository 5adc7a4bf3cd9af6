"""Dataset wrappers: a subset with its own transform, one whose items carry their index, and an
evaluation split padded to an even length over the ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from distill.runtime.rank_sync import PADDING_LABEL


class TransformedSubset(Dataset):
    """A subset of a dataset with its own transform (train and val share files, not transforms)."""

    def __init__(self, dataset: Dataset, indices: list[int], transform: Callable) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), label


class IndexedDataset(Dataset):
    """``dataset[i] + (i,)``: the sample index rides along so its cached teacher logits can be found."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple:
        return (*self.dataset[i], i)


class PaddedSplit(Dataset):
    """``dataset`` extended to ``length`` items (see :class:`distill.data.samplers.EvenShardSampler`):
    item ``i >= len(dataset)`` is sample ``i mod len(dataset)`` again, labelled ``PADDING_LABEL`` so that
    the accuracy metrics skip it. A padded item still goes through the model, as every rank's must."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset, self.size, self.length = dataset, len(dataset), length  # type: ignore[arg-type]
        if length < self.size or (length > self.size and self.size == 0):
            raise ValueError(f"cannot pad a split of {self.size} samples to {length}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple:
        if i < self.size:
            return self.dataset[i]
        x, y, *rest = self.dataset[i % self.size]
        # The label's own type (a 0-d tensor from a TensorDataset, an int from an ImageFolder), so batches collate.
        pad = torch.full_like(y, PADDING_LABEL) if isinstance(y, torch.Tensor) else PADDING_LABEL
        return (x, pad, *rest)
