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


def leave_process_group() -> None:
    """Destroy this rank's process group, if it has one, before the process exits on an error.

    Left to the interpreter's shutdown, the group's C++ threads (gloo's workers, rank 0's TCPStore
    server) can be destroyed while still joinable, and the process then dies of SIGABRT
    ("terminate called without an active exception", seen once in CI on a DDP NaN stop) instead
    of exiting with the status a scheduler or sweep reads. Every rank raises the same error at the
    same step (the decisions are collective), so each leaves its group here; gloo's destroy is local.
    """
    if "torch.distributed" not in sys.modules:  # no torch imported (a config error): nothing to do
        return
    import torch.distributed as dist  # deferred: imported already (checked above); cli stays torch-free

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # never in the way of the exit status
            log.debug("destroy_process_group failed: %s", err)


def guarded(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn``; on a user error print ``error: <message>`` and exit with status 2 (3 for a
    non-finite loss, 128 + signal when preempted)."""
    try:
        return fn(*args)
    except Preempted as err:  # a signal: the checkpoint is saved; exit 128 + signal number
        log.warning("%s", err)
        print(f"preempted: {err}", file=sys.stderr)
        leave_process_group()
        sys.exit(err.exit_code)
    except NonFiniteLossError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        leave_process_group()
        sys.exit(EXIT_NONFINITE)
    except USER_ERRORS as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        leave_process_group()
        sys.exit(EXIT_USER_ERROR)
