"""Compare finished runs: ``python evaluate.py runs=PATH`` (a multirun directory or run directories).

Reads every run's ``summary.json`` (and Hydra's ``.hydra/overrides.yaml`` for the swept settings),
and writes one row per run as Markdown and CSV: the settings that differ between runs, then the
accuracy / size / latency trade-off, with the Pareto-optimal runs marked (no other run is at
least as accurate *and* at least as small, or as fast, and better in one of the two). Runs that
have a Hydra config but no summary are listed as unfinished, never silently dropped.

Per run, ``acc``, ``size_bytes`` and ``latency_ms_batch`` are those of the run's deployed model
(``summary.json``'s ``deployed``: the converted integer model when quantized, the channel-removed
or sparse pruned model, the 16-bit, low-rank or shared-weight model, else the fp32 student). Each
deployable file the run wrote (``student.onnx``, ``student_int8.onnx``, ``student.pt2`` ...) follows
as a row of its own (``file``), with the figures measured from the file in its runtime.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from distill.report.pareto import pareto_front
from distill.report.plots import plot_groups, plot_tradeoff
from distill.report.seeds import group_by_seed, has_repeats, seeds_csv
from distill.report.seeds import to_markdown as seeds_markdown
from distill.report.summary import deployed_model
from distill.runtime.atomic import atomic_write_text

# (column, formatter) for the trade-off part of a row; values come from summary.json.
TRADE_OFF = [
    "student", "technique", "method", "bits", "sparsity", "teacher_acc", "acc_fp32", "acc", "size_bytes", "compression",
    "latency_ms", "latency_ms_batch", "latency_ms_fp32_batch", "macs", "speedup_batch",
    "pareto_size", "pareto_latency", "deployed", "file",
]
FILE_BITS = {"onnx": 32, "onnx_fp16": 16, "onnx_int8": 8, "torch_export": 32}  # summaries that do not record bits


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Every run directory under ``paths``: one holding summary.json or a Hydra config."""
    runs: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"runs: no such directory: {root}")
        for marker in ("summary.json", ".hydra/config.yaml"):
            runs.update(p.parent if marker == "summary.json" else p.parent.parent for p in root.rglob(marker))
    return sorted(runs, key=lambda p: (len(p.parts), str(p)))


def _overrides(run: Path) -> dict[str, str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item and not item.startswith("hydra."))


def read_summary(run: Path) -> dict[str, Any] | str:
    """A run's ``summary.json``, or its status when there is none to read (unfinished, corrupt summary)."""
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return "unfinished"
    try:
        return json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return "corrupt summary"


def run_row(run: Path, summary: dict[str, Any] | str | None = None) -> dict[str, Any]:
    """One run as a flat row: its overrides, its status and its trade-off numbers (``summary``: the
    run's :func:`read_summary`, when already read)."""
    row: dict[str, Any] = {"run": str(run), **{f"+{k}": v for k, v in _overrides(run).items()}}
    summary = read_summary(run) if summary is None else summary
    if isinstance(summary, str):
        return {**row, "status": summary}
    s, t = summary["student"], summary.get("teacher") or {}
    deployed = deployed_model(summary)
    fp32_size = s.get("size_bytes_fp32", s.get("size_bytes"))
    row.update(
        status="ok",
        student=s["arch"],
        technique=summary.get("technique") or technique(summary),
        method=method(summary.get("hparams", {})),
        seed=summary.get("hparams", {}).get("seed"),
        settings=settings_id(summary),
        bits=deployed.bits,
        teacher=t.get("arch"),
        teacher_acc=t.get("test_acc"),
        acc_fp32=s.get("acc_fp32", s.get("test_acc")),
        acc=deployed.acc,
        size_bytes=deployed.size_bytes,
        size_bytes_fp32=fp32_size,
        compression=fp32_size / deployed.size_bytes,
        latency_ms=deployed.latency_ms,
        latency_ms_batch=deployed.latency_ms_batch,
        latency_ms_fp32_batch=s.get("latency_ms_fp32_batch"),
        latency_batch_size=s.get("latency_batch_size"),
        latency_threads=s.get("latency_threads"),
        latency_device=deployed.latency_device,
        sparsity=s.get("sparsity"),
        macs=s.get("macs_after"),
        speedup_batch=s.get("speedup_batch"),
        teacher_size_bytes=t.get("size_bytes"),
        teacher_latency_ms_batch=t.get("latency_ms_batch"),
        deployed=deployed.kind,
        deployed_path=deployed.path,
    )
    return row


FEATURE_WEIGHTS = ("at_weight", "rkd_weight", "pkt_weight", "sp_weight", "crd_weight")


def settings_id(summary: dict[str, Any]) -> str:
    """What a run was, but for its seed: its recorded settings (``hparams``), data and teacher
    architecture, as one string (runs with equal ids differ at most in seed)."""
    hparams = {k: v for k, v in (summary.get("hparams") or {}).items() if k != "seed"}
    teacher = (summary.get("teacher") or {}).get("arch")
    return json.dumps({"hparams": hparams, "data": summary.get("data"), "teacher": teacher}, sort_keys=True, default=str)


def method(hparams: dict[str, Any]) -> str:
    """What the student learned from: the logit loss and the feature terms (``dkd``, ``kd+rkd``),
    ``ce`` for labels alone (kd with alpha 0 and no feature term); older summaries: ``kd``."""
    name = hparams.get("loss") or "kd"
    features = [key.removesuffix("_weight") for key in FEATURE_WEIGHTS if hparams.get(key)]
    if hparams.get("hint_weight"):
        features.insert(0, "fitnets")
    if name == "kd" and hparams.get("alpha") == 0:
        name = "ce"
    if hparams.get("ensemble"):  # several teachers: kd(ensemble of 2)
        name = f"{name}(ensemble of {1 + len(hparams['ensemble'])})"
    return "+".join([name, *features])


def technique(summary: dict[str, Any]) -> str:
    """An older summary's label of the compression its run applied, e.g. ``int8+prune0.7`` or
    ``fp32`` (newer runs store theirs as ``technique``)."""
    s, h = summary["student"], summary.get("hparams", {})
    parts = []
    if h.get("student_init"):
        parts.append(f"init:{h['student_init']}")
    if h.get("hint_weight"):
        parts.append("hints")
    if s.get("lowrank_layers"):
        parts.append(f"lowrank{h.get('lowrank'):g}" if h.get("lowrank") is not None else "lowrank")
    if s.get("sparsity") is not None and h.get("prune_method") not in (None, "none"):
        parts.append(f"prune{h.get('prune_amount'):g}")
    if s.get("sharing_bits"):
        parts.append(f"shared{s['sharing_bits']}b")
    if s.get("bits"):
        parts.append(f"int{s['bits']}")
    elif s.get("half_dtype"):
        parts.append(s["half_dtype"])
    return "+".join(parts) or "fp32"


def _display_name(run: Path, roots: list[Path]) -> str:
    for root in roots:
        if run == root:
            return run.name
        if root in run.parents:
            return str(run.relative_to(root))
    return str(run)


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Set ``pareto_size`` and ``pareto_latency`` on every finished row (accuracy vs each cost)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for cost in ("size", "latency"):
        key = "size_bytes" if cost == "size" else "latency_ms_batch"
        points = [(r["acc"], r[key]) if r.get(key) is not None and r.get("acc") is not None else None for r in ok]
        for row, on_front in zip(ok, pareto_front(points), strict=True):
            row[f"pareto_{cost}"] = on_front


def file_rows(summary: dict[str, Any] | str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per deployable file the run wrote (``summary.json``'s ``artifacts``: ONNX, torch.export),
    measured in its runtime, so the Pareto marks can pick the best file, not only the best PyTorch
    model. The in-process references (``pytorch``, ``pytorch_int8``) are the run's own row; a format
    that failed is listed with its error."""
    if isinstance(summary, str) or row.get("status") != "ok":
        return []
    shared = {k: v for k, v in row.items() if k.startswith("+") or k in ("student", "technique", "method", "seed", "settings",
                                                                         "teacher", "teacher_acc", "acc_fp32", "size_bytes_fp32")}
    out = []
    for a in summary.get("artifacts") or []:
        if a["format"] in ("pytorch", "pytorch_int8"):
            continue
        if a.get("error"):
            out.append({**shared, "run": row["run"], "file": a["format"], "status": f"failed: {a['error'][:80]}"})
            continue
        # Measured on the first export.eval_samples test samples only: listed, but not set against
        # runs measured on the whole split (off the Pareto front and the plots).
        partial = a.get("whole_split") is False
        out.append({
            **shared, "run": row["run"], "status": f"ok (first {a['test_samples']} test samples)" if partial else "ok",
            "file": a["format"], "bits": a.get("bits") or FILE_BITS.get(a["format"]), "test_samples": a.get("test_samples"),
            "acc": a["acc"], "size_bytes": a["size_bytes"], "compression": (row.get("size_bytes_fp32") or a["size_bytes"]) / a["size_bytes"],
            "latency_ms": a.get("latency_ms"), "latency_ms_batch": a.get("latency_ms_batch"), "latency_device": a.get("latency_device") or "cpu",
            "deployed": a["runtime"] + (" (!)" if a.get("flagged") else ""), "deployed_path": a["path"],
        })
    return out


def compare(paths: list[str | Path]) -> list[dict[str, Any]]:
    roots = [Path(p) for p in paths]
    rows = []
    for r in find_runs(paths):
        summary = read_summary(r)
        row = {**run_row(r, summary), "run": _display_name(r, roots)}
        rows += [row, *file_rows(summary, row)]
    if not rows:
        raise FileNotFoundError(f"runs: no run directories (with summary.json or .hydra/) under {', '.join(map(str, paths))}")
    mark_pareto(rows)
    return rows


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    # Only the overrides that differ between runs are worth a column.
    swept = sorted({k for r in rows for k in r if k.startswith("+")})
    swept = [k for k in swept if len({str(r.get(k)) for r in rows}) > 1 and k.lstrip("+") not in TRADE_OFF]
    return ["run", *swept, "status", *TRADE_OFF]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "★" if value else ""
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = table_columns(rows)
    header = [c.lstrip("+") for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    cols = table_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([c.lstrip("+") for c in cols])
    writer.writerows([[r.get(c, "") for c in cols] for r in rows])
    return buffer.getvalue()


def write_comparison(rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """comparison.md, comparison.csv and the two frontier plots (tradeoff_size.png, tradeoff_latency.png)."""
    out_dir = Path(out_dir)
    written = {
        "markdown": atomic_write_text(out_dir / "comparison.md", to_markdown(rows)),
        "csv": atomic_write_text(out_dir / "comparison.csv", to_csv(rows)),
    }
    for cost in ("size", "latency"):
        path = plot_tradeoff(rows, cost, out_dir / f"tradeoff_{cost}.png")
        if path is not None:
            written[f"plot_{cost}"] = path
    groups = group_by_seed(rows)
    if has_repeats(groups):  # runs that differ only in seed: their means, spreads and frontier
        written["seeds_markdown"] = atomic_write_text(out_dir / "comparison_seeds.md", seeds_markdown(groups))
        written["seeds_csv"] = atomic_write_text(out_dir / "comparison_seeds.csv", seeds_csv(groups))
        for cost in ("size", "latency"):
            path = plot_groups(groups, cost, out_dir / f"tradeoff_seeds_{cost}.png")
            if path is not None:
                written[f"plot_seeds_{cost}"] = path
    return written
