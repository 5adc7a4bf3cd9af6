"""Precomputed teacher logits: same numbers as the live teacher, looked up by sample index."""

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from distill.losses import KDLoss
from distill.module import DistillationModule
from distill.teacher_outputs import IndexedDataset, compute_teacher_logits

OPTIM = OmegaConf.create({"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "scheduler": "none", "warmup_epochs": 0})


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))


def test_precomputed_logits_equal_live_teacher_in_eval_mode():
    teacher = _teacher().train()  # compute_teacher_logits must switch it to eval mode itself
    x = torch.randn(37, 1, 4, 4)
    data = TensorDataset(x, torch.randint(0, 5, (37,)))
    logits = compute_teacher_logits(teacher, data, batch_size=8)
    assert not teacher.training
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(x))


def test_indexed_dataset_appends_the_index():
    data = TensorDataset(torch.arange(5.0), torch.arange(5))
    x, y, i = IndexedDataset(data)[3]
    assert (x.item(), y.item(), i) == (3.0, 3, 3)


def test_training_step_uses_the_row_of_each_sample():
    teacher = _teacher().eval()
    x = torch.randn(10, 1, 4, 4)
    with torch.no_grad():
        table = teacher(x)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    loss = KDLoss(temperature=2.0, alpha=0.7)
    cached = DistillationModule(student, None, loss, OPTIM, 5, teacher_outputs=table)
    live = DistillationModule(student, teacher, loss, OPTIM, 5)
    idx = torch.tensor([7, 2, 9])
    torch.testing.assert_close(cached.teacher_logits(x[idx], idx), live.teacher_logits(x[idx]))
    # A shuffled index must pick shuffled rows, not the first rows of the table.
    assert not torch.allclose(cached.teacher_logits(x[idx], idx), table[:3])
