"""Rank sync gathers and broadcasts on the buffers' own device: NCCL rejects CPU tensors (issue 15, defect 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.runtime import rank_sync


class _Stop(Exception):
    pass


def _fake_world(monkeypatch, seen: list[torch.device]) -> None:
    """Two ranks, as far as rank_sync can tell; every collective records the device it was given."""
    monkeypatch.setattr(rank_sync, "is_distributed", lambda: True)
    monkeypatch.setattr(rank_sync.dist, "get_world_size", lambda: 2)

    def all_gather(outputs, tensor):
        seen.append(tensor.device)
        seen.extend(o.device for o in outputs)
        raise _Stop

    def broadcast(tensor, src):
        seen.append(tensor.device)

    monkeypatch.setattr(rank_sync.dist, "all_gather", all_gather)
    monkeypatch.setattr(rank_sync.dist, "broadcast", broadcast)


def _module_on(device: str) -> nn.Module:
    m = nn.Linear(3, 2).to(device)
    m.register_buffer("scale", torch.ones(2, device=device))
    return m


@pytest.mark.parametrize("suffixes", [("scale",), ("no_such_buffer",)], ids=["buffers", "none-selected"])
def test_gather_and_broadcast_stay_on_the_buffers_device(monkeypatch, suffixes):
    # The meta device stands in for cuda: any tensor moved to the CPU would show up as "cpu".
    seen: list[torch.device] = []
    _fake_world(monkeypatch, seen)
    module = _module_on("meta")
    rank_sync.broadcast_buffers(module, suffixes)
    with pytest.raises(_Stop):
        rank_sync.verify_identical(module, suffixes, "test")
    assert seen and {d.type for d in seen} == {"meta"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_on_cuda_tensors(monkeypatch):
    seen: list[torch.device] = []
    _fake_world(monkeypatch, seen)
    with pytest.raises(_Stop):
        rank_sync.verify_identical(_module_on("cuda"), ("scale",), "test")
    assert {d.type for d in seen} == {"cuda"}
