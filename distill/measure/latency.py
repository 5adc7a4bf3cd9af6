"""CPU latency of a model: the median over timed blocks of calls, after warm-up.

The block size is chosen from the warm-up so that about ten blocks fill ``min_run_time``; the
median over blocks ignores a burst of load on a shared machine. (``torch.utils.benchmark``'s
``blocked_autorange`` grows its blocks tenfold at a time and, for a model that runs in 0.1 ms,
spent about 2 s per measurement, which made latency most of a short run; its ``timeit`` runs two
warm-up calls per block, which is as slow for a model that takes a second.) Compare models
measured in the same run: :func:`measure_many` interleaves them.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

BLOCKS = 10


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, threads: int | None = None, min_run_time: float = 0.3) -> float:
    """Median milliseconds per ``model(example)`` call on CPU, with ``threads`` torch threads."""
    model = model.eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        # Warm-up: the first call allocates and picks kernels, so the estimate of a call's time is
        # taken from a later one. A slow model (a ResNet-50 on a big batch) is warm after two calls.
        for warmup in range(3):
            start = time.perf_counter()
            model(example)
            per_call = time.perf_counter() - start
            if warmup >= 1 and per_call > 0.1:
                break
        number = max(1, round(min_run_time / BLOCKS / max(per_call, 1e-7)))
        blocks: list[float] = []
        spent = 0.0
        # Ten blocks; a model slower than min_run_time / 3 per call stops after three.
        while len(blocks) < BLOCKS and (spent < min_run_time or len(blocks) < 3):
            start = time.perf_counter()
            for _ in range(number):
                model(example)
            elapsed = time.perf_counter() - start
            blocks.append(elapsed / number)
            spent += elapsed
    finally:
        torch.set_num_threads(previous)
    return statistics.median(blocks) * 1e3


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
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            runs[name].append(measure(model, sample_shape, batch_size, threads))
    return {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
