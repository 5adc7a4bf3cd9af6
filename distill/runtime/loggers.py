"""Experiment loggers: CSV always, Weights & Biases online when credentials exist, offline otherwise.

W&B never prompts and never blocks training: in ``mode=auto`` the run is online only when
``WANDB_API_KEY`` is set or ``~/.netrc`` holds a key for the W&B host (what ``wandb login``
writes); otherwise it runs offline into ``<run dir>/wandb`` and can be uploaded later with
``wandb sync <run dir>/wandb/offline-run-*``. With credentials but no reachable server (a cluster
without internet), the run goes offline after a bounded wait (``SERVER_TIMEOUT_S``), with a warning.

Runs are named, tagged and grouped from the config (:func:`run_identity`), so one sweep's runs sit
together in the dashboard and can be filtered by teacher, student, bits, pruning and dataset.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig

from distill.runtime.console import drop_wandb_anonymous

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


SERVER_TIMEOUT_S = 10.0  # connecting to the W&B server; then wandb.init's own init_timeout


def wandb_server_reachable(timeout: float = SERVER_TIMEOUT_S) -> bool:
    """A TCP connection to the W&B server within ``timeout``; behind an HTTP(S) proxy, assumed
    (wandb.init's own timeout and the offline fallback then apply)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def run_identity(cfg: DictConfig, method: str = "kd", teacher_used: bool = True) -> dict[str, Any]:
    """W&B name, group and tags from the config (explicit ``logger.wandb.*`` settings win).

    Name: ``<teacher>-<student>-<data>[-int<bits>][-<prune><amount>[-<criterion>]][-<method>]-T<temperature>-a<alpha>``
    (``method``: the loss label, named when it is not ``kd``; ``teacher_used``: whether the loss reads a teacher).
    Group: the multirun sweep directory's name, so the runs of one sweep sit together."""
    w = cfg.logger.wandb
    teacher = cfg.teacher.name if teacher_used else "none"
    parts = [teacher, cfg.student.name, cfg.data.name]
    if cfg.quant.bits:
        parts.append(f"int{cfg.quant.bits}")
    criterion = f"-{cfg.prune.importance}" if cfg.prune.importance != "magnitude" else ""
    if cfg.prune.method != "none":
        parts.append(f"{cfg.prune.method}{cfg.prune.amount:g}{criterion}")
    parts += [method] if method != "kd" else []
    parts += [f"T{cfg.loss.temperature:g}", f"a{cfg.loss.alpha:g}"]
    tags = [f"teacher:{teacher}", f"student:{cfg.student.name}", f"bits:{cfg.quant.bits or 32}",
            f"prune:{cfg.prune.method}" + (f"-{cfg.prune.amount:g}{criterion}" if cfg.prune.method != "none" else ""),
            f"data:{cfg.data.name}", f"loss:{method}", *w.tags]
    group = w.group
    if group is None and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = f"{cfg.task_name}-{Path(HydraConfig.get().sweep.dir).name}"
        parts.append(f"#{HydraConfig.get().job.num}")
    return {"name": w.name or "-".join(parts), "group": group, "tags": tags}


def build_loggers(cfg: DictConfig, output_dir: str | Path, run_config: dict[str, Any], method: str = "kd",
                  teacher_used: bool = True) -> list[Logger]:
    loggers: list[Logger] = []
    lcfg = cfg.logger
    if lcfg.csv is not None:
        loggers.append(CSVLogger(save_dir=str(output_dir), name=lcfg.csv.name, version=""))
    if lcfg.wandb is not None:
        mode = resolve_wandb_mode(lcfg.wandb.mode)
        if mode == "disabled":
            return loggers
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode == "online" and not wandb_server_reachable():
            log.warning("wandb: credentials found but the W&B server is unreachable; running offline "
                        "(upload later with `wandb sync %s/wandb/offline-run-*`)", output_dir)
            mode = "offline"
        log.info("wandb: %s mode%s", mode, " (run `wandb sync` on the offline run to upload)" if mode == "offline" else "")
        import wandb  # deferred: heavy, and only runs that log to W&B need it

        logger = WandbLogger(
            project=lcfg.wandb.project, entity=lcfg.wandb.entity, **run_identity(cfg, method, teacher_used), save_dir=str(output_dir),
            mode=mode, log_model=False,  # the model artifact is uploaded at the end (pipeline.py)
            config=run_config, settings=wandb.Settings(init_timeout=60, silent=True),
        )
        drop_wandb_anonymous(logger)
        if mode == "online":
            try:
                _ = logger.experiment  # start the run now: a server that accepts TCP but fails the API
            except Exception as err:  # any wandb failure: fall back offline, never stop training
                log.warning("wandb: online start failed (%s); running offline", err)
                logger = WandbLogger(project=lcfg.wandb.project, entity=lcfg.wandb.entity, **run_identity(cfg, method, teacher_used),
                                     save_dir=str(output_dir), mode="offline", log_model=False, config=run_config)
                drop_wandb_anonymous(logger)
        loggers.append(logger)
    return loggers
