"""Training strategies (``strategy=auto|ddp|deepspeed_stage_N[_offload]``) as Lightning objects.

On GPUs the stock Lightning strategies are used (NCCL, and DeepSpeed's CUDA kernels). On CPU:

- DDP uses the gloo backend.
- DeepSpeed runs through its CPU accelerator (``DS_ACCELERATOR=cpu``, gloo). Lightning's
  ``DeepSpeedStrategy`` refuses any accelerator but CUDA, so :class:`CPUDeepSpeedStrategy` skips
  that check and gives each rank ``torch.device("cpu", local_rank)`` as its root device. It is
  meant for CI and CPU clusters; use the GPU path for speed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed

# (Importing Lightning's DeepSpeedStrategy does not import DeepSpeed: it does so when a strategy is built,
# after build_strategy has set DS_ACCELERATOR.)
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from omegaconf import DictConfig

STRATEGIES = ("auto", "ddp", "deepspeed")


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def build_strategy(cfg: DictConfig, accelerator: str) -> Any:
    """The Lightning strategy for ``cfg.strategy`` (a name or a Strategy object)."""
    name = cfg.name
    gpu = _on_gpu(accelerator)
    if name == "auto":
        return "auto"
    if name == "ddp":
        return DDPStrategy(process_group_backend=None if gpu else "gloo", find_unused_parameters=False)
    if name == "deepspeed":
        if not gpu:
            # Must be set before deepspeed is first imported: it picks its accelerator at import.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        kwargs = dict(
            stage=int(cfg.stage),
            offload_optimizer=bool(cfg.offload_optimizer),
            offload_parameters=bool(cfg.offload_parameters),
        )
        if gpu:
            return DeepSpeedStrategy(**kwargs)
        return CPUDeepSpeedStrategy(process_group_backend="gloo", **kwargs)
    raise ValueError(f"strategy.name={name!r}: choose from: {', '.join(STRATEGIES)}")


def offloads_optimizer(strategy: Any) -> bool:
    """Whether ``strategy`` (a Trainer's) is DeepSpeed with ZeRO-Offload of the optimizer (to host memory
    or NVMe): DeepSpeed then steps it on the host and refuses torch's optimizers (see distill/distillation/optim.py)."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    offload = ((strategy.config or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO on CPU processes (gloo). See the module docstring."""

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        # As DeepSpeedStrategy, minus its check that device indices equal local ranks (CPU
        # devices have no index).
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)
