"""``summary.json``: written atomically at the end of a run, read back by the comparison and the objective.

Its ``deployed`` section is the run's :class:`~distill.measure.record.DeployedModel`. Summaries
written before that section existed (before the package was split into subpackages) are read by
:func:`deployed_model` from their ``student`` keys, the way the comparison read them then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.measure.record import DeployedModel
from distill.runtime.atomic import atomic_write_text


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")


def deployed_model(summary: dict[str, Any]) -> DeployedModel:
    """The run's deployed model: its ``deployed`` record, or for an older summary the same figures
    derived from its ``student`` keys."""
    if summary.get("deployed"):
        return DeployedModel.from_dict(summary["deployed"])
    return _legacy_deployed(summary["student"])


def _legacy_deployed(s: dict[str, Any]) -> DeployedModel:
    """An older summary's deployed model: the converted integer student when quantized, the 16-bit
    one when exported so, else the trained student, at its smallest artifact's size."""
    sizes = [v for k, v in s.items() if k.startswith("size_bytes") and isinstance(v, int)]
    quantized, half = bool(s.get("bits")), not s.get("bits") and "acc_half" in s
    if quantized:
        kind, acc, lat = f"int{s['bits']}", s["acc_quant"], (s.get("latency_ms_quant"), s.get("latency_ms_quant_batch"))
    elif half:
        kind, acc, lat = s.get("half_dtype", "fp16"), s["acc_half"], (None, s.get("latency_ms_half_batch"))
    elif "latency_ms_batch_after_lowrank" in s:
        kind, acc, lat = "lowrank", s["test_acc"], (None, s["latency_ms_batch_after_lowrank"])
    elif "latency_ms_after_removal" in s:
        kind, acc, lat = "channels-removed", s["test_acc"], (s["latency_ms_after_removal"], s["latency_ms_batch_after_removal"])
    else:
        kind, acc = "fp32", s["test_acc"]
        lat = (s.get("latency_ms_fp32", s.get("latency_ms")), s.get("latency_ms_fp32_batch", s.get("latency_ms_batch")))
    bits = s.get("bits") or (16 if half else 32)
    return DeployedModel(kind=kind, acc=acc, params=s.get("params"), size_bytes=min(sizes), bits=bits,
                         latency_ms=lat[0], latency_ms_batch=lat[1], path=s.get("artifact") or s.get("best_checkpoint"))


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The trade-off as flat ``teacher/*``, ``student/*`` and ``deployed/*`` numbers, for loggers and dashboards."""
    out: dict[str, float] = {}
    for role in ("teacher", "student", "deployed"):
        for key, value in (summary.get(role) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{role}/{key}"] = float(value)
            elif isinstance(value, dict):  # e.g. sparsity_per_layer -> student/sparsity_per_layer/<layer>
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out[f"{role}/{key}/{sub}"] = float(v)
    return out
