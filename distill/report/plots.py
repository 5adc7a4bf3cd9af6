"""PNG plots of a sweep's trade-off: test accuracy against size, and against latency.

Every finished run is a point; the Pareto-optimal runs are joined by a step line (the frontier);
the teacher and the uncompressed (fp32) student are drawn as reference points. Rows come from
:func:`distill.report.comparison.compare`.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from distill.runtime.atomic import atomic_write


def _references(rows: list[dict[str, Any]], cost: str) -> list[tuple[str, float, float, str]]:
    """(label, accuracy %, cost, marker) for the teacher and each fp32 student architecture (from the
    runs' own rows: a run's deployable files, rows with a ``file``, are not runs)."""
    rows = [r for r in rows if not r.get("file")]
    refs = []
    scale = 1e-3 if cost == "size" else 1.0
    teacher = [r for r in rows if r.get("teacher_acc") is not None]
    t_cost = "teacher_size_bytes" if cost == "size" else "teacher_latency_ms_batch"
    if teacher and teacher[0].get(t_cost) is not None:
        refs.append((f"teacher ({teacher[0].get('teacher', 'fp32')})", 100 * teacher[0]["teacher_acc"], teacher[0][t_cost] * scale, "*"))
    for arch in sorted({r["student"] for r in rows}):
        plain = [r for r in rows if r["student"] == arch and r.get("technique") == "fp32"]
        if plain:  # runs of the uncompressed student: they are the reference
            label, accs = f"student fp32 ({arch})", [r["acc"] for r in plain]
            costs = [r.get("size_bytes") if cost == "size" else r.get("latency_ms_batch") for r in plain]
        else:  # else the fp32 weights of the compressed runs (each run trains its own): their median
            plain = [r for r in rows if r["student"] == arch and r.get("acc_fp32") is not None]
            label, accs = f"student fp32 weights ({arch}, median of {len(plain)} runs)", [r["acc_fp32"] for r in plain]
            costs = [r.get("size_bytes_fp32") if cost == "size" else r.get("latency_ms_fp32_batch") for r in plain]
        costs = [c for c in costs if c is not None]
        if accs and costs:
            refs.append((label, 100 * statistics.median(accs), statistics.median(costs) * scale, "D"))
    return refs


def plot_tradeoff(rows: list[dict[str, Any]], cost: str, path: str | Path) -> Path | None:
    """Accuracy vs ``cost`` ("size" or "latency") as a PNG at ``path``; None if nothing to plot."""
    import matplotlib  # deferred: heavy (~0.5 s), and only comparisons draw plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred, as matplotlib above

    key = "size_bytes" if cost == "size" else "latency_ms_batch"
    ok = [r for r in rows if r.get("status") == "ok" and r.get(key) is not None and r.get("acc") is not None]
    if not ok:
        return None
    scale = 1e-3 if cost == "size" else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    on = [r for r in ok if r.get(f"pareto_{cost}")]
    off = [r for r in ok if not r.get(f"pareto_{cost}")]
    ax.scatter([r[key] * scale for r in off], [100 * r["acc"] for r in off], c="tab:gray", s=30, label="run", zorder=2)
    front = sorted(on, key=lambda r: r[key])
    ax.step([r[key] * scale for r in front], [100 * r["acc"] for r in front], where="post", c="tab:red", lw=1.5, zorder=3)
    ax.scatter([r[key] * scale for r in front], [100 * r["acc"] for r in front], c="tab:red", s=45, label="Pareto-optimal run", zorder=4)
    for r in ok:
        label = r.get("technique") or f"{r['bits']}b"
        label = f"{label} [{r['file']}]" if r.get("file") else label
        ax.annotate(label, (r[key] * scale, 100 * r["acc"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for label, acc, x, marker in _references(ok, cost):
        ax.scatter([x], [acc], marker=marker, s=120, edgecolors="black", zorder=5, label=label)
    ax.set_xscale("log")
    if cost == "size":
        ax.set_xlabel("size of the deployed student (KB, log scale)")
        ax.set_title("Accuracy vs size")
    else:
        batch, threads = ok[0].get("latency_batch_size"), ok[0].get("latency_threads")
        devices = "/".join(sorted({(r.get("latency_device") or "cpu").upper() for r in ok}))  # CPU/CUDA: both in one plot
        ax.set_xlabel(f"{devices} latency per batch of {batch} (ms, {threads} thread(s), log scale)")
        ax.set_title("Accuracy vs latency")
    return _finish(plt, fig, ax, path)


def _finish(plt: Any, fig: Any, ax: Any, path: str | Path) -> Path:
    """The accuracy axis, grid and legend both plots share; the PNG written atomically, the figure closed."""
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_groups(groups: list[Any], cost: str, path: str | Path) -> Path | None:
    """Mean accuracy over seeds against the median ``cost``, with ± one standard deviation as error
    bars and the frontier on the means (``groups``: :class:`distill.report.seeds.SeedGroup`)."""
    import matplotlib  # deferred: heavy, and only comparisons draw plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred, as matplotlib above

    key = "size_bytes" if cost == "size" else "latency_ms_batch"
    shown = [g for g in groups if getattr(g, key) is not None]
    if not shown:
        return None
    scale = 1e-3 if cost == "size" else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for on_front, colour, label in ((False, "tab:gray", "setting (mean ± std over seeds)"), (True, "tab:red", "Pareto-optimal mean")):
        part = [g for g in shown if getattr(g, f"pareto_{cost}") == on_front]
        if part:
            ax.errorbar([getattr(g, key) * scale for g in part], [100 * g.acc_mean for g in part],
                        yerr=[100 * g.acc_std for g in part], fmt="o", color=colour, capsize=3, label=label, zorder=3)
    # the swept settings that tell groups apart (e.g. data.train_fraction), beside what each group is
    differ = sorted(k for k in {k for g in shown for k in g.settings} if len({g.settings.get(k) for g in shown}) > 1)
    for g in shown:
        extra = " ".join(f"{k.lstrip('+').split('.')[-1]}={g.settings[k]}" for k in differ if k in g.settings and k != "+loss")
        ax.annotate(f"{g.student} {g.method} {g.technique} {extra} (n={g.n})".replace("  ", " "),
                    (getattr(g, key) * scale, 100 * g.acc_mean), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("size of the deployed student (KB, log scale)" if cost == "size" else "latency per batch (ms, log scale)")
    ax.set_title(f"Accuracy vs {cost}, over seeds")
    return _finish(plt, fig, ax, path)
