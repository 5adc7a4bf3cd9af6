"""``summary.json``: written atomically at the end of a run, read back by the comparison and the objective.

Its ``deployed`` section is the run's :class:`~distill.measure.record.DeployedModel`. Summaries
written before that section existed (before the package was split into subpackages) are read by
:func:`deployed_model` from their ``student`` keys, the way the comparison read them then.
"""

from __future__ import annotations

import json
from dataclasses import replace
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
        record = dict(summary["deployed"])
        if "latency_device" not in record:  # written before the record had it: timed where the student was
            integer = str(record.get("kind", "")).startswith("int")
            record["latency_device"] = "cpu" if integer else summary.get("student", {}).get("latency_device", "cpu")
        return DeployedModel.from_dict(record)
    return _legacy_deployed(summary["student"])


def _legacy_deployed(s: dict[str, Any]) -> DeployedModel:
    """An older summary's deployed model, named as the technique reports name it now (the integer
    student, else the 16-bit, shared-weight, low-rank, channel-removed or sparse one, else the
    trained student), at the size the comparison gave such runs then: their smallest artifact."""
    return replace(_legacy_kind(s), size_bytes=min(v for k, v in s.items() if k.startswith("size_bytes") and isinstance(v, int)))


def _legacy_kind(s: dict[str, Any]) -> DeployedModel:
    fp32 = (s.get("latency_ms_fp32", s.get("latency_ms")), s.get("latency_ms_fp32_batch", s.get("latency_ms_batch")))
    params, acc, path = s.get("params"), s.get("test_acc"), s.get("best_checkpoint")
    if s.get("bits"):
        return DeployedModel(f"int{s['bits']}", s["acc_quant"], params, s.get("size_bytes_quant", 0), s["bits"],
                             s.get("latency_ms_quant"), s.get("latency_ms_quant_batch"), s.get("artifact"))
    if "acc_half" in s:
        return DeployedModel(s.get("half_dtype", "fp16"), s["acc_half"], params, s.get("size_bytes_half", 0), 16, None,
                             s.get("latency_ms_half_batch"), s.get("half_artifact"))
    if s.get("sharing_bits"):
        return DeployedModel(f"shared{s['sharing_bits']}b", acc, params, s.get("size_bytes_shared", 0), s["sharing_bits"], *fp32,
                             s.get("shared_artifact"))
    if "latency_ms_batch_after_lowrank" in s:
        return DeployedModel("lowrank", acc, s.get("params_after_lowrank"), s.get("size_bytes_lowrank", 0), 32, None,
                             s["latency_ms_batch_after_lowrank"], path)
    if "latency_ms_after_removal" in s:
        return DeployedModel("channels-removed", acc, s.get("params_after_removal"), s.get("size_bytes_removed", 0), 32,
                             s["latency_ms_after_removal"], s["latency_ms_batch_after_removal"], s.get("shrunk_artifact"))
    if "size_bytes_sparse" in s:
        return DeployedModel("pruned", acc, s.get("nonzero_params"), s.get("size_bytes_sparse", 0), 32, *fp32, None)
    return DeployedModel("fp32", acc, params, s.get("size_bytes", 0), 32, *fp32, path)


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
