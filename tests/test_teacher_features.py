"""The teacher's cached features: a cached run computes the same terms as the live teacher, the cache
is written once and rebuilt when damaged, and its key follows the form each term consumes."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from distill.distillation.features.attention import AttentionTerm
from distill.distillation.features.combined import FeatureLoss
from distill.distillation.features.crd import CRDTerm
from distill.distillation.features.fitnets import HintTerm
from distill.distillation.features.relations import PKTTerm, RKDTerm, SPTerm
from distill.models.registry import build_student, build_teacher
from distill.teacher.features import TeacherFeatureCache, teacher_features_for
from distill.teacher.outputs import TableRows

LABELS = torch.arange(40) % 10


def _models(make_cfg):
    torch.manual_seed(0)
    student = build_student(make_cfg("student=cnn").student, num_classes=10, channels=1, image_size=8)
    teacher = build_teacher(make_cfg("teacher=resnet18").teacher, num_classes=10, channels=1, image_size=8).eval()
    return student, teacher


def _features(student, teacher, p=2.0):
    features = FeatureLoss({
        # AT with a larger student map on one pair (pooled on the student side) and a larger teacher map on the other
        "at": (1000.0, AttentionTerm(p), [("features.2", "layer2"), ("features", "layer1")]),
        "hint": (1.0, HintTerm(), [("features.2", "layer1")]),
        "rkd": (1.0, RKDTerm(), []), "pkt": (100.0, PKTTerm(), []), "sp": (10.0, SPTerm(), []),
        "crd": (0.8, CRDTerm(feat_dim=16, nce_k=8), []),
    })
    features.attach(student, teacher, torch.zeros(2, 1, 8, 8))
    features.terms["crd"].set_data(LABELS)
    return features


def test_cached_teacher_features_give_the_live_teachers_terms(make_cfg):
    student, teacher = _models(make_cfg)
    features = _features(student, teacher)
    at = features.terms["at"]
    assert at.student_pool == [(4, 4), None] and at.teacher_pool == [None, (4, 4)]
    x, index = torch.randn(8, 1, 8, 8), torch.arange(8) * 3
    crd_state = copy.deepcopy(features.terms["crd"].state_dict())  # the memories are updated in place

    student.train()
    torch.manual_seed(1)  # CRD's negatives
    with features.taps.record():
        student(x)
        with torch.no_grad():
            teacher(x)
    live, live_total = features(index=index)

    cached = features.teacher_pass(teacher, x)  # what the cache stores, per sample
    assert cached["at.teacher0"].shape == (8, 16) and cached["at.teacher1"].shape == (8, 16)  # attention maps at 4x4
    assert cached["rkd.teacher0"].shape == (8, 512) and cached["hint.teacher0"].shape == (8, 64, 8, 8)
    features.terms["crd"].load_state_dict(crd_state)  # the memories as before the live step
    torch.manual_seed(1)
    with features.taps.record():
        student(x)  # the student alone: the teacher does not run
    from_cache, cached_total = features(cached, index=index)
    assert set(live) == set(from_cache) == {"at", "hint", "rkd_distance", "rkd_angle", "pkt", "sp", "crd"}
    for name, value in live.items():
        assert from_cache[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-8), name
    assert cached_total.item() == pytest.approx(live_total.item(), rel=1e-5)
    cached_total.backward()  # gradients reach the student through the cached path
    assert student.features[0].weight.grad is not None


def test_the_cache_is_written_once_rebuilt_when_damaged_and_keyed_by_form(make_cfg, tmp_path):
    student, teacher = _models(make_cfg)
    features = _features(student, teacher)
    x = torch.randn(40, 1, 8, 8)
    rows = TableRows(TensorDataset(x, LABELS), {"data": "test"}, False)

    def columns(f):
        return teacher_features_for(str(tmp_path), f, teacher, "resnet18:abc", rows, "float32", "cpu")

    first, source = columns(features)
    assert source == "computed" and set(first) == {k for k, *_ in features.teacher_keys()}
    expected = features.teacher_pass(teacher, x)
    for key, value in expected.items():
        torch.testing.assert_close(first[key], value, rtol=1e-5, atol=1e-6)
    # rkd, pkt, sp and crd read the same layer in the same form: one table for the four
    files = sorted((tmp_path / "features").glob("*.npy"))
    assert len(files) == 4  # at x2, hint, one shared embedding table
    again, source = columns(features)
    assert source == "cache" and all(torch.equal(again[k], first[k]) for k in first)

    # a truncated table is found unusable and rebuilt
    victim = TeacherFeatureCache(tmp_path).dir / files[0].name
    victim.write_bytes(victim.read_bytes()[:100])
    rebuilt, source = columns(features)
    assert source == "computed" and all(torch.equal(rebuilt[k], first[k]) for k in first)

    # another attention exponent is another form: its own entries, the others reused
    other = _features(student, teacher, p=4.0)
    teacher_features_for(str(tmp_path), other, teacher, "resnet18:abc", rows, "float32", "cpu")
    assert len(list((tmp_path / "features").glob("*.npy"))) == 6


def test_float16_storage_and_the_memory_mapped_path(make_cfg, tmp_path, monkeypatch):
    import distill.teacher.features as cached_features

    student, teacher = _models(make_cfg)
    features = _features(student, teacher)
    x = torch.randn(40, 1, 8, 8)
    rows = TableRows(TensorDataset(x, LABELS), {"data": "test"}, False)
    monkeypatch.setattr(cached_features, "IN_MEMORY_BYTES", 0)  # every table stays memory-mapped
    columns, _ = teacher_features_for(str(tmp_path), features, teacher, "resnet18:abc", rows, "float16", "cpu")
    assert isinstance(columns["rkd.teacher0"], cached_features.MappedRows)
    index = torch.tensor([3, 0, 17])
    got = columns["hint.teacher0"].rows(index)
    expected = features.teacher_pass(teacher, x[index])["hint.teacher0"]
    assert got.dtype == torch.float32 and np.allclose(got.numpy(), expected.numpy(), rtol=1e-2, atol=1e-2)


def test_tables_that_would_not_fit_on_the_disk_are_refused_before_the_teacher_runs(make_cfg, tmp_path, monkeypatch):
    import collections

    import distill.teacher.features as cached_features
    from distill.errors import ConfigError

    student, teacher = _models(make_cfg)
    features = _features(student, teacher)
    rows = TableRows(TensorDataset(torch.randn(40, 1, 8, 8), LABELS), {"data": "test"}, False)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cached_features.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 50_000, 50_000))
    with pytest.raises(ConfigError, match=r"teacher.cache_dir: the teacher's cached features need .* per sample\) and .* free"):
        teacher_features_for(str(tmp_path), features, teacher, "resnet18:abc", rows, "float32", "cpu")
    assert not list((tmp_path / "features").glob("*.npy"))
