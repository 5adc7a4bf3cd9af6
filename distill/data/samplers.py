"""The training order (seeded per epoch, sharded over ranks, resumable mid-epoch), and the evaluation shards."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, Sampler


class EpochShuffleSampler(Sampler[int]):
    """The training order: a permutation per epoch seeded by ``seed + epoch`` (Lightning calls
    ``set_epoch``), sharded over data-parallel ranks like ``DistributedSampler`` (padded so every
    rank has the same number of samples), and able to start part-way through an epoch.

    ``resume_at(epoch, batches)`` makes the iterator of that epoch skip the batches a preempted
    run had already trained on (the fit loop's count, from the checkpoint), so a run resumed from
    a mid-epoch checkpoint sees exactly the batches the uninterrupted run saw. ``set_epoch`` also
    reseeds the DataLoader's own generator (``loader_generator``), from which each iterator draws
    its workers' base seed: workers' random augmentation, too, depends only on (seed, epoch)."""

    def __init__(self, size: int, seed: int, loader_generator: torch.Generator | None = None,
                 num_replicas: int = 1, rank: int = 0, batch_size: int = 1) -> None:
        self.size, self.seed, self.epoch = size, int(seed) % 2**62, 0
        self.loader_generator = loader_generator
        self.num_replicas, self.rank, self.batch_size = num_replicas, rank, batch_size
        self.per_rank = -(-size // num_replicas)  # ceil
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(self.seed + 2**40 + epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self._resume = (epoch, batches_done) if batches_done > 0 else None

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[: self.per_rank * self.num_replicas - self.size]  # pad, as DistributedSampler does
        mine = order[self.rank :: self.num_replicas]
        if self._resume is not None and self._resume[0] == self.epoch:
            mine = mine[self._resume[1] * self.batch_size :]  # already trained on before the interruption
            self._resume = None
        return iter(mine)


class EvenShardSampler(Sampler[int]):
    """One rank's shard of an evaluation split of ``size`` samples, in order and strided over the
    ``num_replicas`` ranks like ``DistributedSampler`` (rank r: r, r + R, r + 2R, ...), padded so that
    every rank has ``ceil(size / R)`` samples, hence the same number of batches.

    The same number of batches is what ZeRO-3 needs: every forward pass gathers the partitioned
    parameters, a collective, so a rank with one batch more than the others would wait for them for
    ever (an unpadded sampler such as Lightning's ``UnrepeatedDistributedSampler`` gives one rank an
    extra batch whenever the shards straddle a batch boundary).

    The padding positions are the indices ``>= size`` (at most ``R - 1`` of them, at the end);
    :class:`distill.data.datasets.PaddedSplit` serves them as repeats of the first samples labelled
    ``PADDING_LABEL``, which the accuracy metrics ignore: each sample counts exactly once."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} ranks")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.per_rank = -(-size // num_replicas)  # ceil
        self.padded_size = self.per_rank * num_replicas

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.padded_size, self.num_replicas))


class EpochBatchSampler(BatchSampler):
    """``BatchSampler`` with ``set_epoch`` passed on to its sampler, for the loader of a dataset read a
    batch at a time (:class:`distill.data.datasets.Batched`): Lightning reaches the inner sampler itself
    (``batch_sampler.sampler``); a plain loop can call ``loader.batch_sampler.set_epoch``."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
