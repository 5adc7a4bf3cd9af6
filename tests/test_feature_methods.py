"""The feature and relation terms against references computed here from the papers' definitions
(numpy loops in float64), their properties, the default layers, and their bad input."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.distillation.features.attention import AttentionTerm
from distill.distillation.features.combined import FeatureLoss
from distill.distillation.features.relations import PKTTerm, RKDTerm, SPTerm
from distill.distillation.features.taps import embedding_module, stage_pairs
from distill.models.registry import build_student, build_teacher


def applied(term, student, teacher):
    """``term`` on raw features, as FeatureLoss runs it: built on them, the teacher's in the form the term consumes."""
    term.build(student, teacher)
    return term(student, [term.teacher_form(i, t) for i, t in enumerate(teacher)])


def _pair(seed=0, n=5, ds=4, dt=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, ds, generator=g), torch.randn(n, dt, generator=g)


def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_matches_distance_and_angle_definitions():
    s, t = _pair()
    out = applied(RKDTerm(), [s], [t])
    S, T = s.double().numpy(), t.double().numpy()
    n = len(S)

    def distances(E):
        d = np.array([[np.linalg.norm(E[i] - E[j]) if i != j else 0.0 for j in range(n)] for i in range(n)])
        return d / d[d > 0].mean()

    ds, dt = distances(S), distances(T)
    distance = np.mean([_huber(ds[i, j], dt[i, j]) for i in range(n) for j in range(n)])

    def cos(E, i, j, k):  # the angle at E[i] between E[j] and E[k]
        u, v = E[j] - E[i], E[k] - E[i]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv))

    angle = np.mean([_huber(cos(S, i, j, k), cos(T, i, j, k)) for i in range(n) for j in range(n) for k in range(n)])
    assert out["rkd_distance"].item() == pytest.approx(distance, rel=1e-4)
    assert out["rkd_angle"].item() == pytest.approx(angle, rel=1e-4)
    assert RKDTerm().total(out).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-4)


def test_rkd_is_invariant_to_scale_and_zero_for_the_same_geometry():
    s, _ = _pair(1)
    out = applied(RKDTerm(), [s], [3.0 * s + 1.0])  # distances normalised by their mean; angles unchanged
    assert out["rkd_distance"].item() < 1e-6 and out["rkd_angle"].item() < 1e-6


def test_pkt_matches_the_conditional_probability_kl():
    s, t = _pair(2)
    out = applied(PKTTerm(), [s], [t])
    eps = 1e-7

    def conditional(E):
        E = E / (np.linalg.norm(E, axis=1, keepdims=True) + eps)
        K = (E @ E.T + 1) / 2
        return K / K.sum(1, keepdims=True)

    ps, pt = conditional(s.double().numpy()), conditional(t.double().numpy())
    expected = np.mean(pt * np.log((pt + eps) / (ps + eps)))
    assert out["pkt"].item() == pytest.approx(expected, rel=1e-4)
    assert applied(PKTTerm(), [s], [2.0 * s])["pkt"].abs().item() < 1e-6  # cosine geometry: scale-free


def test_sp_matches_the_normalised_gram_difference():
    s, t = _pair(3)
    out = applied(SPTerm(), [s], [t])
    S, T = s.double().numpy(), t.double().numpy()
    gs, gt = S @ S.T, T @ T.T
    gs, gt = gs / np.linalg.norm(gs, axis=1, keepdims=True), gt / np.linalg.norm(gt, axis=1, keepdims=True)
    assert out["sp"].item() == pytest.approx(((gt - gs) ** 2).sum() / len(S) ** 2, rel=1e-4)


@pytest.mark.parametrize("term", [RKDTerm(), PKTTerm(), SPTerm()])
def test_relation_terms_have_nothing_to_relate_in_a_batch_of_one(term):
    s, t = _pair(4, n=1)
    s.requires_grad_(True)
    parts = term([s], [t])
    total = term.total(parts)
    assert total.item() == 0.0
    total.backward()  # still part of the graph: the step goes on


def test_attention_transfer_matches_the_definition_and_pools_the_larger_map():
    g = torch.Generator().manual_seed(5)
    fs, ft = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    out = applied(AttentionTerm(), [fs], [ft])

    def amap(f):
        a = (f ** 2).mean(1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = ((amap(fs.double().numpy()) - amap(ft.double().numpy())) ** 2).mean()
    assert out["at"].item() == pytest.approx(expected, rel=1e-4)
    big = torch.randn(2, 6, 8, 8, generator=g)  # the teacher's map twice as large: pooled to 4x4
    pooled = torch.nn.functional.avg_pool2d(big, 2)
    assert applied(AttentionTerm(), [fs], [big])["at"].item() == pytest.approx(applied(AttentionTerm(), [fs], [pooled])["at"].item(), rel=1e-6)
    assert applied(AttentionTerm(), [fs], [2.0 * fs])["at"].item() < 1e-10  # each map is normalised


def test_default_attention_layers_are_stage_outputs_paired_by_resolution(make_cfg):
    student = build_student(make_cfg("student=cnn").student, num_classes=10, channels=1, image_size=8)
    teacher = build_teacher(make_cfg("teacher=resnet18").teacher, num_classes=10, channels=1, image_size=8)
    assert stage_pairs(student, teacher, torch.zeros(2, 1, 8, 8), "at") == [("features.2", "layer1"), ("features", "layer2")]


def test_embedding_default_reads_the_classifiers_inputs(make_cfg):
    student = build_student(make_cfg("student=mlp").student, num_classes=10, channels=1, image_size=8)
    teacher = build_teacher(make_cfg("teacher=resnet18").teacher, num_classes=10, channels=1, image_size=8)
    features = FeatureLoss({"rkd": (1.0, RKDTerm(), [])})
    features.attach(student, teacher, torch.zeros(2, 1, 8, 8))
    assert features.describe() == {"rkd": {"weight": 1.0, "layers": ["embedding:embedding"]}}
    x = torch.randn(4, 1, 8, 8)
    student.train()
    with features.taps.record():
        student(x)
        with torch.no_grad():
            teacher(x)
    s_emb, t_emb = features._features("rkd", None)
    assert s_emb[0].shape == (4, 128) and t_emb[0].shape == (4, 512) and not t_emb[0].requires_grad
    # taken before the dropout in front of the classifier (the teacher's side runs in eval mode)
    assert embedding_module(student) is student.net[6] and isinstance(student.net[6], nn.Dropout)
    cnn = build_student(make_cfg("student=cnn").student, num_classes=10, channels=1, image_size=8)
    assert embedding_module(cnn) is cnn.head[1] and embedding_module(teacher) is teacher.fc
    student.eval()
    with features.taps.record():
        student(x)
        teacher(x)
    emb, _ = features._features("rkd", None)
    assert torch.equal(emb[0], student.net[:6](x))
    # a copy of the student (measured, exported) carries the hooks and records nothing
    import copy

    copy.deepcopy(student)(x)
    with pytest.raises(RuntimeError, match="was not produced by the last forward pass"):
        features._features("rkd", None)


def test_feature_loss_weights_each_term_and_logs_it_unweighted():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    features = FeatureLoss({"pkt": (10.0, PKTTerm(), []), "sp": (0.5, SPTerm(), [])})
    features.attach(net, other, torch.zeros(2, 4))
    x = torch.randn(6, 4)
    with features.taps.record():
        net(x)
        other(x)
    parts, total = features()
    assert set(parts) == {"pkt", "sp"} and features.part_names == ("pkt", "sp")
    assert total.item() == pytest.approx(10.0 * parts["pkt"].item() + 0.5 * parts["sp"].item(), rel=1e-6)
    assert math.isfinite(total.item())
