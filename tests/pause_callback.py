"""A test-only callback: it holds training at a chosen step until a signal arrives (tests/test_preemption.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class PauseAtStep(Callback):
    """After optimizer step ``step``: touch ``marker``, then wait (at most ``timeout`` s) for a stop request.

    The test sends its signal once the marker exists, so the signal lands at a known step, mid-epoch,
    however busy the machine is (a sleep-then-signal test raced the end of the epoch under load).
    """

    def __init__(self, step: int, marker: str, timeout: float = 300.0) -> None:
        self.step, self.marker, self.timeout = step, Path(marker), timeout

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.touch()
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)
