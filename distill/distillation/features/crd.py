r"""Contrastive representation distillation of Tian, Krishnan & Isola, "Contrastive Representation
Distillation" (ICLR 2020), https://arxiv.org/abs/1910.10699 (``loss=crd``).

The student's and the teacher's embeddings (default: the inputs of the two classifiers, flattened)
are projected by learned heads to ``feat_dim`` and L2-normalised, :math:`e^s = \mathrm{norm}(W_s f_s + b_s)`,
:math:`e^t = \mathrm{norm}(W_t f_t + b_t)`. Two memory banks :math:`M^s, M^t \in \mathbb{R}^{N \times d}` hold
one embedding per training sample (N samples). For sample i of a batch, the rows
:math:`r_i = (i, j_1, \dots, j_K)` are the sample itself and K negatives drawn from the samples of the
other classes; each anchor is scored against the *other* side's memory:

.. math::

    P^s_{ik} = \frac{\exp(\langle M^t_{r_{ik}}, e^s_i \rangle / \tau)}{Z_s}, \qquad
    P^t_{ik} = \frac{\exp(\langle M^s_{r_{ik}}, e^t_i \rangle / \tau)}{Z_t}, \qquad
    Z = N \cdot \operatorname{mean}_{i,k} \exp(\cdot / \tau) \ \text{(of the first batch, then fixed)}

    \mathcal{L}(P) = -\frac{1}{B} \sum_i \Big[\log \frac{P_{i0}}{P_{i0} + K/N + \epsilon}
        + \sum_{k=1}^{K} \log \frac{K/N}{P_{ik} + K/N + \epsilon}\Big], \qquad
    \mathrm{crd} = \mathcal{L}(P^s) + \mathcal{L}(P^t)

(noise-contrastive estimation with the uniform noise :math:`P_n = 1/N`), after which the batch's rows
of each memory move towards the new embeddings, :math:`M_i \leftarrow \mathrm{norm}(m M_i + (1 - m) e_i)`.
The heads train with the student (they are in its optimizer); the memories are buffers (in the
checkpoint, not trained). The term needs each batch's sample indices (``needs_index``) and the training
split's labels in index order (:meth:`CRDTerm.set_data`), before the first batch.

Conventions of the authors' code (HobbitLong/RepDistiller ``crd/criterion.py`` ``CRDLoss``,
``ContrastLoss``, ``Embed``; ``crd/memory.py`` ``ContrastMemory``; ``dataset/cifar100.py``
``CIFAR100InstanceSample``; ``train_student.py``), followed where they differ from the paper:

- the positive pair is scored like the negatives, from the other side's memory row of the sample (its
  embedding from the last time it was seen), not from the current embeddings as the paper's critic
  :math:`h(T, S)` is written (``memory.py`` ll. 39-47, where ``idx[:, 0]`` is the sample itself);
- the exponentials are divided by the constant Z, N times the mean of the first batch's exponentials
  (positives included, computed with the randomly initialised memories), then fixed for the run
  (``memory.py`` ll. 49-61); the paper's critic has no Z;
- the loss is the sum of the two anchors' losses (student anchor against the teacher memory, teacher
  anchor against the student memory; ``criterion.py`` ll. 8-48), each summed over the B(K+1) terms and
  divided by B, with :math:`\epsilon = 10^{-7}` (``criterion.py`` ll. 5, 59-76);
- heads: ``nn.Linear`` with bias, then division by the L2 norm (``criterion.py`` ll. 79-102); memory
  rows initialised uniform in :math:`[-\sigma, \sigma]`, :math:`\sigma = 1/\sqrt{d/3}`, not normalised
  (``memory.py`` ll. 19-21); update with momentum then L2 renormalisation (``memory.py`` ll. 63-77);
- negatives in the 'exact' mode: the positive is the sample itself, the K negatives are drawn uniformly
  from all samples of the other classes, with replacement only when K exceeds that pool
  (``cifar100.py`` ll. 116-136, 159-168; their ImageNet loader always draws with replacement);
- defaults ``feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5`` (``train_student.py`` ll. 81-85), and
  ``loss.crd.weight=0.8`` (``-b 0.8`` of the README's commands).

Not copied: negatives are drawn here on the batch's device rather than in the data loader (the same
distribution); the 'relax' mode (a random same-class positive) and ``percent`` (a subsampled negative
pool) are not offered; a norm of zero is clamped (``F.normalize``) instead of dividing by it; a sample
index repeated in one update (padding of a distributed sampler) takes its last embedding instead of the
backend-dependent choice of ``index_copy_``. Under ``torch.distributed`` every rank updates its memories
with the whole global batch and uses the ranks' mean Z, so that the memories stay identical.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distill.distillation.features.relations import EmbeddingTerm

log = logging.getLogger(__name__)

EPS = 1e-7  # ContrastLoss's eps
MEMORY_SEED = 0  # the memories' initialisation, the same on every rank whatever the global RNG's state
_CHUNK = 1 << 24  # random keys drawn at once for sampling without replacement (rows x pool size)


def contrast_scores(memory: torch.Tensor, embedding: torch.Tensor, rows: torch.Tensor, nce_t: float) -> torch.Tensor:
    """``exp(<memory[rows[i, k]], embedding[i]> / nce_t)``, B x (K+1), unnormalised (before Z); the memory
    rows are constants (no gradient), the embedding keeps its graph. ``rows[:, 0]`` is the positive."""
    batch, width = rows.shape
    memory = memory.detach()
    if memory.shape[0] <= width * memory.shape[1]:
        # The same numbers as RepDistiller's bmm of the B x (K+1) x d gathered rows, from the B x N products
        # with the whole memory: less memory and fewer bytes moved whenever N <= (K+1) d (CIFAR: 5e4
        # against 2.1e6). The copy is what backward reads, as the memory is updated in place before it.
        products = torch.gather(embedding @ memory.to(embedding.dtype, copy=True).t(), 1, rows)
    else:
        weight = memory.index_select(0, rows.reshape(-1)).to(embedding.dtype).view(batch, width, -1)
        products = torch.bmm(weight, embedding.unsqueeze(2)).squeeze(2)
    return torch.exp(products / nce_t)


def normalization_constant(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller's Z: ``n_data`` times the mean of one batch's unnormalised scores (detached)."""
    return scores.detach().mean() * n_data


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller's ``ContrastLoss`` of normalised scores (B x (K+1), the positive at column 0): the
    NCE loss with the uniform noise ``Pn = 1/n_data`` over K negatives, divided by B (a scalar)."""
    batch, k = scores.shape[0], scores.shape[1] - 1
    noise = k / float(n_data)  # m * Pn
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    log_d0 = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / batch


def _class_order(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sample indices sorted by class, and each class's start and count in that order. The negative
    pool of class c is that order without c's slice: position j of the pool is ``order[j + count_c]``
    from ``start_c`` on, so no per-class pool is materialised (N x classes indices on ImageNet)."""
    order = torch.argsort(labels, stable=True)
    count = torch.bincount(labels)
    start = torch.cumsum(count, 0) - count
    return order, start, count


def _draw(index: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
          k: int, generator: torch.Generator | None) -> torch.Tensor:
    n_data = labels.numel()
    c_start, c_count = start[labels[index]], count[labels[index]]
    pool = n_data - c_count  # the negatives' pool size of each row
    if bool((pool == 0).any()):
        raise RuntimeError("crd: a batch sample's class holds the whole training split, so it has no negatives")
    device = generator.device if generator is not None else labels.device
    positions = torch.empty(len(index), k, dtype=torch.long, device=labels.device)
    replace = pool < k  # CIFAR100InstanceSample: replace = k > len(cls_negative[target])
    rows = replace.nonzero().flatten()
    if len(rows):  # uniform with replacement
        size = pool[rows].unsqueeze(1)
        u = torch.rand(len(rows), k, generator=generator, device=device).to(labels.device)
        positions[rows] = torch.minimum((u * size).long(), size - 1)
    rows = (~replace).nonzero().flatten()
    if len(rows):  # without replacement: the positions of the k smallest of uniform keys over each pool
        width = int(pool[rows].max())
        for chunk in rows.split(max(1, _CHUNK // width)):
            keys = torch.rand(len(chunk), width, generator=generator, device=device).to(labels.device)
            keys.masked_fill_(torch.arange(width, device=labels.device) >= pool[chunk].unsqueeze(1), 2.0)
            positions[chunk] = keys.topk(k, dim=1, largest=False, sorted=False).indices
    negatives = order[positions + c_count.unsqueeze(1) * (positions >= c_start.unsqueeze(1))]
    return torch.cat([index.unsqueeze(1), negatives], dim=1)


def sample_negatives(index: torch.Tensor, labels: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The 'exact' contrast rows, B x (k+1): column 0 is the sample itself, then k samples of the other
    classes, uniform, without replacement unless k exceeds that pool (then with). ``labels`` are the
    training split's, in index order; ``generator`` (default: the global RNG of ``labels``' device)."""
    labels = labels.long()
    return _draw(index.long(), labels, *_class_order(labels), k, generator)


def _last_occurrence(index: torch.Tensor) -> torch.Tensor | None:
    """Positions of the last occurrence of each distinct index, or None when none repeats."""
    unique, inverse = torch.unique(index, return_inverse=True)
    if len(unique) == len(index):
        return None
    positions = torch.arange(len(index), device=index.device)
    return torch.full((len(unique),), -1, dtype=torch.long, device=index.device).scatter_reduce(0, inverse, positions, "amax")


@torch.no_grad()
def update_memory(memory: torch.Tensor, index: torch.Tensor, embedding: torch.Tensor, momentum: float) -> None:
    """In place: ``memory[index] = norm(momentum * memory[index] + (1 - momentum) * embedding)`` (an index
    given twice takes its last embedding); the other rows are untouched, and so is a row whose new
    value is not finite (a batch that loss.on_nonfinite=skip drops must not poison the memory)."""
    last = _last_occurrence(index)
    if last is not None:
        index, embedding = index[last], embedding[last]
    old = memory.index_select(0, index)
    rows = old.float() * momentum + embedding.detach().float() * (1 - momentum)
    rows = rows / rows.pow(2).sum(1, keepdim=True).sqrt()
    rows = torch.where(torch.isfinite(rows).all(1, keepdim=True), rows.to(memory.dtype), old)  # no host sync
    memory.index_copy_(0, index, rows)


def _world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (any first dimension) concatenated in rank order."""
    world = _world()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


class CRDTerm(EmbeddingTerm):
    name, parts = "crd", ("crd",)
    needs_index: ClassVar[bool] = True  # forward gets the batch's sample indices

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        if feat_dim < 1 or nce_k < 1 or nce_t <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"loss.crd: feat_dim={feat_dim}, nce_k={nce_k}, nce_t={nce_t}, momentum={momentum} "
                             "is out of range: must be feat_dim >= 1, nce_k >= 1, nce_t > 0, 0 <= momentum < 1")
        self.feat_dim, self.nce_k, self.nce_t, self.momentum = int(feat_dim), int(nce_k), float(nce_t), float(momentum)
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None
        # memory_s holds student embeddings (RepDistiller's memory_v1), memory_t teacher ones (memory_v2).
        # Plain tensors, not buffers: DDP broadcasts every buffer from rank 0 at each forward pass, which
        # for two N x d memories (1.3 GB on ImageNet) would cost more than the step; they are kept
        # identical on every rank by the all-gathered update instead. In the checkpoint as the
        # module's extra state (get_extra_state), moved with the module by _apply.
        self.memory_s, self.memory_t = torch.zeros(0, self.feat_dim), torch.zeros(0, self.feat_dim)
        self.z = torch.zeros(2)  # Z of the student anchor, of the teacher anchor
        self.z_set = False  # a Python flag: no device sync per step to read it
        # Derived from set_data's labels (not in the checkpoint: set_data is called again on resume).
        self.labels = torch.zeros(0, dtype=torch.long)
        self._order = self._start = self._count = torch.zeros(0, dtype=torch.long)

    _STATE = ("memory_s", "memory_t", "z", "labels", "_order", "_start", "_count")

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        for name in self._STATE:
            value = getattr(self, name)
            moved = fn(value)
            # .half()/.float() casts apply to the float state only; the indices stay long
            setattr(self, name, moved if moved.dtype == value.dtype or value.is_floating_point() else moved.to(value.dtype))
        return self

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"memory_s": self.memory_s, "memory_t": self.memory_t, "z": self.z, "z_set": torch.tensor(self.z_set)}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if state["memory_s"].shape != self.memory_s.shape:
            raise RuntimeError(f"crd: the checkpoint's memory holds {state['memory_s'].shape[0]} samples, this run's training "
                               f"split {self.memory_s.shape[0]}: resume with the same data (and data.train_fraction)")
        device = self.memory_s.device
        self.memory_s, self.memory_t = state["memory_s"].to(device).clone(), state["memory_t"].to(device).clone()
        self.z, self.z_set = state["z"].to(device).clone(), bool(state["z_set"])

    @property
    def n_data(self) -> int:
        return self.labels.numel()

    def set_data(self, labels: torch.Tensor) -> None:
        """The training split's labels in sample-index order (length N): sizes the two memory banks (N x
        feat_dim buffers, in the checkpoint; initialised from a fixed seed, independent of the global RNG,
        so that every rank starts identical) and the per-class negative pools. Called again with the same
        N (re-attached), the memories and Z are kept. On resume, call it before loading the state dict
        (which then overwrites the memories and Z with the checkpoint's)."""
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"loss.crd: the training labels must be a non-empty 1-d integer tensor, got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        labels = labels.long()
        if int(labels.min()) < 0:
            raise ValueError("loss.crd: the training labels must be class indices >= 0")
        if int(torch.unique(labels).numel()) < 2:
            raise ValueError("loss.crd: the training split has one class, so no negatives from other classes")
        device = self.memory_s.device
        labels = labels.to(device)
        self.labels = labels
        self._order, self._start, self._count = _class_order(labels)
        smallest_pool = labels.numel() - int(self._count.max())
        if self.nce_k > smallest_pool:
            log.warning("loss.crd.nce_k=%d exceeds the %d samples outside the largest class: negatives repeat (drawn "
                        "with replacement), which costs time and adds nothing; consider loss.crd.nce_k<=%d",
                        self.nce_k, smallest_pool, smallest_pool)
        n = labels.numel()
        if self.memory_s.shape[0] == n:
            return
        generator = torch.Generator().manual_seed(MEMORY_SEED)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        dtype = self.memory_s.dtype
        self.memory_s = (torch.rand(n, self.feat_dim, generator=generator) * (2 * stdv) - stdv).to(device, dtype)
        self.memory_t = (torch.rand(n, self.feat_dim, generator=generator) * (2 * stdv) - stdv).to(device, dtype)
        self.z = torch.zeros(2, device=device)
        self.z_set = False

    def build(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
        """The two heads, ``nn.Linear`` from each flattened feature width to ``feat_dim``, sized from one
        probe batch's features (one layer pair); not when built already (re-attached: the trained heads stay)."""
        self._check_pairs(student, teacher)
        if self.embed_s is None or self.embed_t is None:
            device = self.memory_s.device
            self.embed_s = nn.Linear(student[0].flatten(1).shape[1], self.feat_dim).to(device)
            self.embed_t = nn.Linear(teacher[0].flatten(1).shape[1], self.feat_dim).to(device)

    @staticmethod
    def _check_pairs(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
        if len(student) != 1 or len(teacher) != 1:
            raise ValueError(f"loss.crd.layers: CRD contrasts one student layer with one teacher layer, got {len(student)} "
                             f"student and {len(teacher)} teacher layers (give one pair, or none for the embeddings)")

    def _check_index(self, index: torch.Tensor, batch: int) -> torch.Tensor:
        if self.n_data == 0:
            raise RuntimeError("crd: forward before set_data: the training labels (in sample-index order) size the memories")
        if self.embed_s is None or self.embed_t is None:
            raise RuntimeError("crd: forward before build: the embedding heads are sized from a probe batch")
        index = torch.as_tensor(index, device=self.labels.device)
        if index.dim() != 1 or index.numel() != batch or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise RuntimeError(f"crd: the batch's sample indices must be a 1-d integer tensor of the batch size {batch}, "
                               f"got {index.dtype} of shape {tuple(index.shape)}")
        index = index.long()
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= self.n_data:
            raise RuntimeError(f"crd: sample index {low if low < 0 else high} is out of range: the training split set by "
                               f"set_data has {self.n_data} samples (indices 0..{self.n_data - 1})")
        return index

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``index``: the batch's sample indices (into :meth:`set_data`'s labels). Draws the negatives,
        computes the two NCE losses, updates the memories (no gradient); ``{"crd": loss_s + loss_t}``."""
        self._check_pairs(student, teacher)
        f_s, f_t = student[0].flatten(1).float(), teacher[0].flatten(1).float().detach()
        index = self._check_index(index, f_s.shape[0])
        assert self.embed_s is not None and self.embed_t is not None
        n = self.n_data
        # exp(x / 0.07) spans ~1e-6..1e6: scores and losses in float32 whatever the run's autocast.
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            e_s = F.normalize(self.embed_s(f_s), dim=1)
            e_t = F.normalize(self.embed_t(f_t), dim=1)
            rows = _draw(index, self.labels, self._order, self._start, self._count, self.nce_k, None)
            scores_s = contrast_scores(self.memory_t, e_s, rows, self.nce_t)  # student anchor, teacher memory
            scores_t = contrast_scores(self.memory_s, e_t, rows, self.nce_t)  # teacher anchor, student memory
            # A non-finite batch (dropped by loss.on_nonfinite=skip after this) must not reach the
            # memories or fix Z: its rows are left out of the update, and Z waits for a finite batch.
            if not self.z_set and bool(torch.isfinite(scores_s).all() and torch.isfinite(scores_t).all()):
                z = torch.stack([normalization_constant(scores_s, n), normalization_constant(scores_t, n)])
                if _world() > 1:
                    # Each rank sees its own first batch: the mean over ranks makes Z (a buffer that then
                    # never changes) the same everywhere, so every rank optimises the same objective.
                    torch.distributed.all_reduce(z)
                    z = z / _world()
                self.z = z
                self.z_set = True
                log.info("crd: normalisation constants Z_s=%.1f, Z_t=%.1f", float(z[0]), float(z[1]))
            loss_s = nce_loss(scores_s / self.z[0], n)
            loss_t = nce_loss(scores_t / self.z[1], n)
            with torch.no_grad():
                e_s_all, e_t_all, index_all = e_s.detach(), e_t.detach(), index
                if _world() > 1:
                    # Every rank writes the rows of the whole global batch (not only its own), so that
                    # the memories, which are not parameters and so are not synchronised by DDP, stay
                    # identical on every rank, as one process training on the global batch would have them.
                    both = _all_gather(torch.cat([e_s_all, e_t_all], dim=1))
                    e_s_all, e_t_all = both[:, : self.feat_dim], both[:, self.feat_dim :]
                    index_all = _all_gather(index)
                update_memory(self.memory_s, index_all, e_s_all, self.momentum)
                update_memory(self.memory_t, index_all, e_t_all, self.momentum)
        return {"crd": loss_s + loss_t}
