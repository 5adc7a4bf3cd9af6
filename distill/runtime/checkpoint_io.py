"""Checkpoints, safely: loaded with ``weights_only=True`` and an error that names the file; written
atomically and only when finite; and the newest valid one found for ``resume=auto``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from distill.errors import CheckpointError
from distill.runtime.atomic import atomic_torch_save

log = logging.getLogger(__name__)


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on CPU, turning every failure into a CheckpointError.

    ``weights_only=True`` refuses arbitrary pickled objects, so a crafted file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, refused global, ...
        raise CheckpointError(f"{what} {path} is corrupt or not a PyTorch checkpoint: {type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, expected a dict")
    return obj


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made safe: never a partial file, never non-finite weights.

    Each checkpoint is written to a temporary file in its directory, fsynced and renamed over the
    target (:func:`distill.runtime.atomic.atomic_torch_save`), so a kill or a full disk during the write
    leaves the previous file intact. A state dict holding NaN or inf is refused (and named) before
    anything is written. Loading goes through :func:`load_checkpoint` (``weights_only=True``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(
                f"refusing to write checkpoint {path}: non-finite values in {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; earlier checkpoints are kept"
            )
        try:
            atomic_torch_save(checkpoint, path)
        except Exception as err:  # ENOSPC surfaces from torch's zip writer as a RuntimeError
            raise OSError(f"could not write checkpoint {path} ({type(err).__name__}: {err}); is the disk full? "
                          "The previous file at that path, if any, is intact") from err

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, what="checkpoint")


def find_resume_checkpoint(ckpt_dir: str | os.PathLike, extra_dirs: list[Path] | None = None) -> Path | None:
    """The newest loadable checkpoint in ``ckpt_dir`` (and Lightning's SLURM ``hpc_ckpt_*.ckpt`` in
    ``extra_dirs``), newest first by modification time (ties: ``last.ckpt`` first), or None.
    Unloadable ones are skipped with a warning naming them. Temporary files that a kill left
    half-written (``.<name>.<random>.tmp``, see distill/runtime/atomic.py) are removed: the run directory
    belongs to this run, and no reader ever opens them."""
    found: list[Path] = []
    if Path(ckpt_dir).is_dir():
        for stale in Path(ckpt_dir).glob(".*.ckpt.*.tmp"):
            stale.unlink(missing_ok=True)
            log.info("resume: removed %s, left half-written by an interrupted save", stale.name)
        found = [p for p in Path(ckpt_dir).glob("*.ckpt") if not p.name.startswith(".")]
    for extra in extra_dirs or []:
        found += list(Path(extra).glob("hpc_ckpt_*.ckpt"))
    candidates = sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)
    for path in candidates:
        if path.is_dir():  # a DeepSpeed checkpoint: a directory of shards with a `latest` tag
            if (path / "latest").is_file():
                return path
            log.warning("resume: skipping %s: a checkpoint directory without its 'latest' tag", path)
            continue
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            log.warning("resume: skipping unreadable checkpoint: %s", err)
            continue
        return path
    return None


def saved_callback_state(ckpt_path: str | os.PathLike | None, state_key: str) -> dict[str, Any]:
    """A callback's saved state in the checkpoint being resumed ({} when there is none): for
    callbacks that must rebuild the student's shape in ``setup``, before Lightning restores weights."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return {}
    return load_checkpoint(ckpt_path).get("callbacks", {}).get(state_key, {})
