"""Filter sharing by similarity (sharing.method=filters): the groups on filters placed so they are known,
the tied filters and scales, their gradients, the artifact's exact round trip, a run, a resume, bad settings."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from distill.checks import validate
from distill.compress.filter_sharing import filter_shared_modules, group_filters, share_filters, tie
from distill.compress.sharing import load_shared, save_filter_shared
from distill.errors import CheckpointError, ConfigError
from distill.models.registry import build_student

from .conftest import run_script

SHAPE = {"num_classes": 10, "channels": 1, "image_size": 8}


def _groups(labels) -> set[frozenset[int]]:
    out: dict[int, set[int]] = {}
    for i, g in enumerate(labels):
        out.setdefault(int(g), set()).add(i)
    return {frozenset(v) for v in out.values()}


def test_euclidean_groups_every_pair_within_the_threshold_and_no_more():
    # Two tight pairs, a lone filter, and a chain 0 - 0.15 - 0.3 whose ends are 0.3 apart: with
    # threshold 0.25 a chain may not become one group (complete linkage), though each link is within it.
    w = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.25], [10.0, 0.0],
                      [20.0, 0.0], [20.15, 0.0], [20.3, 0.0]])
    labels = group_filters(w, "euclidean", 0.25)  # [5.0, 5.25] is exactly 0.25 (in binary too) from [5.0, 5.0]: within
    groups = _groups(labels)
    assert {frozenset({0, 1}), frozenset({2, 3}), frozenset({4})} <= groups
    chain = [g for g in groups if g & {5, 6, 7}]
    assert sorted(len(g) for g in chain) == [1, 2]
    for g in groups:
        for i, j in itertools.combinations(g, 2):
            assert torch.dist(w[i], w[j]) <= 0.25 + 1e-6
    assert _groups(group_filters(w, "euclidean", 0.0)) == {frozenset({i}) for i in range(8)}


def test_cosine_groups_by_direction_and_a_zero_filter_keeps_its_own_group():
    w = torch.tensor([[1.0, 0.0], [3.0, 0.01], [0.0, 1.0], [0.0, -2.0], [0.0, 0.0], [0.02, 4.0]])
    assert _groups(group_filters(w, "cosine", 0.99)) == {frozenset({0, 1}), frozenset({2, 5}), frozenset({3}), frozenset({4})}
    # 1: the same direction only (their float distance is ~1e-16, not 0)
    assert _groups(group_filters(torch.tensor([[1.0, 3.0], [2.0, 6.0], [3.0, 1.0]]), "cosine", 1.0)) == {frozenset({0, 1}), frozenset({2})}


def test_euclidean_ties_to_the_mean_and_cosine_to_scaled_unit_filters():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    shared, index, scale = tie(w, group_filters(w, "euclidean", 3.0), "euclidean")
    assert scale is None and shared[index[0]].tolist() == [2.0, 3.0] and shared[index[2]].tolist() == [10.0, 0.0]
    # Parallel filters (one direction, norms 1, 2, 5): each is its scale times the shared unit filter, exactly.
    w = torch.tensor([[0.6, 0.8], [1.2, 1.6], [3.0, 4.0], [0.0, 0.0]])
    shared, index, scale = tie(w, group_filters(w, "cosine", 0.999), "cosine")
    assert shared.shape[0] == 2 and torch.allclose(shared[index[0]], torch.tensor([0.6, 0.8]))
    # A zero filter: shared filter 0 with scale 1, so both can still learn (with scale 0 neither would).
    assert torch.allclose(scale, torch.tensor([1.0, 2.0, 5.0, 1.0])) and not shared[index[3]].any()


def test_tied_filters_train_as_one_and_each_scale_has_its_own_gradient():
    layer = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.6, 0.8], [1.2, 1.6], [1.0, -1.0]]))
    model = nn.Sequential(layer, nn.Linear(3, 1))  # the last Linear is the classifier: never shared
    assert share_filters(model, "cosine", 0.99) == {"0": 2}
    p = filter_shared_modules(model)["0"]
    x = torch.tensor([[1.0, 2.0]])
    model[0](x).sum().backward()  # d(out_i)/d(S) = a_i x for the filters i of S's group
    g = int(p.index[0])
    assert torch.allclose(p.shared.grad[g], (p.scale[0] + p.scale[1]) * x[0])
    assert torch.allclose(p.scale.grad[:2], (p.shared[g] * x[0]).sum().expand(2))
    with torch.no_grad():
        p.shared.add_(1.0)
    w = model[0].weight
    assert torch.allclose(w[1], p.scale[1] / p.scale[0] * w[0])  # still tied after an update


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_the_artifact_stores_unique_filters_and_loads_the_identical_model(make_cfg, tmp_path, metric):
    cfg = make_cfg("student=cnn")
    torch.manual_seed(0)
    student = build_student(cfg.student, **SHAPE).eval()
    unique = share_filters(student, metric, 0.5 if metric == "cosine" else 0.9)
    totals = {name: student.get_submodule(name).weight.shape[0] for name in unique}
    assert "head.2" not in unique and any(unique[n] < totals[n] for n in unique)  # something was tied
    with torch.no_grad():  # as if fine-tuned
        for p in filter_shared_modules(student).values():
            for t in p.parameters():
                t.add_(0.01 * torch.randn_like(t))
    path = save_filter_shared(tmp_path / "student_shared.pt.xz", student, metric, 0.5, {"student": {"name": "cnn"}})
    fresh = load_shared(path, build_student(cfg.student, **SHAPE).eval())
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh(x), student(x))
    for name in unique:
        assert torch.equal(fresh.get_submodule(name).weight, student.get_submodule(name).weight)
    dense = sum(p.numel() * 4 for p in fresh.parameters())
    stored = sum(unique[n] * student.get_submodule(n).weight[0].numel() for n in unique)
    assert stored < sum(student.get_submodule(n).weight.numel() for n in unique)
    assert path.stat().st_size < dense


def test_a_damaged_artifact_is_a_named_error(make_cfg, tmp_path):
    from distill.compress.packing import torch_bytes, xz_compress
    from distill.compress.sharing import FILTERS_FORMAT

    cfg = make_cfg("student=mlp")
    student = build_student(cfg.student, **SHAPE)
    share_filters(student, "euclidean", 10.0)  # everything close: one filter per layer
    path = save_filter_shared(tmp_path / "a.pt.xz", student, "euclidean", 10.0, {})
    from distill.compress.packing import read_xz_payload

    payload = read_xz_payload(path)
    entry = next(iter(payload["layers"].values()))
    entry["shared"] = entry["shared"][:0]  # the unique filters cut off: the indices point past them
    (tmp_path / "b.pt.xz").write_bytes(xz_compress(torch_bytes({**payload, "format": FILTERS_FORMAT})))
    with pytest.raises(CheckpointError, match="b.pt.xz"):
        load_shared(tmp_path / "b.pt.xz", build_student(cfg.student, **SHAPE))


@pytest.mark.parametrize(("overrides", "message"), [
    (["sharing.method=filters"], "sharing.method=filters needs sharing.threshold"),
    (["sharing.method=filters", "sharing.metric=cosine", "sharing.threshold=0"], "sharing.threshold=0 with sharing.metric=cosine is a similarity: it must be in (0, 1]"),
    (["sharing.method=filters", "sharing.metric=cosine", "sharing.threshold=1.5"], "sharing.threshold=1.5 with sharing.metric=cosine"),
    (["sharing.method=filters", "sharing.threshold=-1"], "sharing.threshold=-1 with sharing.metric=euclidean is a distance: it must be >= 0"),
    (["sharing.method=filters", "sharing.threshold=nan"], "sharing.threshold=nan with sharing.metric=euclidean"),
    (["sharing.threshold=0.5"], "sharing.threshold=0.5 applies to sharing.method=filters, which is off"),
    (["sharing.method=filters", "sharing.threshold=1", "sharing.bits=4"], "sharing.bits=4 is k-means sharing's setting"),
    (["sharing.method=filters", "sharing.metric=l1", "sharing.threshold=1"], "sharing.metric"),
    (["sharing.method=clusters"], "sharing.method"),
    (["sharing.bits=4", "sharing.threshold=0.5"], "sharing.threshold=0.5 applies to sharing.method=filters"),
    (["sharing.method=filters", "sharing.threshold=1", "quant.bits=8"], "sharing.method=filters with quant.bits"),
])
def test_bad_filter_sharing_settings_are_named(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(make_cfg(*overrides, "sharing.start_epoch=0"))
    assert message in str(info.value), str(info.value)


@pytest.mark.integration
def test_a_run_shares_filters_reports_them_and_resumes_exactly(make_cfg, tmp_path):
    """A run of three epochs (filters tied at the start of epoch 1), and the same run resumed from epoch 0's
    checkpoint (before the tie) and from epoch 1's (after it): the same weights; evaluate.py tests the artifact."""
    from distill.pipeline import run

    common = ["logger=csv", "teacher=resnet18", "teacher.epochs=1", "student=cnn", "trainer.max_epochs=3",
              "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
              "measure.latency=off", "export.formats=[]", "checkpoint.every_n_epochs=1",
              "sharing.method=filters", "sharing.metric=cosine", "sharing.threshold=0.3", "sharing.start_epoch=1"]
    full = run(make_cfg(*common))
    s = full["student"]
    assert s["sharing_method"] == "filters" and s["sharing_metric"] == "cosine"
    convs = [n for n, m in build_student(make_cfg("student=cnn").student, **SHAPE).named_modules() if isinstance(m, nn.Conv2d)]
    assert list(s["filters_unique"]) == convs  # every conv; the classifier never
    assert all(s["filters_unique"][k] <= s["filters_total"][k] for k in s["filters_unique"])
    assert sum(s["filters_unique"].values()) < sum(s["filters_total"].values())
    assert full["deployed"]["kind"].startswith("shared filters") and full["deployed"]["size_bytes"] == s["size_bytes_shared"]
    run_dir = tmp_path / "run"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for epoch in (0, 1):  # before the tie (the resumed run ties), after it (the resumed run rebuilds the tied structure)
        resumed = run(make_cfg(*common, f"ckpt_path={run_dir / 'checkpoints' / f'epoch{epoch:03d}.ckpt'}"))
        assert resumed["student"]["filters_unique"] == s["filters_unique"]
        again = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert last.keys() == again.keys()
        assert all(torch.allclose(last[k].float(), again[k].float(), atol=1e-6) for k in last)  # scatter-add order: not bitwise
    ev = run_script("evaluate.py", f"ckpt_path={s['shared_artifact']}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"{100 * s['test_acc']:.2f} %" in ev.stdout
    assert json.loads((run_dir / "summary.json").read_text())["student"]["filters_unique"] == s["filters_unique"]
