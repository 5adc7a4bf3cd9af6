"""Dataset wrappers: a subset with its own transform, and one whose items carry their index."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset


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
