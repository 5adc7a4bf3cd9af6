"""The end-of-run report: model sizes, ``summary.json`` and the teacher/student table."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from distill.atomic import atomic_write_text


def make_console() -> Console:
    """A rich console; when output goes to a file or a job log, wide enough that tables don't wrap."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=160)


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what the artifact costs on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")


def _fmt_acc(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f} %"


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def print_comparison(summary: dict[str, Any], console: Console | None = None) -> None:
    """A rich table: one row per model (teacher, student, quantized student) with accuracy,
    parameters, size and, when measured, CPU latency at batch 1 and at the large batch."""
    s = summary["student"]
    batch = s.get("latency_batch_size")
    table = Table(title=f"distill: {summary['data']['name']} — teacher vs student")
    columns = ["model", "arch", "test acc", "params", "size (bytes)", "latency b=1 (ms)", f"latency b={batch or '-'} (ms)"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "arch") else "right")
    teacher = summary.get("teacher")
    if teacher:
        table.add_row(
            "teacher", teacher["arch"], _fmt_acc(teacher.get("test_acc")), _fmt_int(teacher.get("params")),
            _fmt_int(teacher.get("size_bytes")), _fmt_ms(teacher.get("latency_ms")), _fmt_ms(teacher.get("latency_ms_batch")),
        )
    if s.get("bits"):
        table.add_row(
            "student fp32", s["arch"], _fmt_acc(s.get("acc_fp32")), _fmt_int(s.get("params")),
            _fmt_int(s.get("size_bytes_fp32")), _fmt_ms(s.get("latency_ms_fp32")), _fmt_ms(s.get("latency_ms_fp32_batch")),
        )
        table.add_row(
            f"student int{s['bits']}", s["arch"], _fmt_acc(s.get("acc_quant")), _fmt_int(s.get("params")),
            _fmt_int(s.get("size_bytes_quant")), _fmt_ms(s.get("latency_ms_quant")), _fmt_ms(s.get("latency_ms_quant_batch")),
        )
    else:
        table.add_row("student", s["arch"], _fmt_acc(s.get("test_acc")), _fmt_int(s.get("params")), _fmt_int(s.get("size_bytes")),
                      _fmt_ms(s.get("latency_ms")), _fmt_ms(s.get("latency_ms_batch")))
    (console or make_console()).print(table)
    for line in pruning_lines(s):
        (console or make_console()).print(line, markup=False)
    if s.get("bits"):
        (console or make_console()).print(
            f"quantized student: {s['compression']:.2f}x smaller than fp32; artifact {s['artifact']} "
            f"(TorchScript: {s['torchscript']}); latency with {s['latency_threads']} thread(s)"
        )


def pruning_lines(student: dict[str, Any]) -> list[str]:
    """What pruning did, in words, for the end-of-run printout."""
    if not student.get("prune_method"):
        return []
    lines = [
        f"pruned ({student['prune_method']}): sparsity {100 * student['sparsity']:.2f} %, "
        f"{student['nonzero_params']:,} non-zero parameters, dense {student['size_bytes_dense']:,} bytes, "
        f"sparse (bitmask + non-zero values) {student['size_bytes_sparse']:,} bytes"
    ]
    if "macs_after" in student:
        lines.append(
            f"channels removed: {student['macs_before']:,} -> {student['macs_after']:,} MACs, "
            f"batch latency {student['latency_ms_batch_before_removal']:.3f} -> "
            f"{student['latency_ms_batch_after_removal']:.3f} ms ({student['speedup_batch']:.2f}x faster), "
            f"max |output difference| {student['max_abs_diff_after_removal']:.2e}"
        )
    return lines
