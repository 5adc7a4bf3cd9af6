"""A test-only callback: it makes one rank's training batch NaN at a chosen step (tests/test_distributed.py)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class PoisonBatch(Callback):
    """Before optimizer step ``step``, fill rank ``rank``'s inputs with NaN (the other ranks' stay finite)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch[0].fill_(float("nan"))
