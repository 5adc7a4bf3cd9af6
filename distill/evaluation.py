"""Evaluate a saved student: everything but the checkpoint path comes from the checkpoint itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from distill.compress.deploy import OnnxRuntimeModel, ProgramModel, exported_params, read_meta
from distill.compress.packing import is_xz, read_xz_payload
from distill.compress.registry import TECHNIQUES, after_load, rebuild_student
from distill.compress.technique import LoadedArtifact
from distill.data.datamodules import BaseDataModule, datamodule_from
from distill.errors import CheckpointError, ConfigError
from distill.measure.accuracy import accuracy_on_test_split
from distill.measure.size import count_parameters, serialized_size_bytes
from distill.models.registry import build_student
from distill.report.comparison import compare, table_columns, to_markdown, write_comparison
from distill.report.seeds import SeedGroup, group_by_seed, group_columns, has_repeats
from distill.report.seeds import to_markdown as seeds_markdown
from distill.report.table import make_console
from distill.runtime.atomic import atomic_write
from distill.runtime.checkpoint_io import load_checkpoint
from distill.runtime.console import quiet_third_party
from distill.runtime.loggers import resolve_wandb_mode, wandb_server_reachable

STUDENT_PREFIX = "student."


def load_student(path: str | Path, data_overrides: dict[str, Any] | None = None,
                 ckpt: dict[str, Any] | None = None) -> tuple[nn.Module, BaseDataModule, DictConfig]:
    """Rebuild the student and its data module from a distill checkpoint (``weights_only`` load).

    A student that a compression technique reshaped during training (QAT-prepared, factorized,
    weight-shared) is first given the same structure by that technique, from the run's config and
    the callback state in the checkpoint (:func:`distill.compress.registry.rebuild_student`)."""
    if Path(path).is_dir():  # a DeepSpeed (sharded) checkpoint directory
        path = consolidate_deepspeed_checkpoint(path)
    if ckpt is None:  # (evaluate_checkpoint passes the file it already read)
        ckpt = load_checkpoint(path, what="student checkpoint")
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"student checkpoint {path} was not written by distill's train.py (no config inside)")
    cfg = OmegaConf.create(config)
    datamodule = datamodule_from(cfg.data, data_overrides)
    shape = datamodule.shape
    example = torch.zeros(1, shape["channels"], shape["image_size"], shape["image_size"])
    student = rebuild_student(build_student(cfg.student, **shape), cfg, ckpt.get("callbacks") or {}, example)
    state = {k[len(STUDENT_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STUDENT_PREFIX)}
    # A pruned student stores ``<name>_orig`` and ``<name>_mask`` (torch.nn.utils.prune): bake them.
    for key in [k for k in state if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in state]:
        base = key[: -len("_orig")]
        state[base] = state.pop(key) * state.pop(base + "_mask")
    try:
        student.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"student checkpoint {path} does not match student={cfg.student.name}: {err}") from err
    return after_load(student, cfg).eval(), datamodule, cfg


def consolidate_deepspeed_checkpoint(directory: str | Path) -> Path:
    """A single-file fp32 Lightning checkpoint from a DeepSpeed checkpoint directory, written next
    to it as ``<dir>.consolidated.ckpt`` (once; reused when newer than the directory)."""
    directory = Path(directory)
    out = directory.with_name(directory.name + ".consolidated.ckpt")
    if out.is_file() and out.stat().st_mtime >= directory.stat().st_mtime:
        return out
    if not (directory / "latest").is_file() and not any(directory.glob("*/*model_states.pt")):
        raise CheckpointError(f"{directory} is a directory but not a DeepSpeed checkpoint")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # deferred: it imports DeepSpeed, which picks its accelerator (DS_ACCELERATOR) at import
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    tmp = out.with_name("." + out.name + ".partial")
    convert_zero_checkpoint_to_fp32_state_dict(str(directory), str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    atomic_write(out, lambda fh: fh.write(data))
    return out


def load_artifact(path: str | Path, data_overrides: dict[str, Any] | None = None) -> LoadedArtifact:
    """Any file a run writes, loaded for evaluation: a technique's deployed file (the quantized,
    sparse, shared-weight or 16-bit student; each technique recognizes its own), else a training
    checkpoint or a DeepSpeed checkpoint directory. The file is read once."""
    path, overrides = Path(path), data_overrides or {}
    payload = None
    if path.is_file() and path.suffix in (".onnx", ".pt2"):
        return load_exported(path, overrides)
    if path.is_file():
        payload = read_xz_payload(path) if is_xz(path) else load_checkpoint(path, what="student checkpoint")
        for technique in TECHNIQUES.values():
            loaded = technique.load_artifact(path, payload, overrides)
            if loaded is not None:
                return loaded
        if is_xz(path):
            raise CheckpointError(f"{path} is not a distill artifact (format {payload.get('format')!r})")
    model, datamodule, run_cfg = load_student(path, overrides, ckpt=payload)
    bits = (run_cfg.get("quant") or {}).get("bits")
    kind = f"{bits}-bit QAT (fake-quant)" if bits else "fp32"
    return LoadedArtifact(model, datamodule, run_cfg.student.name, run_cfg.data.name, kind, count_parameters(model),
                          serialized_size_bytes(model))


def load_exported(path: Path, overrides: dict[str, Any]) -> LoadedArtifact:
    """An ONNX file (run in ONNX Runtime) or a torch.export program, with the data config it carries."""
    try:
        meta = read_meta(path)
    except Exception as err:  # noqa: BLE001 (a truncated or foreign file: onnx's and torch's errors vary)
        raise CheckpointError(f"{path}: cannot read it as an exported model ({type(err).__name__}: {str(err)[:200]})") from err
    if meta is None:
        raise CheckpointError(f"{path}: carries no distill run config (it was not written by a distill run); "
                              "evaluate it with its own data instead")
    try:
        model: nn.Module = OnnxRuntimeModel(path, torch.get_num_threads()) if path.suffix == ".onnx" else ProgramModel(path)
    except Exception as err:  # noqa: BLE001 (ONNX Runtime's and torch's load errors vary)
        raise CheckpointError(f"{path}: cannot load it in its runtime ({type(err).__name__}: {str(err)[:200]})") from err
    runtime = f"onnx ({model.provider})" if isinstance(model, OnnxRuntimeModel) else "torch.export"
    return LoadedArtifact(model, datamodule_from(meta["data"], overrides), str(meta["student"]["name"]), str(meta["data"]["name"]),
                          runtime, exported_params(path), path.stat().st_size, cpu_only=True)


def evaluate_checkpoint(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    """Test accuracy, parameters and size of a training checkpoint or of a deployed file."""
    overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else {}
    if cfg.batch_size:
        overrides["batch_size"] = cfg.batch_size
    path = Path(cfg.ckpt_path)
    a = load_artifact(path, overrides)
    result = {
        "checkpoint": str(path),
        "student": a.arch,
        "kind": a.kind,
        "data": a.data,
        "test_acc": accuracy_on_test_split(a.model, a.datamodule, "cpu" if a.cpu_only else cfg.accelerator),
        "params": a.params,
        "size_bytes": a.size_bytes,
    }
    table = Table(title=f"evaluate: {path.name}")
    for col in ("student", "kind", "data", "test acc", "params", "size (bytes)"):
        table.add_column(col, justify="left" if col in ("student", "kind", "data") else "right")
    table.add_row(a.arch, a.kind, a.data, f"{100 * result['test_acc']:.2f} %", f"{a.params:,}", f"{a.size_bytes:,}")
    (console or make_console()).print(table)
    return result


def compare_runs(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    """``runs=PATH``: the trade-off table of finished runs, printed and written as Markdown and CSV."""
    paths = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    rows = compare(paths)
    written = write_comparison(rows, cfg.out_dir or paths[0])
    out = console or make_console()
    out.print(to_markdown(rows), markup=False)
    groups = group_by_seed(rows)
    if has_repeats(groups):
        out.print("over seeds (runs that differ only in seed):", markup=False)
        out.print(seeds_markdown(groups), markup=False)
    for kind, path in written.items():
        out.print(f"{kind}: {path}", markup=False)
    result = {"rows": rows, "groups": [g.row() for g in groups] if has_repeats(groups) else [],
              "files": {k: str(v) for k, v in written.items()}}
    if cfg.wandb.project:
        result["wandb_run"] = push_comparison(rows, written, cfg.wandb, Path(cfg.out_dir or paths[0]), groups)
        out.print(f"wandb: {result['wandb_run']}", markup=False)
    return result


def push_comparison(rows: list[dict[str, Any]], files: dict[str, Path], wcfg: DictConfig, out_dir: Path,
                    groups: list[SeedGroup] | None = None) -> str:
    """The comparison as one W&B run (job_type "comparison"): the table and both frontier plots, and,
    when settings were run over several seeds, the table over seeds (``comparison_seeds``: mean, std
    and n of the accuracy, median size and latency, the frontier on the means) and its plots.
    Online when logged in and the server answers; offline otherwise (``wandb sync`` later)."""
    import wandb  # deferred: heavy, and only a comparison pushed to W&B needs it

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
    if groups and has_repeats(groups):
        group_cols = group_columns(groups)
        payload["comparison_seeds"] = wandb.Table(columns=[c.lstrip("+") for c in group_cols],
                                                  data=[[_plain(g.row().get(c)) for c in group_cols] for g in groups])
    for kind in ("plot_size", "plot_latency", "plot_seeds_size", "plot_seeds_latency"):
        if kind in files:
            payload[kind] = wandb.Image(str(files[kind]))
    run.log(payload)
    run.finish()
    return f"{mode} run {run.id} in {out_dir / 'wandb'}" if mode == "offline" else run.url or run.id


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """``evaluate.py``: one checkpoint (``ckpt_path=``) or a comparison of runs (``runs=``)."""
    quiet_third_party()
    if bool(cfg.ckpt_path) == bool(cfg.runs):
        raise ConfigError("evaluate.py needs exactly one of ckpt_path=PATH (a student) or runs=PATH (runs to compare)")
    return evaluate_checkpoint(cfg) if cfg.ckpt_path else compare_runs(cfg)
