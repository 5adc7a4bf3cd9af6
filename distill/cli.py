"""Turn the errors a user can fix (bad config, missing or corrupt files) into one clear line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from distill.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    Preempted,
    UnknownModelError,
)

log = logging.getLogger("distill")

T = TypeVar("T")
USER_ERRORS = (ConfigError, CheckpointError, UnknownModelError, FileNotFoundError)
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3


def guarded(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn``; on a user error print ``error: <message>`` and exit with status 2."""
    try:
        return fn(*args)
    except Preempted as err:  # a signal: the checkpoint is saved; exit 128 + signal number
        log.warning("%s", err)
        print(f"preempted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except NonFiniteLossError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except USER_ERRORS as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
