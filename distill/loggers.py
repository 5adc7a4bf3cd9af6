"""Experiment loggers: CSV always, Weights & Biases online when credentials exist, offline otherwise.

W&B never prompts and never blocks training: in ``mode=auto`` the run is online only when
``WANDB_API_KEY`` is set or ``~/.netrc`` holds a key for the W&B host (what ``wandb login``
writes); otherwise it runs offline into ``<run dir>/wandb`` and can be uploaded later with
``wandb sync <run dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> online/offline; an explicit ``WANDB_MODE`` in the environment wins."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if mode != "auto":
        return mode
    return "online" if wandb_credentials_present() else "offline"


def build_loggers(cfg: DictConfig, output_dir: str | Path, run_config: dict[str, Any]) -> list[Logger]:
    loggers: list[Logger] = []
    lcfg = cfg.logger
    if lcfg.csv is not None:
        loggers.append(CSVLogger(save_dir=str(output_dir), name=lcfg.csv.name, version=""))
    if lcfg.wandb is not None:
        mode = resolve_wandb_mode(lcfg.wandb.mode)
        if mode == "disabled":
            return loggers
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        log.info("wandb: %s mode%s", mode, " (run `wandb sync` on the offline run to upload)" if mode == "offline" else "")
        loggers.append(
            WandbLogger(
                project=lcfg.wandb.project,
                entity=lcfg.wandb.entity,
                name=lcfg.wandb.name,
                group=lcfg.wandb.group,
                tags=list(lcfg.wandb.tags),
                save_dir=str(output_dir),
                mode=mode,
                log_model=bool(lcfg.wandb.log_model),
                config=run_config,
            )
        )
    return loggers
