"""Dataset wrappers: an in-memory split read a batch at a time, a subset with its own transform, one
whose items carry the teacher's cached logits, and an evaluation split padded to an even length over
the ranks.

Reading a batch item by item and collating it costs a small student more than its step. A dataset
that can do better has ``gather(indices) -> batch``: an in-memory split gathers the batch with one
indexing operation, and the teacher's rows come from their table with one (fancy-indexing, for a
memory map) read per batch. The data module then loads it through :class:`Batched`, whose
``__getitems__`` (PyTorch's batched fetch) returns the gathered batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from distill.runtime.rank_sync import PADDING_LABEL


class TensorSplit(Dataset):
    """Rows ``indices`` of in-memory tensors (inputs, labels): one split of a dataset held in memory."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, indices: list[int]) -> None:
        self.x, self.y, self.indices = x, y, list(indices)
        self._index = torch.as_tensor(self.indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        return self.x[j], self.y[j]

    def gather(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` as one batch, gathered with one index operation."""
        rows = self._index[torch.as_tensor(indices, dtype=torch.long)]
        return self.x[rows], self.y[rows]


class Batched(Dataset):
    """``dataset`` read a batch at a time: PyTorch's batched fetch (``__getitems__``, called with a
    batch sampler's indices) returns ``dataset.gather(indices)``, collated already (pass
    :func:`as_batch` as the loader's ``collate_fn``). Only a loader built for it sees this wrapper."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> Any:
        return self.dataset.gather(indices)  # type: ignore[attr-defined]


def as_batch(batch: Any) -> Any:
    """The ``collate_fn`` of a :class:`Batched` loader: the batch ``gather`` made, as it is."""
    return batch


class TransformedSubset(Dataset):
    """A subset of a dataset with its own transform (train and val share files, not transforms)."""

    def __init__(self, dataset: Dataset, indices: list[int], transform: Callable) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), label


class WithTeacherRows(Dataset):
    """``(x, y, t)``: each training sample with the teacher's cached outputs for it, so they arrive with
    the batch (pinned and moved to the device with it) and the training step reads no table.

    ``table`` is a dense ``(N, C)`` tensor or a memory-mapped :class:`distill.teacher.outputs.TeacherOutputs`
    (anything with ``rows(index) -> (len(index), C)`` float logits): ``t`` is then the logits. Or it is
    a dict of such columns by name (the logits of one or more teachers, the teacher's cached features:
    :mod:`distill.teacher.features`), or None; ``t`` is then a dict of the batch's rows of each column,
    plus ``"index"``, the samples' indices in the dataset, when ``with_index`` (CRD's memory needs them).
    The row of item ``i`` is ``i``, or, for a dataset whose items carry their row as a third element
    (``(x, y, row)``, as :class:`distill.teacher.views.ReplayedViews` does for the view it drew), that
    row. A batch's rows are read at once: in ``gather`` (over a dataset that has it) and in
    ``__getitems__`` (PyTorch's batched fetch, per-sample items otherwise)."""

    def __init__(self, dataset: Dataset, table: Any, with_index: bool = False) -> None:
        self.columns = isinstance(table, dict) or table is None or with_index
        if self.columns and table is not None and not isinstance(table, dict):
            table = {"logits": table}  # the logits as a column beside the index
        self.dataset, self.table, self.with_index = dataset, table, with_index
        if hasattr(dataset, "gather"):
            self.gather = self._gather

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @staticmethod
    def _lookup(table: Any, index: torch.Tensor) -> torch.Tensor:
        return table[index] if isinstance(table, torch.Tensor) else table.rows(index)

    def _rows(self, rows: Sequence[int] | torch.Tensor, samples: Sequence[int]) -> Any:
        index = torch.as_tensor(rows, dtype=torch.long)
        if not self.columns:
            return self._lookup(self.table, index)
        out = {name: self._lookup(column, index) for name, column in (self.table or {}).items()}
        if self.with_index:
            out["index"] = torch.as_tensor(samples, dtype=torch.long)
        return out

    def __getitem__(self, i: int) -> tuple:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        items = [self.dataset[i] for i in indices]
        rows = self._rows([item[2] if len(item) > 2 else i for item, i in zip(items, indices, strict=True)], indices)
        if isinstance(rows, dict):  # one dict per item, as the default collate stacks them back
            per_item = [{name: value[j] for name, value in rows.items()} for j in range(len(items))]
        else:
            per_item = list(rows)
        return [(item[0], item[1], extra) for item, extra in zip(items, per_item, strict=True)]

    def _gather(self, indices: Sequence[int]) -> tuple:
        x, y, *rows = self.dataset.gather(indices)  # type: ignore[attr-defined]
        return x, y, self._rows(rows[0] if rows else indices, indices)


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
