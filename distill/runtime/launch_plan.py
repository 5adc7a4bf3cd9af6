"""Decisions rank 0 takes once for every process of a multi-device run (train the teacher or reuse
it, compute its logit table or read it), so all ranks take the same distributed steps.

A run started as ``python train.py trainer.devices=N`` is one process until its first distributed
Lightning call, which re-runs the script in N - 1 new processes (Lightning's subprocess launcher).
Those arrive at the teacher stage not knowing what rank 0 found in the cache, and must not take
the cache's lock: rank 0 holds it (keeping other jobs out) while all of them train the teacher or
compute its table together. So rank 0 decides under the lock and hands the decision on:

- through the environment, when the processes it launches do not exist yet (they inherit it);
- by a broadcast, when they do (the process group of an earlier distributed step is still up).

Processes started by an external launcher (``srun``, ``torchrun``) all exist from the start with no
process group and no decision to inherit; :func:`externally_launched` tells the teacher stage to
keep to one process there (rank 0 trains, the others wait on the cache's lock and read the result).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.distributed as dist

_PREFIX = "DISTILL_PLAN_"


def _rank_from_env() -> int | None:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def externally_launched(world_size: int) -> bool:
    """Whether this multi-process run's processes were started by an external launcher (torchrun,
    srun) rather than by Lightning from this process, with no decision handed down to them."""
    if world_size <= 1 or dist.is_available() and dist.is_initialized():
        return False
    if any(k.startswith(_PREFIX) for k in os.environ):
        return False  # launched by our rank 0, which handed its decisions down
    ntasks = os.environ.get("SLURM_NTASKS") or os.environ.get("WORLD_SIZE")
    return bool(ntasks and ntasks.isdigit() and int(ntasks) > 1)


def decide(name: str, decide_on_rank0: Callable[[], str] | None) -> str:
    """The decision ``name`` for this launch: taken by ``decide_on_rank0`` in rank 0 (or the single
    process), and received by every other rank (which pass None)."""

    def on_rank0() -> str:
        if decide_on_rank0 is None:
            raise RuntimeError(f"launch plan {name!r}: rank 0 has not decided it, and this process cannot")
        return decide_on_rank0()

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [on_rank0() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])
    inherited = os.environ.get(_PREFIX + name)
    rank = _rank_from_env()
    if inherited is not None and rank not in (None, 0):
        return inherited
    decision = on_rank0()
    os.environ[_PREFIX + name] = decision  # for the processes a later distributed call launches
    return decision


def is_rank_zero() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _rank_from_env() in (None, 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
