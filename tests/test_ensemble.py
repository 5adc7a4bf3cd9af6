"""Multi-teacher distillation: the mixture of the teachers' softened distributions against a reference
computed here, its properties for every logit loss, the members' configs and the bad input."""

import numpy as np
import pytest
import torch

from distill.checks import validate
from distill.distillation.losses.dist import DISTLoss
from distill.distillation.losses.dkd import DKDLoss
from distill.distillation.losses.kd import KDLoss
from distill.distillation.losses.nkd import NKDLoss
from distill.distillation.module import DistillationModule
from distill.errors import ConfigError
from distill.teacher.ensemble import ensemble_weights, member_configs


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_learns_from_the_weighted_mixture_of_the_teachers_softened_distributions():
    g = torch.Generator().manual_seed(0)
    s, t1, t2 = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    y = torch.randint(0, 5, (6,), generator=g)
    temperature, weights = 4.0, [0.3, 0.7]
    loss = KDLoss(temperature, alpha=1.0)
    loss.teacher_weights = weights
    got = loss(s, torch.stack([t1, t2], dim=1), y)["kd"].item()
    S, T1, T2 = (a.double().numpy() for a in (s, t1, t2))
    mix = 0.3 * _softmax(T1 / temperature) + 0.7 * _softmax(T2 / temperature)
    p_s = _softmax(S / temperature)
    expected = temperature**2 * (mix * (np.log(mix) - np.log(p_s))).sum(1).mean()
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make", [lambda: KDLoss(4.0, 0.9), lambda: DKDLoss(4.0, 1.0, 8.0, warmup_epochs=0),
                                  lambda: DISTLoss(4.0), lambda: NKDLoss(1.0, 1.0)])
def test_a_mixture_of_copies_is_the_teacher_and_a_zero_weight_drops_a_teacher(make):
    g = torch.Generator().manual_seed(1)
    s, t, other = (torch.randn(8, 6, generator=g) * 2 for _ in range(3))
    y = torch.randint(0, 6, (8,), generator=g)
    single = make()(s, t, y)["loss"].item()
    copies = make()
    copies.teacher_weights = [0.5, 0.5]
    assert copies(s, torch.stack([t, t], dim=1), y)["loss"].item() == pytest.approx(single, rel=1e-5)
    dropped = make()
    dropped.teacher_weights = [1.0, 0.0]
    assert dropped(s, torch.stack([t, other], dim=1), y)["loss"].item() == pytest.approx(single, rel=1e-5)


def test_the_live_ensemble_stacks_every_teachers_logits():
    teachers = [torch.nn.Linear(4, 3) for _ in range(3)]
    module = DistillationModule(torch.nn.Linear(4, 3), teachers[0], KDLoss(2.0, 0.5), None, 3, ensemble=teachers[1:])
    x = torch.randn(5, 4)
    logits = module.teacher_logits(x)
    assert logits.shape == (5, 3, 3)
    for k, teacher in enumerate(teachers):
        torch.testing.assert_close(logits[:, k], teacher(x))
    assert not any(p.requires_grad for p in module.ensemble.parameters())
    state = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(state)  # the teachers are cached on their own, not in the student's checkpoint
    assert not [k for k in state["state_dict"] if k.startswith(("teacher.", "ensemble."))]


def test_members_take_the_first_teachers_settings_but_not_its_checkpoint(make_cfg, tmp_path):
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"x")
    cfg = make_cfg("teacher=resnet50", f"teacher.checkpoint={ckpt}", "teacher.epochs=3",
                   "teacher.ensemble=[resnet18,{name:resnet50,epochs:7}]")
    first, second = member_configs(cfg)
    assert (first.teacher.name, first.teacher.epochs, first.teacher.checkpoint) == ("resnet18", 3, None)
    assert (second.teacher.name, second.teacher.epochs) == ("resnet50", 7)
    assert first.teacher.ensemble == [] and cfg.teacher.name == "resnet50"  # the run's config is untouched
    assert ensemble_weights(cfg) == pytest.approx([1 / 3] * 3)
    assert ensemble_weights(make_cfg("teacher.ensemble=[resnet18]", "teacher.ensemble_weights=[1,3]")) == [0.25, 0.75]
    assert ensemble_weights(make_cfg()) is None


@pytest.mark.parametrize("overrides, message", [
    (["teacher.ensemble=[resnet99]"], r"teacher.ensemble\[0\]='resnet99' is not a known teacher; choose from: custom, hf, resnet18, resnet50"),
    (["teacher.ensemble=[resnet18]", "teacher.ensemble_weights=[1,2,3]"], "3 weight\\(s\\) for 2 teachers"),
    (["teacher.ensemble=[resnet18]", "teacher.ensemble_weights=[-1,2]"], "each must be >= 0"),
    (["teacher.ensemble=[resnet18]", "teacher.ensemble_weights=[0,0]"], "their sum > 0"),
    (["teacher.ensemble=[resnet18]", "teacher.ensemble_weights=[1,inf]"], "each must be >= 0 and finite"),
    (["teacher=resnet50", "teacher.ensemble=[resnet50]"], "teacher.ensemble\\[0\\] is the first teacher again"),
    (["teacher.ensemble_weights=[0.5,0.5]"], "there is one teacher"),
    (["teacher.ensemble=[resnet18]", "loss.alpha=0"], "reads no teacher logits"),
    (["teacher.ensemble=[{epochs:2}]"], "a teacher name or a node with a 'name'"),
])
def test_bad_ensembles_are_named_before_any_data_is_read(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*overrides))
