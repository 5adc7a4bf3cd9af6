"""Loading checkpoints safely: ``weights_only=True`` always, and an error that names the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint or cache file is missing, truncated, corrupt or of the wrong kind."""


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
