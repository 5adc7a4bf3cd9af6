"""Latency of a model on CPU or a CUDA device: the median over timed blocks of calls, after warm-up.

Where it is measured is ``measure.latency`` (:func:`resolve_device`): ``auto`` times on the run's
accelerator (a GPU run on its GPU, a CPU run on CPU), ``cpu`` or ``cuda`` force one, ``off`` skips
every latency figure (no model is timed; the summary has none). The large batch is sized for the
input resolution (:func:`auto_batch_size`) unless ``quant.latency_batch_size`` sets it: 1024 images
of 8 x 8 px, 256 of CIFAR's 32 x 32, 64 at 64 px, 4 at 224 px, about the same pixels per call,
so a 224-px ResNet-50 is not timed on a batch that takes a minute per call.

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

from distill.errors import ConfigError
from distill.measure.record import Latency

BLOCKS = 10
DEVICES = ("auto", "cpu", "cuda", "off")
PIXELS_PER_BATCH = 1 << 18  # 4096 images of 8 x 8 px (capped at 1024), 256 of 32 x 32


def resolve_device(setting: str, accelerator: str) -> str | None:
    """``measure.latency`` as a device: ``cpu``, ``cuda``, or None (off); ``auto`` follows the run's
    ``trainer.accelerator`` (``gpu``/``cuda``, or ``auto`` on a machine with CUDA, time on the GPU)."""
    if setting == "off":
        return None
    if setting == "auto":
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        return "cuda" if on_gpu else "cpu"
    return setting


def check_device(setting: str) -> None:
    """``measure.latency=cuda`` needs a CUDA device on this machine."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("measure.latency=cuda: this machine has no CUDA device; use measure.latency=auto, cpu or off")


def auto_batch_size(image_size: int) -> int:
    """The latency batch for square inputs of ``image_size`` px: a power of two, about
    :data:`PIXELS_PER_BATCH` pixels per call, between 1 and 1024."""
    n = max(PIXELS_PER_BATCH // max(image_size * image_size, 1), 1)
    return min(1 << (n.bit_length() - 1), 1024)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, threads: int | None = None, min_run_time: float = 0.3) -> float:
    """Median milliseconds per ``model(example)`` call on ``example``'s device (CPU: with ``threads``
    torch threads; CUDA: each block ends in a device synchronisation, so the kernels are timed)."""
    model = model.eval()
    device = str(example.device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        # Warm-up: the first call allocates and picks kernels, so the estimate of a call's time is
        # taken from a later one. A slow model (a ResNet-50 on a big batch) is warm after two calls.
        for warmup in range(3):
            _sync(device)
            start = time.perf_counter()
            model(example)
            _sync(device)
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
            _sync(device)
            elapsed = time.perf_counter() - start
            blocks.append(elapsed / number)
            spent += elapsed
    finally:
        torch.set_num_threads(previous)
    return statistics.median(blocks) * 1e3


def measure(model: nn.Module, sample_shape: tuple[int, ...], batch_size: int, threads: int | None = None,
            device: str | None = "cpu") -> Latency:
    """Latency at batch 1 and at ``batch_size`` on ``device`` (None: not measured), on random
    inputs of ``sample_shape`` (C, H, W). The model is timed where it is and left there."""
    if device is None:
        return Latency(None, None, None)
    gen = torch.Generator().manual_seed(0)
    one = torch.randn(1, *sample_shape, generator=gen).to(device)
    batch = torch.randn(batch_size, *sample_shape, generator=gen).to(device)
    return Latency(latency_ms(model, one, threads), latency_ms(model, batch, threads), device)


def measure_many(
    models: dict[str, nn.Module], sample_shape: tuple[int, ...], batch_size: int, threads: int | None = None,
    rounds: int = 3, device: str | None = "cpu",
) -> dict[str, Latency]:
    """:func:`measure` for several CPU models (each timed on ``device``, then moved back to CPU),
    interleaved over ``rounds`` and the median taken, so a burst of load on a shared machine does
    not land on one model only."""
    if device is None:
        return {name: Latency(None, None, None) for name in models}
    runs: dict[str, list[Latency]] = {name: [] for name in models}
    try:
        for model in models.values():
            model.to(device)
        for _ in range(rounds):
            for name, model in models.items():
                runs[name].append(measure(model, sample_shape, batch_size, threads, device))
    finally:
        for model in models.values():
            model.cpu()
    return {
        name: Latency(statistics.median(r.ms for r in results), statistics.median(r.ms_batch for r in results), device)
        for name, results in runs.items()
    }
