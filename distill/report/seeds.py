"""Runs that differ only in ``seed``, grouped: mean ± standard deviation of the accuracy over the
seeds, the median size and latency, and the Pareto frontier on the means.

A 360-image test split moves by 0.28 points per image, so single runs of two methods often differ by
less than one run differs from another of the same method under a new seed. The groups say how many
seeds (``n``) stand behind each mean, and the spread (sample standard deviation, n - 1) beside it.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from distill.report.pareto import pareto_front

SEED_KEYS = ("+seed", "++seed", "+++seed")  # seed=, +seed=, ++seed= overrides, as run rows name them
log = logging.getLogger("distill")


@dataclass
class SeedGroup:
    """One setting over its seeds."""

    settings: dict[str, str]  # the swept settings that define the group (every one but the seed)
    student: str
    technique: str
    method: str
    seeds: list[Any]
    runs: list[str]
    acc_mean: float
    acc_std: float  # sample standard deviation (0 for a single run)
    size_bytes: float | None  # medians over the seeds
    latency_ms_batch: float | None
    pareto_size: bool = False
    pareto_latency: bool = False
    acc: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runs)

    def row(self) -> dict[str, Any]:
        """The group as a flat table row (settings first, with their ``+`` prefix as in run rows)."""
        return {**self.settings, "student": self.student, "technique": self.technique, "method": self.method, "n": self.n,
                "acc_mean": self.acc_mean, "acc_std": self.acc_std, "size_bytes": self.size_bytes,
                "latency_ms_batch": self.latency_ms_batch, "pareto_size": self.pareto_size,
                "pareto_latency": self.pareto_latency, "seeds": " ".join(map(str, self.seeds))}


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _one_per_seed(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first run of each seed: a second run of the same seed (a re-run, or one run reached
    through two ``runs=`` paths) is not an independent sample; it is dropped with a warning."""
    seen: dict[Any, str] = {}
    kept = []
    for row in members:
        seed = row.get("seed")
        if seed is not None and seed in seen:
            log.warning("compare: %s repeats seed %s of %s; counted once", row["run"], seed, seen[seed])
            continue
        seen.setdefault(seed, row["run"])
        kept.append(row)
    return kept


def group_by_seed(rows: list[dict[str, Any]]) -> list[SeedGroup]:
    """The finished runs of ``rows`` (from :func:`~distill.report.comparison.compare`) grouped by
    everything but the seed: their swept settings, student, technique, method and recorded settings
    (``hparams``, data, teacher; so runs whose overrides agree but whose configs differ stay apart)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") != "ok" or row.get("acc") is None:
            continue
        settings = tuple(sorted((k, str(v)) for k, v in row.items() if k.startswith("+") and k not in SEED_KEYS))
        # A run whose seed is not recorded (an older summary) may differ from its look-alikes in
        # anything: it stays a group of its own.
        alone = () if row.get("seed") is not None else (row["run"],)
        key = (settings, row["student"], row["technique"], row.get("method"), row.get("settings"), alone, row.get("file"))
        groups.setdefault(key, []).append(row)
    out = []
    for (settings, student, technique, method, _, _, file), members in groups.items():
        members = _one_per_seed(members)
        accs = [float(r["acc"]) for r in members]
        out.append(SeedGroup(
            settings=dict(settings), student=student, technique=f"{technique} [{file}]" if file else technique, method=method or "kd",
            seeds=[r.get("seed") for r in members], runs=[r["run"] for r in members],
            acc_mean=statistics.fmean(accs), acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
            size_bytes=_median([r.get("size_bytes") for r in members]),
            latency_ms_batch=_median([r.get("latency_ms_batch") for r in members]), acc=accs,
        ))
    for cost, key in (("size", "size_bytes"), ("latency", "latency_ms_batch")):
        points = [(g.acc_mean, getattr(g, key)) if getattr(g, key) is not None else None for g in out]
        for group, on_front in zip(out, pareto_front(points), strict=True):
            setattr(group, f"pareto_{cost}", on_front)
    return out


def has_repeats(groups: list[SeedGroup]) -> bool:
    """Whether any setting was run with more than one seed (only then is a seed table worth writing)."""
    return any(g.n > 1 for g in groups)


GROUP_COLUMNS = ["student", "technique", "method", "n", "acc_mean", "acc_std", "size_bytes", "latency_ms_batch",
                 "pareto_size", "pareto_latency", "seeds"]


def group_columns(groups: list[SeedGroup]) -> list[str]:
    """The settings that differ between groups, then :data:`GROUP_COLUMNS`."""
    rows = [g.row() for g in groups]
    swept = sorted({k for r in rows for k in r if k.startswith("+")})
    swept = [k for k in swept if len({str(r.get(k)) for r in rows}) > 1 and k.lstrip("+") not in GROUP_COLUMNS]
    return [*swept, *GROUP_COLUMNS]


def to_markdown(groups: list[SeedGroup]) -> str:
    """The groups as Markdown: accuracy as ``mean ± std`` in percent, with n."""
    cols = group_columns(groups)
    shown = [c for c in cols if c != "acc_std"]
    lines = ["| " + " | ".join("acc (%, mean ± std)" if c == "acc_mean" else c.lstrip("+") for c in shown) + " |",
             "|" + "---|" * len(shown)]
    for g in sorted(groups, key=lambda g: (g.student, -g.acc_mean)):
        r = g.row()
        cells = []
        for c in shown:
            value = r.get(c)
            if c == "acc_mean":
                cells.append(f"{100 * g.acc_mean:.2f} ± {100 * g.acc_std:.2f}")
            elif isinstance(value, bool):
                cells.append("★" if value else "")
            elif isinstance(value, float):
                cells.append(f"{value:.4f}" if value < 10 else f"{value:,.0f}")
            else:
                cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seeds_csv(groups: list[SeedGroup]) -> str:
    """The groups as CSV, accuracy mean and std as fractions (as the per-run table's ``acc``)."""
    cols = group_columns(groups)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([c.lstrip("+") for c in cols])
    writer.writerows([[g.row().get(c, "") for c in cols] for g in groups])
    return buffer.getvalue()
