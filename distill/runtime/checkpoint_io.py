"""Checkpoints, safely: loaded with ``weights_only=True`` and an error that names the file; written
atomically and only when finite, in a background thread; and the newest valid one found for ``resume=auto``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO

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
        refuse_nonfinite(checkpoint, path)
        try:
            atomic_torch_save(checkpoint, path)
        except Exception as err:  # ENOSPC surfaces from torch's zip writer as a RuntimeError
            raise OSError(f"could not write checkpoint {path} ({type(err).__name__}: {err}); is the disk full? "
                          "The previous file at that path, if any, is intact") from err

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, what="checkpoint")


def refuse_nonfinite(checkpoint: dict[str, Any], path: Any) -> None:
    """Raise, naming them, when floating-point tensors of the state dict hold NaN or inf (one device sync)."""
    floats = [(k, v) for k, v in checkpoint.get("state_dict", {}).items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not floats or bool(torch.stack([torch.isfinite(v).all().to(floats[0][1].device) for _, v in floats]).all()):
        return
    bad = [k for k, v in floats if not bool(torch.isfinite(v).all())]
    raise FloatingPointError(f"refusing to write checkpoint {path}: non-finite values in {', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}; earlier checkpoints are kept")


def snapshot(obj: Any) -> Any:
    """A copy of a checkpoint that later training cannot change: every tensor copied to host memory
    (what ``torch.save`` writes; a queued checkpoint holds no GPU memory), every dict, list and tuple rebuilt (keeping a state dict's ``_metadata``); other values (numbers, strings) shared.
    (Lightning's ``AsyncCheckpointIO`` clones through ``apply_to_collection``, several times slower on
    a checkpoint whose hyperparameters hold a whole resolved config.)"""
    if isinstance(obj, torch.Tensor):  # to host memory: no GPU copy per queued checkpoint
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        items = [(k, snapshot(v)) for k, v in obj.items()]
        try:
            copy = type(obj)(items)
        except TypeError:  # a mapping type built differently (defaultdict): a plain dict holds the same
            copy = dict(items)
        if hasattr(obj, "_metadata"):
            copy._metadata = obj._metadata  # type: ignore[attr-defined]
        return copy
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """:class:`AtomicCheckpointIO`'s writes, off the training loop: Lightning's ``AsyncCheckpointIO``
    copies the checkpoint's tensors (the next step cannot change what is written) and writes them in one
    background thread, in the order they were asked for; each write is atomic (a temporary file renamed
    over the target), so ``last.ckpt`` is the previous complete file until the new one is, never a
    partial one. The non-finite check runs before the copy, so a NaN checkpoint is refused at the step
    that asked for it. Removals (Lightning's ``save_top_k``) queue behind the writes, so a file is never
    removed before the write that made it. Lightning waits for the queue when ``fit`` or ``test`` ends
    (the strategy's teardown) and raises a failed write then, or at the next save. A SLURM requeue
    checkpoint (``hpc_ckpt_*``, written before Lightning requeues the job) is on disk when its save returns."""

    def __init__(self) -> None:
        super().__init__(AtomicCheckpointIO())

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        refuse_nonfinite(checkpoint, path)
        copy = snapshot(checkpoint)  # now: the next step changes the weights in place
        self._queue(lambda: self.checkpoint_io.save_checkpoint(copy, path, storage_options))
        if Path(path).name.startswith("hpc_ckpt"):
            self.wait()
        elif self._error:  # an earlier write failed: say so at the next save, not only at the end
            error, self._error = self._error, None
            raise error

    def remove_checkpoint(self, path: Any) -> None:
        self._queue(lambda: self.checkpoint_io.remove_checkpoint(path))

    def _queue(self, job: Any) -> None:
        """Run ``job`` in the writer thread after everything queued before it; keep its failure for later."""
        self._ensure_setup()
        assert self._executor is not None

        def run() -> None:
            try:
                job()
            except BaseException as err:
                self._error = err

        self._executor.submit(run)

    def teardown(self) -> None:
        """Wait for the queue (Lightning calls this when ``fit``/``test`` ends, and on the way out of an
        exception). A failed write is raised, unless another exception is already on its way (a
        preemption, a NaN loss): that one stays the run's error and the write failure is logged."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        error, self._error = self._error, None
        if error is not None:
            if sys.exc_info()[1] is not None:
                log.error("a background checkpoint write failed: %s", error)
            else:
                raise error

    def wait(self) -> None:
        """Block until every queued write and removal is done; raise the first that failed."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        if self._error:
            error, self._error = self._error, None
            raise error


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
