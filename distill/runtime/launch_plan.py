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

from distill.runtime.rank_sync import is_distributed

_PREFIX = "DISTILL_PLAN_"
EXTERNAL = _PREFIX + "EXTERNAL"


def _rank_is_zero_from_env() -> bool:
    """Whether the environment says this is global rank 0 (no process group yet)."""
    env = os.environ
    if env.get("RANK", "").isdigit():  # torchrun and launchers like it: the global rank
        return int(env["RANK"]) == 0
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK"):  # mpirun
        if env.get(var, "").isdigit():
            return int(env[var]) == 0
    if env.get("LOCAL_RANK", "").isdigit():  # Lightning's subprocess launch: node rank and local rank
        return int(env["LOCAL_RANK"]) == 0 and int(env.get("NODE_RANK", "0") or 0) == 0
    # srun tasks. (SLURM_PROCID is also set in an interactive `srun --pty bash`, where Lightning then
    # launches the processes itself and sets LOCAL_RANK above: it comes first for that reason.)
    if env.get("SLURM_PROCID", "").isdigit() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", "0") or 0) == 0  # a process started by hand on node NODE_RANK


def externally_launched(world_size: int) -> bool:
    """Whether this multi-process run's processes were started by an external launcher (torchrun,
    srun, or by hand on each node) rather than by Lightning from our rank 0. Lightning's children
    have ``LOCAL_RANK`` without ``RANK``; torchrun sets ``RANK``; srun starts several tasks; a
    process started by hand on a node has ``NODE_RANK`` and no ``LOCAL_RANK``."""
    env = os.environ
    if world_size <= 1 or dist.is_available() and dist.is_initialized():
        return False
    if EXTERNAL in env:  # the process that launched us found it external: so is this launch
        return True
    if any(v in env for v in ("RANK", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        external = True  # torchrun, mpirun and the like
    elif "LOCAL_RANK" in env:
        return False  # launched by Lightning from our rank 0, which hands its decisions down
    else:
        external = int(env.get("SLURM_NTASKS", "1") or 1) > 1 or "NODE_RANK" in env
    if external:
        os.environ[EXTERNAL] = "1"  # inherited by any process Lightning launches from this one
    return external


def decide(name: str, decide_on_rank0: Callable[[], str] | None) -> str:
    """The decision ``name`` for this launch: taken by ``decide_on_rank0`` in rank 0 (or the single
    process), and received by every other rank (which pass None)."""

    def on_rank0() -> str:
        if decide_on_rank0 is None:
            raise RuntimeError(f"launch plan {name!r}: rank 0 has not decided it, and this process cannot")
        return decide_on_rank0()

    if is_distributed():
        box = [on_rank0() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])
    var = _PREFIX + name.upper()
    inherited = os.environ.get(var)
    if inherited is not None and not _rank_is_zero_from_env():
        return inherited
    decision = on_rank0()
    os.environ[var] = decision  # for the processes a later distributed call launches
    return decision


def is_rank_zero() -> bool:
    """Whether this is global rank 0 (or the only process): the one that decides and writes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _rank_is_zero_from_env()


def barrier() -> None:
    """Wait for every rank of the process group (nothing to wait for without one)."""
    if is_distributed():
        dist.barrier()


def share_outcome(error: str | None) -> None:
    """Rank 0 says whether its step (storing what all ranks computed) failed; every rank waits for
    it and, if it failed, the other ranks raise its error, so none is left waiting in a collective
    (rank 0 raises its own)."""
    box = [error]
    if is_distributed():
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None and not is_rank_zero():
        raise RuntimeError(f"rank 0 failed: {box[0]}")
