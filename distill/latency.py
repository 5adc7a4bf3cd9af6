"""CPU latency of a model: the median over repeated timed runs after warm-up.

Uses ``torch.utils.benchmark.Timer``, which warms up, runs blocks of calls until ``min_run_time``
has elapsed, and pins the number of threads, so numbers are comparable between models measured
in one process. They are noisy on a shared machine: compare models measured in the same run.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, threads: int | None = None, min_run_time: float = 0.3) -> float:
    """Median milliseconds per ``model(example)`` call on CPU, with ``threads`` torch threads."""
    import time

    from torch.utils.benchmark import Timer

    model = model.eval()
    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Warm-up: the first calls allocate and pick kernels. A slow model (a ResNet-50 on a big
        # batch) is warm after one call, and more would only cost time.
        for _ in range(3):
            start = time.perf_counter()
            model(example)
            if time.perf_counter() - start > 0.1:
                break
    finally:
        torch.set_num_threads(previous)
    timer = Timer(stmt="model(x)", globals={"model": model, "x": example}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure(model: nn.Module, sample_shape: tuple[int, ...], batch_size: int, threads: int | None = None) -> dict[str, float]:
    """Latency at batch 1 and at ``batch_size``, on random inputs of ``sample_shape`` (C, H, W)."""
    gen = torch.Generator().manual_seed(0)
    one = torch.randn(1, *sample_shape, generator=gen)
    batch = torch.randn(batch_size, *sample_shape, generator=gen)
    return {"latency_ms": latency_ms(model, one, threads), "latency_ms_batch": latency_ms(model, batch, threads)}


def measure_many(
    models: dict[str, nn.Module], sample_shape: tuple[int, ...], batch_size: int, threads: int | None = None, rounds: int = 3
) -> dict[str, dict[str, float]]:
    """:func:`measure` for several models, interleaved over ``rounds`` and the median taken, so a
    burst of load on a shared machine does not land on one model only."""
    import statistics

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            runs[name].append(measure(model, sample_shape, batch_size, threads))
    return {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
