"""Latency: where it is timed (measure.latency), the batch sized for the resolution, and the cached
teacher figure keyed by the device and machine it was measured on."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill import pipeline
from distill.errors import ConfigError
from distill.measure import latency


def test_auto_batch_is_sized_for_the_resolution():
    # about the same pixels per call: digits keeps its 1024, CIFAR 256, a 224-px image 4
    assert [latency.auto_batch_size(s) for s in (8, 32, 64, 224)] == [1024, 256, 64, 4]
    sizes = [latency.auto_batch_size(s) for s in range(1, 600, 7)]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) >= 1 and max(sizes) <= 1024
    assert all(n & (n - 1) == 0 for n in sizes)  # powers of two


@pytest.mark.parametrize(("setting", "accelerator", "expected"), [
    ("off", "gpu", None), ("cpu", "gpu", "cpu"), ("auto", "cpu", "cpu"), ("auto", "gpu", "cuda"), ("auto", "cuda", "cuda"),
    ("auto", "auto", "cuda" if torch.cuda.is_available() else "cpu"),
])
def test_latency_device_follows_the_setting_and_the_accelerator(setting, accelerator, expected):
    assert latency.resolve_device(setting, accelerator) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_latency_without_cuda_is_a_named_error():
    with pytest.raises(ConfigError, match="measure.latency=cuda"):
        latency.check_device("cuda")


def test_off_times_nothing():
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("timed although measure.latency=off")

    assert latency.measure(Exploding(), (1, 8, 8), 4, device=None) == latency.Latency(None, None, None)
    assert latency.measure_many({"m": Exploding()}, (1, 8, 8), 4, device=None)["m"].ms_batch is None


def test_cached_teacher_latency_is_not_reused_on_another_machine(tmp_path, monkeypatch):
    calls = []
    real = latency.measure_many

    def counting(*args, **kwargs):
        calls.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(latency, "measure_many", counting)
    info = SimpleNamespace(path=str(tmp_path / "teacher.pt"), source="cache")
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    monkeypatch.setattr(pipeline.socket, "gethostname", lambda: "node-a")
    first = pipeline._teacher_latency(teacher, info, (1, 8, 8), 16, 1, "cpu")
    again = pipeline._teacher_latency(teacher, info, (1, 8, 8), 16, 1, "cpu")
    assert first == again and len(calls) == 1  # the same machine reuses its figure
    monkeypatch.setattr(pipeline.socket, "gethostname", lambda: "node-b")
    pipeline._teacher_latency(teacher, info, (1, 8, 8), 16, 1, "cpu")
    assert len(calls) == 2  # another host measures its own
    keys = json.loads((tmp_path / "teacher.latency.json").read_text())
    assert sorted(keys) == ["cpu:cpu@node-a-batch16-threads1", "cpu:cpu@node-b-batch16-threads1"]
    assert first["latency_device"] == "cpu" and first["latency_ms_batch"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_latency_on_cuda_is_timed_on_the_device():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    lat = latency.measure_many({"m": model}, (1, 8, 8), 256, device="cuda")["m"]
    assert lat.device == "cuda" and lat.ms_batch > 0
    assert next(model.parameters()).device.type == "cpu"  # moved back
