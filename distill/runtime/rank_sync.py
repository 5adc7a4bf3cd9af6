"""Keeping compression state identical on every data-parallel rank, and checking that it is.

DDP broadcasts buffers from rank 0 at the start of each forward pass, but QAT observers then update
their ranges from each rank's own batch, so after the last step the ranks' scales differ slightly.
At the end of training the callbacks broadcast their state (fake-quant scales and observer ranges,
pruning masks) from rank 0 and verify, by gathering it from every rank, that it is identical.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


# The label of the repeated samples that pad an evaluation shard to the length of the others
# (distill/data/samplers.py: EvenShardSampler): the accuracy metrics ignore it, so each sample of the
# split counts exactly once. (-100: also torch's cross-entropy ignore_index.)
PADDING_LABEL = -100


def is_distributed() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def every_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on every rank: a collective every rank must call (``device``: where the
    rank's tensors live, its GPU under NCCL). One process: ``flag``."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_buffers(module: nn.Module, suffixes: tuple[str, ...]) -> int:
    """Broadcast from rank 0 every buffer of ``module`` whose name ends with one of ``suffixes``."""
    if not is_distributed():
        return 0
    count = 0
    for name, buf in module.named_buffers():
        if name.endswith(suffixes) and buf.numel() > 0:
            dist.broadcast(buf.data, src=0)
            count += 1
    return count


def verify_identical(module: nn.Module, suffixes: tuple[str, ...], what: str) -> int:
    """Raise if the selected buffers differ between ranks; return the number of ranks compared."""
    if not is_distributed():
        return 1
    # Gathered where the buffers live: NCCL (GPU DDP, DeepSpeed) rejects CPU tensors, gloo takes CPU ones.
    parts = [buf.detach().reshape(-1).double() for name, buf in module.named_buffers() if name.endswith(suffixes)]
    device = parts[0].device if parts else next((t.device for t in (*module.buffers(), *module.parameters())), torch.device("cpu"))
    mine = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"{what} differ between rank 0 and rank {rank}")
    log.info("%s identical on %d ranks (%d values)", what, len(gathered), mine.numel())
    return len(gathered)
