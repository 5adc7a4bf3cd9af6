"""What a resumed run needs besides weights and optimizer to continue *exactly*.

Lightning restores weights, optimizer, schedulers, loops and callback state, but not the global
RNGs (Python, NumPy, torch CPU and CUDA) that drive dropout and data augmentation, nor the
position in a non-resumable data loader. :class:`RNGState` saves the RNGs with every checkpoint
and puts them back on load (every rank seeds identically with ``seed_everything``, so the state
saved by rank 0 is every rank's). For a checkpoint taken in the middle of an epoch (a preemption),
it tells the data module how many batches of that epoch were already trained on, and the
training sampler (:class:`distill.data.samplers.EpochShuffleSampler`) starts after them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGState(Callback):
    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # NumPy's key array as a tensor: checkpoints must load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at on_train_start, not now: the sanity-check validation that runs in between
        # draws from the RNG (every DataLoader iterator takes a base seed from it).
        self._restored = state_dict

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        done = int(progress.get("current", {}).get("completed", 0))
        total = progress.get("total", {})
        if total.get("completed", 0) == total.get("processed", 0) - 1:
            done += 1  # saved between "processed" and "completed" (e.g. Lightning's SLURM hpc checkpoint): Lightning counts it done
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "resume_position"):
            trainer.datamodule.resume_position = (int(checkpoint.get("epoch", 0)), done)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._restored is None:
            return
        state_dict, self._restored = self._restored, None
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
