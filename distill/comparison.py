"""Compare finished runs: ``python evaluate.py runs=PATH`` (a multirun directory or run directories).

Reads every run's ``summary.json`` (and Hydra's ``.hydra/overrides.yaml`` for the swept settings),
and writes one row per run as Markdown and CSV: the settings that differ between runs, then the
accuracy / size / latency trade-off. Runs that have a Hydra config but no summary are listed as
unfinished, never silently dropped.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from distill.atomic import atomic_write_text

# (column, formatter) for the trade-off part of a row; values come from summary.json.
TRADE_OFF = [
    "student", "bits", "sparsity", "teacher_acc", "acc_fp32", "acc", "size_bytes", "compression",
    "size_bytes_sparse", "latency_ms", "latency_ms_batch", "latency_ms_fp32_batch", "macs", "speedup_batch",
]


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
    import yaml

    items = yaml.safe_load(path.read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item and not item.startswith("hydra."))


def run_row(run: Path) -> dict[str, Any]:
    """One run as a flat row: its overrides, its status and its trade-off numbers."""
    row: dict[str, Any] = {"run": str(run), **{f"+{k}": v for k, v in _overrides(run).items()}}
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return {**row, "status": "unfinished"}
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return {**row, "status": "corrupt summary"}
    s, t = summary["student"], summary.get("teacher") or {}
    quantized = bool(s.get("bits"))
    row.update(
        status="ok",
        student=s["arch"],
        bits=s.get("bits") or 32,
        teacher_acc=t.get("test_acc"),
        acc_fp32=s.get("acc_fp32", s.get("test_acc")),
        acc=s["acc_quant"] if quantized else s["test_acc"],
        size_bytes=s["size_bytes_quant"] if quantized else s["size_bytes"],
        compression=s.get("compression", 1.0),
        latency_ms=s.get("latency_ms_quant"),
        latency_ms_batch=s.get("latency_ms_quant_batch"),
        latency_ms_fp32_batch=s.get("latency_ms_fp32_batch"),
        sparsity=s.get("sparsity"),
        size_bytes_sparse=s.get("size_bytes_sparse"),
        macs=s.get("macs_after"),
        speedup_batch=s.get("speedup_batch"),
    )
    return row


def _display_name(run: Path, roots: list[Path]) -> str:
    for root in roots:
        if run == root:
            return run.name
        if root in run.parents:
            return str(run.relative_to(root))
    return str(run)


def compare(paths: list[str | Path]) -> list[dict[str, Any]]:
    roots = [Path(p) for p in paths]
    rows = [{**run_row(r), "run": _display_name(r, roots)} for r in find_runs(paths)]
    if not rows:
        raise FileNotFoundError(f"runs: no run directories (with summary.json or .hydra/) under {', '.join(map(str, paths))}")
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    # Only the overrides that differ between runs are worth a column.
    swept = sorted({k for r in rows for k in r if k.startswith("+")})
    swept = [k for k in swept if len({str(r.get(k)) for r in rows}) > 1]
    return ["run", *swept, "status", *TRADE_OFF]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = _columns(rows)
    header = [c.lstrip("+") for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    cols = _columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([c.lstrip("+") for c in cols])
    writer.writerows([[r.get(c, "") for c in cols] for r in rows])
    return buffer.getvalue()


def write_comparison(rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "markdown": atomic_write_text(out_dir / "comparison.md", to_markdown(rows)),
        "csv": atomic_write_text(out_dir / "comparison.csv", to_csv(rows)),
    }
