"""Typed records of what a run measured, read directly by the report, the comparison and the objective."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Latency:
    """Milliseconds per call at batch 1 and at the latency batch (either may be unmeasured), on ``device``."""

    ms: float | None
    ms_batch: float | None
    device: str | None = "cpu"  # cpu | cuda; None: not measured (measure.latency=off)


@dataclass(frozen=True)
class DeployedModel:
    """The model a run deploys: the output of its strongest compression, or the student as trained.

    ``kind`` names it (``fp32``, ``int8``, ``fp16``, ``lowrank``, ``shared4b``, ``pruned``,
    ``channels-removed``); ``path`` is the file to ship (an artifact, or the tested checkpoint);
    ``size_bytes`` is that model's size on disk; ``bits`` the width of its weights."""

    kind: str
    acc: float
    params: int | None
    size_bytes: int
    bits: int
    latency_ms: float | None
    latency_ms_batch: float | None
    path: str | None
    latency_device: str | None = "cpu"  # where its latency was timed (int8: always CPU); None: not timed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeployedModel:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
