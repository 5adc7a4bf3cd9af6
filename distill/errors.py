"""The errors a user can act on, in one leaf module every layer may import.

:mod:`distill.cli` turns each into one ``error: ...`` line and an exit status (2 for the user
errors, 3 for a non-finite loss, 128 + signal number for a preemption).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and what is allowed."""


class CheckpointError(RuntimeError):
    """A checkpoint or cache file is missing, truncated, corrupt or of the wrong kind."""


class UnknownModelError(KeyError):
    """A model name that no registry knows; the message lists the choices."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (training stops before the optimizer step)."""


class Preempted(Exception):
    """The run stopped on a signal after saving ``checkpoint``."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"stopped by {name}: {where}; run the same command again to continue (resume=auto)")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def first_line(err: BaseException) -> str:
    """The innermost cause's first line, without terminal colours (the ONNX exporter's own first line
    is a banner: "Failed to export the model with torch.export. This is step 1/3 ...")."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]
