"""Low-rank factorization, teacher initialisation and 16-bit export (issue: the compression toolbox)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distill.checks import validate
from distill.compress.lowrank import (
    apply_ranks,
    choose_rank,
    factorize_conv,
    factorize_linear,
    plan_ranks,
)
from distill.errors import ConfigError
from distill.measure.size import count_parameters
from distill.models.registry import build_student, build_teacher
from distill.teacher.student_init import init_from_teacher

from .conftest import run_script

# --- low-rank --------------------------------------------------------------------------------------


def test_full_rank_svd_reconstructs_a_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12)
    pair = factorize_linear(layer, rank=12)
    x = torch.randn(5, 20)
    assert torch.allclose(pair(x), layer(x), atol=1e-5)
    assert pair[0].weight.shape == (12, 20) and pair[1].weight.shape == (12, 12) and pair[0].bias is None


def test_full_rank_svd_reconstructs_a_convolution_and_keeps_its_geometry():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    pair = factorize_conv(conv, rank=8)  # full rank of the (8, 54) kernel matrix
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(pair(x), conv(x), atol=1e-5)
    assert pair[0].weight.shape == (8, 6, 3, 3) and pair[0].stride == (2, 2) and pair[1].weight.shape == (8, 8, 1, 1)


def test_rank_choice_by_ratio_and_by_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 (total 22)
    assert choose_rank(s, 0.5, None) == 2
    assert choose_rank(s, None, 16 / 22) == 1
    assert choose_rank(s, None, 0.9) == 2  # 20/22 = 0.909
    assert choose_rank(s, None, 1.0) == 4


def test_factorized_student_has_the_planned_shapes_and_fewer_parameters(make_cfg):
    cfg = make_cfg("student=cnn")
    student = build_student(cfg.student, num_classes=10, channels=1, image_size=8)
    before = count_parameters(student)
    ranks = plan_ranks(student, rank_ratio=0.25, energy=None)
    assert ranks, "some layer is worth factorizing"
    apply_ranks(student, ranks)
    for name, rank in ranks.items():
        first, second = student.get_submodule(name)
        assert (first.out_features if isinstance(first, nn.Linear) else first.out_channels) == rank
    assert count_parameters(student) < before
    assert student(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# --- teacher initialisation ------------------------------------------------------------------------


def test_init_from_a_teacher_of_the_same_architecture_copies_everything(make_cfg):
    cfg = make_cfg("teacher=resnet18", "student=resnet18")
    teacher = build_teacher(cfg.teacher, num_classes=10, channels=1, image_size=8)
    student = build_student(cfg.student, num_classes=10, channels=1, image_size=8)
    report = init_from_teacher(student, teacher, "resnet18", "resnet18")
    assert report["init_copied_tensors"] == report["init_total_tensors"] == len(student.state_dict())
    assert report["init_copied_params"] == count_parameters(student)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())


def test_init_from_a_deeper_teacher_copies_the_matching_stem(make_cfg):
    cfg = make_cfg("teacher=resnet50", "student=resnet18")
    teacher = build_teacher(cfg.teacher, num_classes=10, channels=1, image_size=8)
    student = build_student(cfg.student, num_classes=10, channels=1, image_size=8)
    report = init_from_teacher(student, teacher, "resnet18", "resnet50")
    assert 0 < report["init_copied_tensors"] < report["init_total_tensors"]
    assert torch.equal(student.conv1.weight, teacher.conv1.weight)


def test_init_from_an_unrelated_teacher_is_a_named_error(make_cfg):
    cfg = make_cfg("student=mlp")
    teacher = build_teacher(cfg.teacher, num_classes=10, channels=1, image_size=8)
    student = build_student(cfg.student, num_classes=10, channels=1, image_size=8)
    with pytest.raises(ConfigError, match="student.init=teacher: no tensor of student=mlp matches teacher=resnet50"):
        init_from_teacher(student, teacher, "mlp", "resnet50")


# --- settings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "key"), [
    (["lowrank.rank_ratio=0"], "lowrank.rank_ratio"),
    (["lowrank.energy=1.5"], "lowrank.energy"),
    (["lowrank.rank_ratio=0.5", "lowrank.energy=0.9"], "lowrank.rank_ratio and lowrank.energy"),
    (["lowrank.rank_ratio=0.5", "prune.method=magnitude", "prune.end_epoch=2"], "lowrank with prune.method"),
    (["lowrank.rank_ratio=0.5", "quant.bits=8"], "lowrank with quant.bits"),
    (["lowrank.rank_ratio=0.5", "loss.hint.weight=1", "loss.hint.layers=[features.4:layer2]"], "lowrank with loss.hint"),
    (["loss.on_nonfinite=skip", "strategy=ddp", "trainer.devices=2"], "loss.on_nonfinite=skip needs one process"),
    (["student.init=yes"], "student.init"),
    (["export.dtype=fp8"], "export.dtype"),
    (["export.dtype=fp16", "quant.bits=8"], "export.dtype=fp16 with quant.bits=8"),
    (["loss.hint.weight=-1"], "loss.hint.weight=-1.0 is out of range: must be >= 0"),
    (["loss.hint.weight=1", "loss.hint.layers=[features.2]"], "loss.hint.layers: 'features.2' is not"),
    (["loss.hint.weight=1", "loss.hint.layers=[net.1:layer2]", "quant.bits=8"], "loss.hint with quant.bits is not supported"),
    (["sharing.bits=4", "quant.bits=8"], "sharing.bits=4 with quant.bits"),
    (["sharing.bits=9"], "sharing.bits"),
    (["sharing.bits=4", "sharing.start_epoch=30"], "sharing.start_epoch=30 must be <"),
])
def test_bad_toolbox_settings_name_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError) as info:
        validate(make_cfg(*overrides))
    assert str(info.value).startswith(key)


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.integration
def test_lowrank_teacher_init_and_half_export_run_end_to_end(tmp_path):
    run = ["logger=csv", "student=resnet18", "teacher=resnet18", "teacher.epochs=1", "trainer.max_epochs=2",
           "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
           "quant.latency_batch_size=16", "student.init=teacher", "lowrank.rank_ratio=0.5", "lowrank.start_epoch=1",
           "export.dtype=bf16", f"hydra.run.dir={tmp_path}/run"]
    result = run_script("train.py", *run, cwd=tmp_path, env={"DISTILL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())["student"]
    assert s["init_copied_tensors"] == s["init_total_tensors"]
    assert s["lowrank_layers"] > 0 and s["params_after_lowrank"] < s["params_before_lowrank"]
    assert {"acc_before_lowrank", "acc_lowrank_before_recovery", "latency_ms_batch_after_lowrank"} <= set(s)
    assert s["half_dtype"] == "bf16" and 0 <= s["acc_half"] <= 1
    assert s["size_bytes_half"] < s["size_bytes"]  # 16-bit weights: about half the factorized fp32 student
    saved = torch.load(s["half_artifact"], weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in saved["state_dict"].values() if v.is_floating_point())


# --- weight sharing --------------------------------------------------------------------------------


def test_weight_sharing_artifact_round_trips_exactly(make_cfg, tmp_path):
    from distill.compress.sharing import _shared_modules, load_shared, save_shared, share_weights

    cfg = make_cfg("student=cnn")
    torch.manual_seed(0)
    student = build_student(cfg.student, num_classes=10, channels=1, image_size=8).eval()
    layers = share_weights(student, bits=3)
    assert layers and all(len(torch.unique(student.get_submodule(n).weight)) <= 8 for n in layers)
    with torch.no_grad():  # as if fine-tuned: the shared values moved
        for p in _shared_modules(student).values():
            p.codebook.add_(0.01 * torch.randn_like(p.codebook))
    path = save_shared(tmp_path / "student_shared.pt.xz", student, 3, {"student": {"name": "cnn"}})
    fresh = load_shared(path, build_student(cfg.student, num_classes=10, channels=1, image_size=8).eval())
    for name in layers:
        assert torch.equal(fresh.get_submodule(name).weight, student.get_submodule(name).weight)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh(x), student(x))
    assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in fresh.parameters())  # 3-bit indices, not fp32


def test_shared_values_get_the_summed_gradient_of_their_cluster():
    from distill.compress.sharing import _shared_modules, share_weights

    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]))
    model = nn.Sequential(layer)
    share_weights(model, bits=1)  # two clusters: 0 and 1
    shared = _shared_modules(model)["0"]
    model(torch.ones(1, 4)).sum().backward()  # d/dw = 1 for every weight
    counts = torch.bincount(shared.indices.reshape(-1), minlength=2).float()
    assert torch.equal(shared.codebook.grad, counts)


# --- hints -----------------------------------------------------------------------------------------


def test_hint_loss_is_zero_for_identical_features_and_learns_a_projection_otherwise(make_cfg):
    from distill.distillation.features.combined import FeatureLoss
    from distill.distillation.features.fitnets import HintTerm

    cfg = make_cfg("student=cnn")
    torch.manual_seed(0)
    net = build_student(cfg.student, num_classes=10, channels=1, image_size=8)
    same = FeatureLoss({"hint": (1.0, HintTerm(), [("features.2", "features.2")])})
    same.attach(net, net, torch.zeros(2, 1, 8, 8))
    with same.taps.record():
        net(torch.randn(3, 1, 8, 8))
    parts, total = same()
    assert isinstance(same.terms["hint"].regressors[0], nn.Identity) and parts["hint"].item() == 0.0 == total.item()

    teacher = build_teacher(make_cfg("teacher=resnet18").teacher, num_classes=10, channels=1, image_size=8)
    hints = FeatureLoss({"hint": (2.0, HintTerm(), [("features.2", "layer2")])})
    hints.attach(net, teacher, torch.zeros(2, 1, 8, 8))
    regressor = hints.terms["hint"].regressors[0]
    assert isinstance(regressor, nn.Conv2d) and regressor.out_channels == 128
    x = torch.randn(3, 1, 8, 8)
    with hints.taps.record():
        net(x)
        with torch.no_grad():
            teacher(x)
    parts, total = hints()
    total.backward()
    assert parts["hint"].item() > 0 and torch.isclose(total, 2.0 * parts["hint"])  # logged unweighted
    assert regressor.weight.grad is not None


@pytest.mark.integration
def test_weight_sharing_and_hints_run_end_to_end(tmp_path):
    run = ["logger=csv", "student=cnn", "teacher=resnet18", "teacher.epochs=1", "trainer.max_epochs=2",
           "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
           "sharing.bits=4", "sharing.start_epoch=1", "loss.hint.weight=1.0", "loss.hint.layers=[features.6:layer2]",
           f"hydra.run.dir={tmp_path}/run"]
    result = run_script("train.py", *run, cwd=tmp_path, env={"DISTILL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())["student"]
    assert s["sharing_bits"] == 4 and s["size_bytes_shared"] < s["size_bytes"] / 4
    assert "train/hint" in (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    # The artifact holds the tested model: evaluated from it, the accuracy is the run's.
    from distill.compress.sharing import load_shared_student
    from distill.measure.accuracy import accuracy_on_test_split

    model, datamodule = load_shared_student(s["shared_artifact"])
    assert accuracy_on_test_split(model, datamodule) == pytest.approx(s["test_acc"])


@pytest.mark.integration
@pytest.mark.parametrize("technique", [["lowrank.rank_ratio=0.5", "lowrank.start_epoch=1"], ["sharing.bits=3", "sharing.start_epoch=1"]],
                         ids=["lowrank", "sharing"])
def test_resume_after_the_student_changed_shape_is_exact(tmp_path, technique):
    """Low-rank and weight sharing change the student mid-run; a resumed run rebuilds that shape first."""
    run = ["logger=csv", "student=cnn", "teacher=resnet18", "teacher.epochs=1", "trainer.max_epochs=3",
           "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
           "quant.latency_batch_size=16", "checkpoint.every_n_epochs=1", *technique,
           "measure.latency=off", "export.formats=[]"]  # about checkpoints, not timings or files
    env = {"DISTILL_CACHE_DIR": str(tmp_path / "cache")}
    full = run_script("train.py", *run, f"hydra.run.dir={tmp_path}/full", cwd=tmp_path, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    mid = tmp_path / "full" / "checkpoints" / "epoch001.ckpt"  # after the change at epoch 1
    resumed = run_script("train.py", *run, f"ckpt_path={mid}", f"hydra.run.dir={tmp_path}/resumed", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    if "sharing.bits=3" in technique:
        # The codebook gradient is a multi-threaded scatter-add whose summation order varies from run
        # to run: equal up to float rounding (seen: 1e-9), not bitwise.
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("indices"))
    else:
        assert all(torch.equal(a[k], b[k]) for k in a)
    # and evaluate.py rebuilds the reshaped student from the checkpoint
    ev = run_script("evaluate.py", f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}/eval",
                    cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
