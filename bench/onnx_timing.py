"""ONNX Runtime sessions timed interleaved: the timing loop of bench/clamp.py and bench/gemm_bias.py."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np


def interleaved_ms(sessions: dict[str, Any], x: np.ndarray, calls: int, rounds: int = 7) -> dict[str, float]:
    """Each session's ms per call on ``x`` (input ``input``): ``rounds`` rounds, each timing ``calls``
    calls of every session in turn after one warm-up call, and the median over rounds (a burst of load
    on a shared machine tips one round, not the result)."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            session.run(None, {"input": x})
            start = time.perf_counter()
            for _ in range(calls):
                session.run(None, {"input": x})
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}
