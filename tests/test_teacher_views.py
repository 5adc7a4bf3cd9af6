"""Replayable augmented views (teacher.cache_views): the student sees exactly the cached views."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from distill.pipeline import run
from distill.teacher.outputs import compute_teacher_logits
from distill.teacher.views import ReplayedViews

from .conftest import FAST


def _replay(views: int = 4) -> ReplayedViews:
    g = torch.Generator().manual_seed(0)
    base = TensorDataset(torch.randn(20, 1, 8, 8, generator=g), torch.arange(20) % 3)
    return ReplayedViews(base, list(range(3, 15)), v2.RandomCrop(8, padding=2), views, seed=7)


def test_a_view_is_the_same_every_time_and_views_differ():
    replay = _replay()
    x1, y1 = replay.view(5, 2)
    x2, y2 = replay.view(5, 2)
    assert torch.equal(x1, x2) and y1 == y2
    assert not all(torch.equal(replay.view(5, v)[0], x1) for v in range(4))
    # Drawing views does not disturb the global RNG stream beyond the view choice itself.
    torch.manual_seed(0)
    replay[0]
    after = torch.rand(1)
    torch.manual_seed(0)
    torch.randint(4, ())
    assert torch.equal(torch.rand(1), after)


def test_table_rows_match_the_teacher_on_the_replayed_view():
    replay = _replay()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    table = compute_teacher_logits(teacher, replay.all_views(), batch_size=7)
    assert table.shape == (len(replay) * 4, 3)
    x, y, rows = next(iter(DataLoader(replay, batch_size=12, shuffle=True)))
    with torch.no_grad():
        torch.testing.assert_close(table[rows], teacher(x))


@pytest.mark.integration
def test_run_with_cached_views(make_cfg):
    overrides = [*FAST, "teacher=resnet18", "data.augment=true", "teacher.cache_views=3"]
    summary = run(make_cfg(*overrides))
    assert summary["teacher_outputs"] == "precomputed (computed)"
    again = run(make_cfg(*overrides))
    assert again["teacher_outputs"] == "precomputed (cache)"
