"""Mixup / CutMix (data.mixup, data.cutmix): torchvision's v2 transforms on training batches, soft
labels through the losses, the teacher live (or mixed views cached), and what cannot be mixed refused."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

from distill.checks import validate
from distill.data.datamodules import build_datamodule
from distill.data.mixing import batch_mix, mix_pair, mixing_of
from distill.distillation.epoch_sums import EpochSums
from distill.distillation.losses.kd import KDLoss
from distill.errors import ConfigError
from distill.pipeline import run
from distill.teacher.provision import teacher_fingerprint
from distill.teacher.views import ReplayedViews

from .conftest import FAST


def _batch(n: int = 16, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % classes


def test_mixup_is_a_convex_pair_of_neighbours_with_the_matching_soft_label():
    x, y = _batch()
    torch.manual_seed(1)
    mixed, soft = batch_mix(OmegaConf.create({"mixup": 0.4}), 4)(x, y)
    assert soft.shape == (16, 4) and torch.allclose(soft.sum(1), torch.ones(16))
    lam = float(soft[0, y[0]])  # y[0] != y[-1]: the label's weight on its own class is λ
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    torch.testing.assert_close(soft, lam * torch.eye(4)[y] + (1 - lam) * torch.eye(4)[y.roll(1, 0)])


def test_cutmix_pastes_a_box_whose_area_is_the_partners_label_weight():
    x, y = _batch()
    torch.manual_seed(2)
    mixed, soft = batch_mix(OmegaConf.create({"cutmix": 1.0}), 4)(x, y)
    partner = x.roll(1, 0)
    from_partner = (mixed == partner) & (mixed != x)
    assert torch.all((mixed == x) | (mixed == partner))
    share = from_partner[0, 0].float().mean().item()  # the box covers every channel alike
    assert share == pytest.approx(1 - float(soft[0, y[0]]), abs=1e-6)


def test_both_set_draws_one_of_the_two_per_batch_and_none_is_off():
    mix = batch_mix(OmegaConf.create({"mixup": 0.2, "cutmix": 1.0}), 4)
    assert isinstance(mix, v2.RandomChoice) and [type(t) for t in mix.transforms] == [v2.MixUp, v2.CutMix]
    assert batch_mix(OmegaConf.create({"mixup": 0.0, "cutmix": 0.0}), 4) is None
    assert mixing_of(OmegaConf.create({"mixup": 0.0, "cutmix": 1.0})) == {"cutmix": 1.0}


def test_the_training_loader_mixes_and_evaluation_loaders_do_not(make_cfg):
    dm = build_datamodule(make_cfg("data.mixup=0.2", "data.cutmix=1.0", "data.batch_size=32").data)
    dm.setup()
    torch.manual_seed(0)  # a box can round to zero area (λ > 15/16 on 8 px): a seeded, mixed batch
    x, y = next(iter(dm.train_dataloader()))
    assert y.shape == (32, 10) and y.dtype == torch.float32 and torch.allclose(y.sum(1), torch.ones(32))
    assert (y.max(1).values < 1).any()  # mixed, not one-hot
    _, y_val = next(iter(dm.val_dataloader()))
    assert y_val.ndim == 1 and y_val.dtype == torch.long


def test_soft_labels_pass_through_the_loss_and_the_accuracy_counts_the_dominant_class():
    x, y = _batch(8)
    logits = torch.randn(8, 4)
    soft = 0.7 * torch.eye(4)[y] + 0.3 * torch.eye(4)[y.roll(1, 0)]
    terms = KDLoss(temperature=4.0, alpha=0.5)(logits, torch.randn(8, 4), soft)
    expected_ce = -(soft * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(terms["ce"], expected_ce)
    sums = EpochSums(("loss", "kd", "ce"))
    sums.update(terms, logits, soft)
    means = sums.means()
    assert float(means["acc"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert float(means["ce"]) == pytest.approx(float(expected_ce), rel=1e-6)  # weighted by 8 samples, not 8·4


def test_a_mixed_replayed_view_is_fixed_by_its_seed():
    g = torch.Generator().manual_seed(0)
    base = TensorDataset(torch.randn(20, 1, 8, 8, generator=g), torch.arange(20) % 3)
    mix = batch_mix(OmegaConf.create({"mixup": 1.0}), 3)
    replay = ReplayedViews(base, list(range(20)), v2.RandomCrop(8, padding=2), 4, seed=7, mix=mix)
    x1, y1 = replay.view(5, 2)
    x2, y2 = replay.view(5, 2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert y1.shape == (3,) and math.isclose(float(y1.sum()), 1.0, rel_tol=1e-6)
    x, soft = mix_pair(mix, torch.zeros(1, 2, 2), 0, torch.ones(1, 2, 2), 1)
    torch.testing.assert_close(x, torch.full((1, 2, 2), float(soft[1])))  # x + (1 - λ)(partner - x)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.mixup=-0.1"], r"data.mixup=-0.1 is out of range: must be >= 0"),
    (["data.cutmix=nan"], r"data.cutmix=nan is out of range"),
    (["data.mixup=0.2", "loss=dkd"], r"loss=dkd with data.mixup=0.2: the loss splits each sample's labelled class"),
    (["data.cutmix=1", "loss=nkd"], r"loss=nkd with data.cutmix=1"),
    (["data.mixup=0.2", "loss=crd"], r"loss.crd with data.mixup=0.2: CRD's memory"),
    (["data.mixup=0.2", "teacher.precompute_outputs=true"], r"teacher.precompute_outputs=true with data.mixup: every batch"),
])
def test_what_cannot_be_mixed_is_refused_before_any_work(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*FAST, *overrides))


def test_mixed_views_may_be_cached_without_other_augmentation(make_cfg):
    validate(make_cfg(*FAST, "data.mixup=0.2", "teacher.cache_views=2"))


def test_the_teachers_key_changes_with_mixing_and_not_without(make_cfg):
    plain = teacher_fingerprint(make_cfg(*FAST), {"data": "digits"})
    assert "mix" not in plain  # keys of teachers trained before mixing existed still hold
    mixed = teacher_fingerprint(make_cfg(*FAST, "data.cutmix=1.0"), {"data": "digits"})
    assert mixed["mix"] == {"cutmix": 1.0} and {k: v for k, v in mixed.items() if k != "mix"} == plain


@pytest.mark.integration
def test_a_mixed_run_trains_teacher_and_student_on_mixes_with_the_teacher_live(make_cfg, caplog):
    caplog.set_level(logging.INFO, logger="distill")
    summary = run(make_cfg(*FAST, "teacher=resnet18", "data.mixup=0.2", "data.cutmix=1.0"))
    assert summary["teacher_outputs"] == "live"
    assert summary["data"]["mix"] == {"mixup": 0.2, "cutmix": 1.0}
    assert "every batch is a new mix of two samples, so the teacher runs live" in caplog.text
    assert 0.0 <= summary["student"]["test_acc"] <= 1.0


@pytest.mark.integration
def test_mixed_views_are_cached_and_replayed(make_cfg):
    overrides = [*FAST, "teacher=resnet18", "data.mixup=0.4", "teacher.cache_views=2"]
    assert run(make_cfg(*overrides))["teacher_outputs"] == "precomputed (computed)"
    assert run(make_cfg(*overrides))["teacher_outputs"] == "precomputed (cache)"
