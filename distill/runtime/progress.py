"""The progress bar, redrawn at a rate a person can read rather than at every batch."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ReadableProgressBar(RichProgressBar):
    """Lightning's rich progress bar, drawn at most every ``interval`` seconds.

    Lightning's bar redraws, and collects the logged metrics for its display, at every batch: with a
    small student that costs more than the step. Here every batch still advances the bar's count (so
    its rate and time estimates see every batch), but the redraw and the metrics wait for the
    interval. With ``leave=True`` a finished epoch's line is complete: Lightning stops the display at
    the next epoch's start (or the end of fit), and Rich draws it once more when it stops. Hard
    refreshes go through."""

    def __init__(self, interval: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval, self._drawn = interval, 0.0

    def _due(self) -> bool:
        return time.monotonic() - self._drawn >= self.interval

    def refresh(self, hard: bool = False) -> None:
        if hard or self._due():
            self._drawn = time.monotonic()
            super().refresh(hard=hard)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed mid-epoch (as Lightning's bar does)
            self._initialize_train_progress_bar_id()
        due = self._due()
        self._update(self.train_progress_bar_id, batch_idx + 1)
        if due:
            self._update_metrics(trainer, pl_module)
