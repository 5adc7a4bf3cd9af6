"""A clean console: the run's own lines, the progress bar and the table, not avoidable third-party noise.

What is dropped, each by its exact text and source (nothing of this package's, and no warning that
asks the user to do something about their run):
- Lightning's advertisements for its hosted services (``💡 Tip: ... litlogger`` / ``litmodels``);
- Lightning's ``Loading `train_dataloader` to estimate number of stepping batches`` (the optimizer's
  schedule asks for the step count; nothing is wrong);
- Lightning's own use of a PyTorch-deprecated pytree class (a ``FutureWarning`` about Lightning's
  code, which the user can do nothing about);
- W&B's "The anonymous setting has no effect" (Lightning's ``WandbLogger`` always passes it, as None:
  see :func:`drop_wandb_anonymous`);
- the second copy of every Lightning log line (``INFO: Seed set to 0`` beside Hydra's own line):
  the ``lightning`` package adds a console handler of its own when imported, and the records also
  reach the root logger that Hydra configured. Called after Lightning is imported.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

DROPPED_LIGHTNING_INFO = ("💡 Tip:", "Loading `train_dataloader` to estimate number of stepping batches")
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _DropThirdPartyNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DROPPED_LIGHTNING_INFO)


_FILTER = _DropThirdPartyNoise()


def quiet_third_party() -> None:
    """Install the filters above (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")
    if logging.getLogger().handlers:  # logging is configured (Hydra's job logging): it prints Lightning's records once
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True  # (Lightning stops propagation where it added its handler)


def drop_wandb_anonymous(logger: Any) -> Any:
    """Lightning's ``WandbLogger`` passes ``anonymous=None`` to ``wandb.init``, which warns that the
    setting has no effect; not passing it is the same run."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger
