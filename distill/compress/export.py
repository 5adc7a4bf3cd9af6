"""Deployable files that run without this package: TorchScript today (``torch.jit.load``).

Every compressed model a run deploys (the integer student, the channel-removed student) is traced
and saved here, with a JSON description in the file's extra files.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.runtime.atomic import atomic_write


def save_torchscript(path: str | Path, model: nn.Module, example: torch.Tensor, meta: dict[str, Any]) -> Path:
    """A TorchScript copy of the converted model: ``torch.jit.load(path)`` runs it with plain PyTorch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model.eval(), (example,))
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={"distill.json": json.dumps(meta, default=str)})
    return atomic_write(path, lambda fh: fh.write(buffer.getvalue()))
