"""The logit losses of the ``loss=`` group against references computed here from the papers'
definitions (plain numpy in float64, loops over samples and classes: not the modules' code), and
their properties (zero at equality, invariances, decompositions)."""

import math

import numpy as np
import pytest
import torch

from distill.distillation.losses.base import standardize
from distill.distillation.losses.dist import DISTLoss
from distill.distillation.losses.dkd import DKDLoss
from distill.distillation.losses.kd import KDLoss
from distill.distillation.losses.nkd import NKDLoss


def _batch(seed: int = 0, n: int = 6, c: int = 5, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, c, generator=g), scale * torch.randn(n, c, generator=g),
            torch.randint(0, c, (n,), generator=g))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))


def _ce(z: np.ndarray, y: int) -> float:
    return -math.log(_softmax(z)[y])


# --- DKD ------------------------------------------------------------------------------------------


def _dkd_reference(s, t, y, T):
    """TCKD and NCKD from Zhao et al.'s definitions: b = [p_y, 1 - p_y], p-hat = the non-target
    classes renormalised; both KLs times T^2, averaged over the batch."""
    tckd = nckd = 0.0
    for zs, zt, yy in zip(s.double().numpy(), t.double().numpy(), y.tolist(), strict=True):
        ps, pt = _softmax(zs / T), _softmax(zt / T)
        tckd += _kl(np.array([pt[yy], 1 - pt[yy]]), np.array([ps[yy], 1 - ps[yy]]))
        rest = [c for c in range(len(zs)) if c != yy]
        nckd += _kl(pt[rest] / pt[rest].sum(), ps[rest] / ps[rest].sum())
    n = len(y)
    return T * T * tckd / n, T * T * nckd / n


def test_dkd_matches_the_papers_definitions():
    s, t, y = _batch()
    loss = DKDLoss(temperature=4.0, alpha=1.0, beta=8.0, ce_weight=1.0, warmup_epochs=0)
    out = loss(s, t, y)
    tckd, nckd = _dkd_reference(s, t, y, 4.0)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-4)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-4)
    ce = np.mean([_ce(z, yy) for z, yy in zip(s.double().numpy(), y.tolist(), strict=True)])
    assert out["loss"].item() == pytest.approx(ce + tckd + 8.0 * nckd, rel=1e-4)


def test_dkd_reassembles_classical_kd_per_sample_eq3():
    """Eq. (3): KD = TCKD + (1 - p^t_y) NCKD for each sample."""
    s, t, y = _batch(1)
    for i in range(len(y)):
        one = (s[i:i + 1], t[i:i + 1], y[i:i + 1])
        parts = DKDLoss(temperature=2.0, warmup_epochs=0)(*one)
        p_t_y = torch.softmax(t[i] / 2.0, -1)[y[i]]
        kd = KDLoss(temperature=2.0, alpha=1.0)(*one)["kd"]
        assert (parts["tckd"] + (1 - p_t_y) * parts["nckd"]).item() == pytest.approx(kd.item(), rel=1e-4)


def test_dkd_warms_up_linearly_over_its_epochs():
    s, t, y = _batch(2)
    loss = DKDLoss(alpha=1.0, beta=8.0, ce_weight=1.0, warmup_epochs=20)
    full = None
    for epoch, factor in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (40, 1.0)):
        loss.epoch = epoch
        out = loss(s, t, y)
        full = out["tckd"] + 8.0 * out["nckd"]
        assert out["loss"].item() == pytest.approx((out["ce"] + factor * full).item(), rel=1e-5)


def test_dkd_is_zero_when_student_equals_teacher():
    s, _, y = _batch(3)
    out = DKDLoss(warmup_epochs=0)(s, s.clone(), y)
    assert out["tckd"].abs().item() < 1e-6 and out["nckd"].abs().item() < 1e-5


# --- DIST -----------------------------------------------------------------------------------------


def test_dist_matches_pearson_relations_of_the_softened_predictions():
    s, t, y = _batch(4, n=8, c=6)
    tau = 3.0
    out = DISTLoss(temperature=tau, beta=2.0, gamma=0.5, ce_weight=1.0)(s, t, y)
    ys = np.stack([_softmax(z / tau) for z in s.double().numpy()])
    yt = np.stack([_softmax(z / tau) for z in t.double().numpy()])
    inter = tau**2 * (1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(len(ys))]))
    intra = tau**2 * (1 - np.mean([np.corrcoef(ys[:, j], yt[:, j])[0, 1] for j in range(ys.shape[1])]))
    assert out["inter"].item() == pytest.approx(inter, rel=1e-4)
    assert out["intra"].item() == pytest.approx(intra, rel=1e-4)
    ce = np.mean([_ce(z, yy) for z, yy in zip(s.double().numpy(), y.tolist(), strict=True)])
    assert out["loss"].item() == pytest.approx(ce + 2.0 * inter + 0.5 * intra, rel=1e-4)


def test_dist_relations_vanish_when_predictions_are_linearly_related():
    """Pearson correlation is invariant to affine maps: DIST's point (an exact match is not needed)."""
    s, _, y = _batch(5)
    out = DISTLoss(temperature=1.0)(s, s.clone(), y)
    assert out["inter"].abs().item() < 1e-5 and out["intra"].abs().item() < 1e-5


# --- NKD ------------------------------------------------------------------------------------------


def test_nkd_matches_the_normalized_loss():
    s, t, y = _batch(6)
    T, gamma = 2.0, 1.5
    out = NKDLoss(temperature=T, alpha=1.0, gamma=gamma, ce_weight=1.0)(s, t, y)
    target = non = 0.0
    for zs, zt, yy in zip(s.double().numpy(), t.double().numpy(), y.tolist(), strict=True):
        target += -_softmax(zt)[yy] * math.log(_softmax(zs)[yy])
        rest = [c for c in range(len(zs)) if c != yy]
        qs, qt = _softmax(zs[rest] / T), _softmax(zt[rest] / T)
        non += -T * T * float(np.sum(qt * np.log(qs)))
    n = len(y)
    assert out["target"].item() == pytest.approx(target / n, rel=1e-4)
    assert out["non_target"].item() == pytest.approx(non / n, rel=1e-4)
    assert out["loss"].item() == pytest.approx((out["ce"] + out["target"] + gamma * out["non_target"]).item(), rel=1e-6)


# --- KD's divergences and logit standardization ---------------------------------------------------


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_kd_divergences_match_their_definitions(kind):
    s, t, y = _batch(7)
    T, beta = 2.0, 0.3
    out = KDLoss(temperature=T, alpha=1.0, divergence=kind, jsd_beta=beta)(s, t, y)
    total = 0.0
    for zs, zt in zip(s.double().numpy(), t.double().numpy(), strict=True):
        ps, pt = _softmax(zs / T), _softmax(zt / T)
        if kind == "forward_kl":
            total += _kl(pt, ps)
        elif kind == "reverse_kl":
            total += _kl(ps, pt)
        elif kind == "jsd":
            m = beta * pt + (1 - beta) * ps
            total += beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
        else:
            total += 0.5 * float(np.abs(pt - ps).sum())
    assert out["kd"].item() == pytest.approx(T * T * total / len(y), rel=1e-4)
    assert KDLoss(temperature=T, alpha=1.0, divergence=kind)(s, s.clone(), y)["kd"].abs().item() < 1e-5


def test_symmetric_jsd_is_symmetric_and_bounded_by_log2():
    s, t, y = _batch(8, scale=6.0)
    a = KDLoss(temperature=1.0, alpha=1.0, divergence="jsd", jsd_beta=0.5)(s, t, y)["kd"]
    b = KDLoss(temperature=1.0, alpha=1.0, divergence="jsd", jsd_beta=0.5)(t, s, y)["kd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5) and 0 < a.item() <= math.log(2)


def test_logit_standardization_makes_kd_invariant_to_shift_and_scale():
    s, t, y = _batch(9)
    loss = KDLoss(temperature=2.0, alpha=1.0, logit_standardize=True)
    base = loss(s, t, y)["kd"]
    moved = loss(3.0 * s + 7.0, 0.5 * t - 2.0, y)["kd"]
    assert moved.item() == pytest.approx(base.item(), rel=1e-4)
    plain = KDLoss(temperature=2.0, alpha=1.0)
    assert plain(3.0 * s + 7.0, 0.5 * t - 2.0, y)["kd"].item() != pytest.approx(plain(s, t, y)["kd"].item(), rel=1e-2)


def test_standardize_is_the_authors_z_score():
    z = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 3.0]])
    for row, out in zip(z.double().numpy(), standardize(z).double().numpy(), strict=True):
        expected = (row - row.mean()) / (row.std(ddof=1) + 1e-7)  # torch.std: unbiased, eps outside
        assert np.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("cls", [DKDLoss, DISTLoss, NKDLoss])
def test_every_logit_loss_takes_the_standardization_switch(cls):
    s, t, y = _batch(10)
    on = cls(logit_standardize=True)
    parts = {k: v for k, v in on(s, t, y).items() if k not in ("loss", "ce")}
    shifted = {k: v for k, v in on(2.0 * s + 1.0, 3.0 * t - 1.0, y).items() if k not in ("loss", "ce")}
    for key in parts:  # the teacher-facing terms see only standardized logits
        assert shifted[key].item() == pytest.approx(parts[key].item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("cls", [KDLoss, DKDLoss, DISTLoss, NKDLoss])
def test_half_precision_logits_are_promoted(cls):
    s, t, y = _batch(11)
    out = cls()(s.half(), t.half(), y)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


@pytest.mark.parametrize("make, message", [
    (lambda: DKDLoss(beta=-1.0), "loss.beta=-1.0 is out of range"),
    (lambda: KDLoss(divergence="jsd", jsd_beta=1.0), "loss.jsd_beta=1.0 is out of range: must be in (0, 1)"),
    (lambda: KDLoss(divergence="hellinger"), "loss.divergence='hellinger' is unknown; choose from forward_kl"),
    (lambda: DISTLoss(gamma=-0.5), "loss.gamma=-0.5 is out of range"),
])
def test_bad_loss_arguments_name_the_setting(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize("make", [lambda: DKDLoss(alpha=0.0, beta=0.0, ce_weight=0.5), lambda: DISTLoss(beta=0.0, gamma=0.0, ce_weight=0.5),
                                  lambda: NKDLoss(alpha=0.0, ce_weight=0.5)])
def test_a_loss_with_every_teacher_weight_zero_trains_on_labels_without_a_teacher(make):
    s, _, y = _batch(12)
    loss = make()
    out = loss(s, None, y)
    assert not loss.uses_teacher
    assert out["loss"].item() == pytest.approx(0.5 * torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    assert all(out[t].item() == 0.0 for t in loss.terms if t != "ce")


def test_old_checkpoints_hint_regressors_load_under_the_feature_terms():
    from distill.distillation.module import DistillationModule

    module = DistillationModule(torch.nn.Linear(4, 3), None, KDLoss(1.0, 0.0), None, 3)
    checkpoint = {"state_dict": {"hints.regressors.0.weight": torch.ones(2, 2), "student.weight": torch.zeros(3, 4)}}
    module.on_load_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"features.terms.hint.regressors.0.weight", "student.weight"}
