"""The end-of-run table: teacher, student and deployed model, printed from the summary's figures."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.report.summary import deployed_model


def make_console() -> Console:
    """A rich console; when output goes to a file or a job log, wide enough that tables don't wrap."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _fmt_acc(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f} %"


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_ms(ms: float | None, where: str = "") -> str:
    return "-" if ms is None else f"{ms:.3f}{where}"


def print_comparison(summary: dict[str, Any], console: Console | None = None, notes: list[str] | None = None) -> None:
    """A rich table from the summary's own figures: the teacher, the student as trained, and the
    model the run deploys (when a compression technique made one), with accuracy, parameters, size
    and CPU latency at batch 1 and at the large batch; then ``notes`` (what each technique did, in words)."""
    s, teacher, deployed = summary["student"], summary.get("teacher"), deployed_model(summary)
    batch, device = s.get("latency_batch_size"), s.get("latency_device", "cpu")
    table = Table(title=f"distill: {summary['data']['name']} — teacher vs student")
    columns = ["model", "arch", "test acc", "params", "size (bytes)", f"latency b=1 (ms, {device})",
               f"latency b={batch or '-'} (ms, {device})"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "arch") else "right")
    if teacher:
        table.add_row(
            "teacher", teacher["arch"], _fmt_acc(teacher.get("test_acc")), _fmt_int(teacher.get("params")),
            _fmt_int(teacher.get("size_bytes")), _fmt_ms(teacher.get("latency_ms")), _fmt_ms(teacher.get("latency_ms_batch")),
        )
    top1 = _fmt_acc(s.get("test_acc")) + (f" (top-5 {_fmt_acc(s['test_acc5'])})" if s.get("test_acc5") is not None else "")
    table.add_row("student", s["arch"], top1, _fmt_int(s.get("params")), _fmt_int(s.get("size_bytes")),
                  _fmt_ms(s.get("latency_ms")), _fmt_ms(s.get("latency_ms_batch")))
    if deployed.kind != "fp32":
        # An int8 model is timed on CPU even in a GPU run: its figures then say so.
        where = "" if deployed.latency_device in (None, device) else f" ({deployed.latency_device})"
        table.add_row(f"student {deployed.kind}", s["arch"], _fmt_acc(deployed.acc), _fmt_int(deployed.params),
                      _fmt_int(deployed.size_bytes), _fmt_ms(deployed.latency_ms, where), _fmt_ms(deployed.latency_ms_batch, where))
    for artifact in summary.get("artifacts") or []:  # the deployable files, measured in their runtimes (on CPU)
        if artifact.get("format") in ("pytorch", "pytorch_int8"):  # the references: the student rows above
            continue
        if artifact.get("error"):
            table.add_row(f"file {artifact['format']}", "failed", artifact["error"][:60], "", "", "", "")
            continue
        flag = " (!)" if artifact.get("flagged") else ""
        where = artifact.get("latency_device") or "cpu"
        table.add_row(f"file {artifact['format']}", artifact["runtime"], _fmt_acc(artifact.get("acc")) + flag, "",
                      _fmt_int(artifact.get("size_bytes")), _fmt_ms(artifact.get("latency_ms"), f" ({where})"),
                      _fmt_ms(artifact.get("latency_ms_batch"), f" ({where})"))
    out = console or make_console()
    out.print(table)
    if any(a.get("flagged") for a in summary.get("artifacts") or []):
        out.print("(!): the file's accuracy in its runtime differs from the PyTorch model's by more than "
                  "export.max_acc_drop", markup=False)
    if deployed.kind != "fp32" and deployed.path:
        out.print(f"deployed model: {deployed.path}", markup=False)
    for line in notes or []:
        out.print(line, markup=False)
    if summary["data"].get("test_split", "test") != "test":
        out.print(f"note: {summary['data']['name']} has no test split: the test accuracies above are measured on "
                  f"its {summary['data']['test_split']} split", markup=False)
