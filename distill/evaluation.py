"""Evaluate a saved student: everything but the checkpoint path comes from the checkpoint itself."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from distill.checkpoint_io import CheckpointError, load_checkpoint
from distill.config import ConfigError
from distill.data import BaseDataModule, build_datamodule
from distill.models import build_student, count_parameters
from distill.report import make_console, serialized_size_bytes

STUDENT_PREFIX = "student."


def load_student(path: str | Path, data_overrides: dict[str, Any] | None = None) -> tuple[nn.Module, BaseDataModule, DictConfig]:
    """Rebuild the student and its data module from a distill checkpoint (``weights_only`` load).

    A checkpoint taken during quantization-aware training holds the QAT student (fake quantizers
    with their scales); it is prepared the same way before its weights are loaded."""
    if Path(path).is_dir():  # a DeepSpeed (sharded) checkpoint directory
        path = consolidate_deepspeed_checkpoint(path)
    ckpt = load_checkpoint(path, what="student checkpoint")
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"student checkpoint {path} was not written by distill's train.py (no config inside)")
    cfg = OmegaConf.create(config)
    data_cfg = OmegaConf.merge(cfg.data, data_overrides or {})
    datamodule = build_datamodule(data_cfg)
    student = build_student(cfg.student, **datamodule.shape)
    quant = cfg.get("quant")
    if quant is not None and quant.get("bits"):
        from distill.quant_backend import prepare_qat

        shape = datamodule.shape
        example = torch.zeros(1, shape["channels"], shape["image_size"], shape["image_size"])
        student = prepare_qat(student, quant.bits, quant.per_channel, example, quant.backend)
    # A student that low-rank factorization or weight sharing reshaped during training: the same
    # shape first, from the callback's saved state.
    for name, cb_state in (ckpt.get("callbacks") or {}).items():
        if name.startswith("LowRankFactorization") and cb_state.get("ranks"):
            from distill.lowrank import apply_ranks

            apply_ranks(student, cb_state["ranks"])
        if name.startswith("WeightSharing") and cb_state.get("layers"):
            from distill.weight_sharing import share_weights

            share_weights(student, cb_state["bits"], cb_state["layers"], placeholders=True, codebook_sizes=cb_state.get("codebook_sizes"))
    state = {k[len(STUDENT_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STUDENT_PREFIX)}
    # A pruned student stores ``<name>_orig`` and ``<name>_mask`` (torch.nn.utils.prune): bake them.
    for key in [k for k in state if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in state]:
        base = key[: -len("_orig")]
        state[base] = state.pop(key) * state.pop(base + "_mask")
    try:
        student.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"student checkpoint {path} does not match student={cfg.student.name}: {err}") from err
    if quant is not None and quant.get("bits"):
        from distill.quant_backend import set_observers

        set_observers(student, False)  # evaluate with the trained scales; never re-calibrate on test data
    return student.eval(), datamodule, cfg


def consolidate_deepspeed_checkpoint(directory: str | Path) -> Path:
    """A single-file fp32 Lightning checkpoint from a DeepSpeed checkpoint directory, written next
    to it as ``<dir>.consolidated.ckpt`` (once; reused when newer than the directory)."""
    import os

    directory = Path(directory)
    out = directory.with_name(directory.name + ".consolidated.ckpt")
    if out.is_file() and out.stat().st_mtime >= directory.stat().st_mtime:
        return out
    if not (directory / "latest").is_file() and not any(directory.glob("*/*model_states.pt")):
        raise CheckpointError(f"{directory} is a directory but not a DeepSpeed checkpoint")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from distill.atomic import atomic_write

    tmp = out.with_name("." + out.name + ".partial")
    convert_zero_checkpoint_to_fp32_state_dict(str(directory), str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    atomic_write(out, lambda fh: fh.write(data))
    return out


def load_quantized_student(path: str | Path, data_overrides: dict[str, Any] | None = None) -> tuple[nn.Module, BaseDataModule, dict[str, Any]]:
    """The converted integer student from a ``student_quant.pt`` artifact, and its data module."""
    from distill.quant_artifact import load_quantized

    model, meta = load_quantized(path)
    if not meta.get("data"):
        raise CheckpointError(f"quantized student {path} does not record its data settings; cannot evaluate it")
    datamodule = build_datamodule(OmegaConf.merge(OmegaConf.create(meta["data"]), data_overrides or {}))
    return model, datamodule, meta


@torch.inference_mode()
def loader_accuracy(model: nn.Module, loader: Iterable, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over every batch of ``loader``."""
    model = model.to(device).eval()
    correct = total = 0
    for x, y, *_ in loader:
        pred = model(x.to(device)).argmax(dim=1)
        correct += int((pred == y.to(device)).sum())
        total += len(y)
    if total == 0:
        raise ValueError("the test split is empty")
    return correct / total


def accuracy_on_test_split(model: nn.Module, datamodule: BaseDataModule, device: str = "cpu") -> float:
    datamodule.setup("test")
    return loader_accuracy(model, datamodule.test_dataloader(), device)


def evaluate_checkpoint(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    """Test accuracy, parameters and size of a training checkpoint or a quantized artifact."""
    from distill.quant_artifact import is_quantized_artifact

    overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else {}
    if cfg.batch_size:
        overrides["batch_size"] = cfg.batch_size
    path = Path(cfg.ckpt_path)
    if path.is_file() and is_quantized_artifact(path):
        model, datamodule, meta = load_quantized_student(path, overrides)
        arch, data_name, kind = meta["student"]["name"], meta["data"]["name"], f"{meta['bits']}-bit quantized"
        params = count_parameters(build_student(OmegaConf.create(meta["student"]), **meta["shape"]))
        size = path.stat().st_size
    else:
        model, datamodule, run_cfg = load_student(path, overrides)
        bits = (run_cfg.get("quant") or {}).get("bits")
        arch, data_name = run_cfg.student.name, run_cfg.data.name
        kind = f"{bits}-bit QAT (fake-quant)" if bits else "fp32"
        params, size = count_parameters(model), serialized_size_bytes(model)
    device = cfg.accelerator if kind == "fp32" or "QAT" in kind else "cpu"  # int8 kernels are CPU-only
    result = {
        "checkpoint": str(path),
        "student": arch,
        "kind": kind,
        "data": data_name,
        "test_acc": accuracy_on_test_split(model, datamodule, device),
        "params": params,
        "size_bytes": size,
    }
    table = Table(title=f"evaluate: {path.name}")
    for col in ("student", "kind", "data", "test acc", "params", "size (bytes)"):
        table.add_column(col, justify="left" if col in ("student", "kind", "data") else "right")
    table.add_row(arch, kind, data_name, f"{100 * result['test_acc']:.2f} %", f"{params:,}", f"{size:,}")
    (console or make_console()).print(table)
    return result


def compare_runs(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    """``runs=PATH``: the trade-off table of finished runs, printed and written as Markdown and CSV."""
    from distill.comparison import compare, to_markdown, write_comparison

    paths = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    rows = compare(paths)
    written = write_comparison(rows, cfg.out_dir or paths[0])
    out = console or make_console()
    out.print(to_markdown(rows), markup=False)
    for kind, path in written.items():
        out.print(f"{kind}: {path}", markup=False)
    result = {"rows": rows, "files": {k: str(v) for k, v in written.items()}}
    if cfg.wandb.project:
        result["wandb_run"] = push_comparison(rows, written, cfg.wandb, Path(cfg.out_dir or paths[0]))
        out.print(f"wandb: {result['wandb_run']}", markup=False)
    return result


def push_comparison(rows: list[dict[str, Any]], files: dict[str, Path], wcfg: DictConfig, out_dir: Path) -> str:
    """The comparison as one W&B run (job_type "comparison"): the table and both frontier plots.
    Online when logged in and the server answers; offline otherwise (``wandb sync`` later)."""
    import wandb

    from distill.comparison import table_columns
    from distill.loggers import resolve_wandb_mode, wandb_server_reachable

    mode = resolve_wandb_mode(wcfg.mode)
    if mode == "online" and not wandb_server_reachable():
        mode = "offline"
    columns = [c.lstrip("+") for c in table_columns(rows)]
    table = wandb.Table(columns=columns, data=[[_plain(r.get(c, r.get("+" + c))) for c in columns] for r in rows])
    def start(mode: str) -> Any:
        return wandb.init(project=wcfg.project, entity=wcfg.entity, job_type="comparison", name=wcfg.name,
                          dir=str(out_dir), mode=mode, settings=wandb.Settings(init_timeout=60, silent=True))

    try:
        run = start(mode)
    except Exception:  # an online start that fails: keep the comparison, offline
        if mode == "offline":
            raise
        mode = "offline"
        run = start(mode)
    payload: dict[str, Any] = {"comparison": table}
    for kind in ("plot_size", "plot_latency"):
        if kind in files:
            payload[kind] = wandb.Image(str(files[kind]))
    run.log(payload)
    run.finish()
    return f"{mode} run {run.id} in {out_dir / 'wandb'}" if mode == "offline" else run.url or run.id


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """``evaluate.py``: one checkpoint (``ckpt_path=``) or a comparison of runs (``runs=``)."""
    if bool(cfg.ckpt_path) == bool(cfg.runs):
        raise ConfigError("evaluate.py needs exactly one of ckpt_path=PATH (a student) or runs=PATH (runs to compare)")
    return evaluate_checkpoint(cfg) if cfg.ckpt_path else compare_runs(cfg)
