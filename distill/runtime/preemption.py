"""Preemption: SIGTERM or SIGUSR1 saves a checkpoint at the next step boundary, then the run exits.

Outside SLURM, :class:`Preemption` turns either signal into Lightning's own stop request
(``trainer.received_sigterm``; under DDP rank 0 broadcasts it, so every rank stops at the same
step). When the loops stop, it writes ``checkpoints/last.ckpt`` (atomically) and the run exits with
status ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1) after printing where the
checkpoint is. Running the same command again in the same run directory continues from it
(``resume=auto``).

Under SLURM this callback installs no handler: Lightning's own turn SIGTERM (what ``scontrol
requeue`` and preemption send) into the same stop request, so the checkpoint is written the same
way, and SIGUSR1 (``--signal``) into Lightning's save-``hpc_ckpt_N.ckpt``-and-requeue. The requeued
job starts again in the same run directory and ``resume=auto`` continues from the newest valid
checkpoint, mid-epoch ones included, exactly (see distill/runtime/rng_state.py).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(Callback):
    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signum: int | None = None
        self.saved: Path | None = None
        self._previous: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment):
            return

        def handler(signum: int, frame: Any) -> None:
            log.warning("received %s: stopping after the current step to save a checkpoint", signal.Signals(signum).name)
            self.signum = signum
            # Lightning's own stop request: checked after every step, and broadcast from rank 0 under DDP.
            trainer._signal_connector.received_sigterm = True

        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.signum = self.signum or signal.SIGTERM  # another rank's signal, broadcast by Lightning
        trainer.save_checkpoint(self.checkpoint_path)
        self.saved = self.checkpoint_path
        log.warning("preempted: checkpoint saved to %s (epoch %d, step %d)", self.checkpoint_path,
                    trainer.current_epoch, trainer.global_step)
