"""Under data parallelism every rank takes the same QAT flow: a PT2E failure on one rank alone (an
export that trips on that rank's state) moves every rank to FX, as their gradients must meet in one
graph structure."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from distill.compress.quant import backend as quant_backend
from distill.compress.quant.callback import QuantizationAwareTraining
from distill.runtime import rank_sync


def _worker(rank: int, world: int, port: int, fail_on: int | None, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert rank_sync.every_rank(True) and not rank_sync.every_rank(rank == 0)
        if fail_on == rank:
            def refuse(*args, **kwargs):
                raise RuntimeError("this rank's export failed")

            quant_backend._prepare_pt2e = refuse
        torch.manual_seed(0)
        student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
        holder = SimpleNamespace(student=student)
        trainer = SimpleNamespace(current_epoch=0, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        qat = QuantizationAwareTraining(bits=8, shape={"channels": 1, "image_size": 8, "num_classes": 10}, output_dir=out)
        qat.setup(trainer, holder, "fit")
        flows = [None] * world
        torch.distributed.all_gather_object(flows, (qat.flow_used, quant_backend.flow_of(holder.student)))
        want = "pt2e" if fail_on is None else "fx"
        assert flows == [(want, want)] * world, flows
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fail_on", [None, 1], ids=["pt2e everywhere", "pt2e fails on rank 1"])
def test_every_rank_takes_the_flow_all_of_them_can(tmp_path, fail_on):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, fail_on, str(tmp_path)), nprocs=2, join=True)
