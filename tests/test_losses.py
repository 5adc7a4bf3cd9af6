import math

import pytest
import torch
import torch.nn.functional as F

from distill.distillation.losses.kd import KDLoss


def _batch(seed: int = 0, n: int = 8, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def test_equal_logits_give_zero_kd():
    s, _, y = _batch()
    out = KDLoss(4.0, 0.7)(s, s.clone(), y)
    assert out["kd"].abs().item() < 1e-6


def test_alpha_zero_is_plain_cross_entropy():
    s, t, y = _batch()
    out = KDLoss(3.0, 0.0)(s, t, y)
    assert torch.allclose(out["loss"], F.cross_entropy(s, y))
    assert torch.allclose(KDLoss(3.0, 0.0)(s, None, y)["loss"], F.cross_entropy(s, y))


def test_alpha_one_is_pure_kd():
    s, t, y = _batch()
    out = KDLoss(2.0, 1.0)(s, t, y)
    assert torch.allclose(out["loss"], out["kd"])


def test_golden_value_against_hand_computation():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([2, 0])
    T, a = 2.0, 0.25
    kl = 0.0
    for i in range(2):
        ps = [math.exp(v / T) for v in s[i].tolist()]
        pt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    kd = T * T * kl / 2
    ce = 0.0
    for i in range(2):
        logz = math.log(sum(math.exp(v) for v in s[i].tolist()))
        ce += logz - s[i, y[i]].item()
    ce /= 2
    out = KDLoss(T, a)(s, t, y)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(a * kd + (1 - a) * ce, rel=1e-5)
    # A fixed number, so a change to the formula cannot go unnoticed.
    assert out["kd"].item() == pytest.approx(0.91853, abs=1e-4)


def test_t_squared_keeps_soft_gradient_scale():
    """At high T the gradient of KL(softmax(t/T)||softmax(s/T)) w.r.t. s is ~ (s - t)/(C T^2) for
    zero-mean logits (Hinton et al. 2015, sec. 2.1); with the T^2 factor it is independent of T."""
    s, t, y = _batch(n=4, c=10)
    s, t = (s - s.mean(1, keepdim=True)).double(), (t - t.mean(1, keepdim=True)).double()
    grads = []
    for T in (100.0, 200.0, 400.0):
        x = s.clone().requires_grad_(True)
        KDLoss(T, 1.0)(x, t, y)["kd"].backward()
        grads.append(x.grad)
    expected = (s - t) / 10 / 4  # (s - t)/C, averaged over the batch of 4
    for g in grads:
        assert torch.allclose(g, expected, atol=6e-4)  # the error of the expansion shrinks as 1/T
    # And without the T^2 factor the gradient would shrink as 1/T^2: check the factor is really applied.
    assert grads[0].abs().max() > 0.01


def test_gradcheck_of_kd_term():
    s, t, y = _batch(n=3, c=4)
    s = s.double().requires_grad_(True)
    loss = KDLoss(3.0, 0.6)
    assert torch.autograd.gradcheck(lambda x: loss(x, t.double(), y)["loss"], (s,))


@pytest.mark.parametrize(("temperature", "alpha", "key"), [(0.0, 0.5, "temperature"), (-1.0, 0.5, "temperature"), (4.0, 1.5, "alpha"), (4.0, -0.1, "alpha")])
def test_bad_settings_name_the_field(temperature, alpha, key):
    with pytest.raises(ValueError, match=f"loss.{key}"):
        KDLoss(temperature, alpha)


def test_teacher_logits_required_when_alpha_positive():
    s, _, y = _batch()
    with pytest.raises(ValueError, match="teacher_logits"):
        KDLoss(4.0, 0.5)(s, None, y)
