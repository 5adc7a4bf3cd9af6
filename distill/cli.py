"""Turn the errors a user can fix (bad config, missing or corrupt files) into one clear line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from distill.config.validate import check_creatable_directory
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


class RunDirectoryCheck(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): a run or sweep directory that cannot be a directory
    is a named error (exit 2) before Hydra tries to create it, not a ``FileExistsError`` traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)

    @staticmethod
    def _check(key: str, path: str) -> None:
        try:
            check_creatable_directory(key, path)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)


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
