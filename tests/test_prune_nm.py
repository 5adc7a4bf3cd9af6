"""N:M semi-structured sparsity (prune.method=nm): the pattern on hand-made layers, by each criterion,
through training and QAT, in a run's summary, and its bad settings."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from distill.checks import validate
from distill.compress.prune.callback import Pruning
from distill.compress.prune.importance import collect_gradients
from distill.compress.prune.nm import follows, groups_of, nm_mask
from distill.compress.quant import backend as quant_backend
from distill.compress.quant.callback import QuantizationAwareTraining
from distill.compress.registry import check_student
from distill.distillation.losses.kd import KDLoss
from distill.distillation.module import DistillationModule
from distill.errors import ConfigError
from tests.test_pruning import _student
from tests.test_qat import OPTIM, _digits

from .conftest import FAST


def test_the_mask_keeps_the_n_largest_of_every_m_consecutive_weights():
    w = torch.tensor([[0.1, -4.0, 3.0, 0.2, 5.0, -0.5, 0.4, 0.3]])
    assert nm_mask(w.abs(), 2, 4).tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    assert nm_mask(w.abs(), 1, 4).tolist() == [[0, 1, 0, 0, 1, 0, 0, 0]]  # N kept: 1:4 is 75 % sparse
    assert nm_mask(w.abs(), 3, 4).tolist() == [[0, 1, 1, 1, 1, 1, 1, 0]]
    assert follows(w * nm_mask(w.abs(), 2, 4), 2, 4) and not follows(w, 2, 4)


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    # weight (out=1, in=4, 1, 2): at kernel position 0 the input channels' values are 1, 2, 3, 4;
    # at position 1 they are 40, 30, 20, 10. 2:4 keeps channels {2, 3} at position 0 and {0, 1} at 1.
    w = torch.tensor([[[[1.0, 40.0]], [[2.0, 30.0]], [[3.0, 20.0]], [[4.0, 10.0]]]])
    assert groups_of(w, 4).tolist() == [[1, 2, 3, 4], [40, 30, 20, 10]]
    mask = nm_mask(w, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [0, 0, 1, 1] and mask[0, :, 0, 1].tolist() == [1, 1, 0, 0]


def _linear_callback(importance: str) -> tuple[Pruning, nn.Module]:
    # w = [4, 3, 2, 1]; the loss's gradients g_1 = [1, 0, 10, 0], g_2 = [1, 0, -10, 3] (the batches' column sums).
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    cb = Pruning("nm", 0.5, importance=importance, prune_classifier=True, n=2, m=4)
    cb.setup(None, SimpleNamespace(student=model), "fit")
    return cb, model


@pytest.mark.parametrize(("importance", "kept"), [
    ("magnitude", [0, 1]),  # |w| = [4, 3, 2, 1]
    ("taylor", [0, 3]),  # |w · Σg| = [8, 0, 0, 3]
    ("fisher", [0, 2]),  # ½ Σ (w · g)² = [16, 0, 400, 4.5]
])
def test_each_criterion_chooses_the_weights_each_group_keeps(importance, kept):
    cb, model = _linear_callback(importance)
    batches = [torch.tensor([[1.0, 0.0, 10.0, 0.0]]), torch.tensor([[1.0, 0.0, -10.0, 3.0]])]
    grads = None if importance == "magnitude" else collect_gradients(lambda x: model(x).sum(), model, cb._scored_tensors(), batches)
    assert cb._prunes_any(cb.amount)
    cb.prune_to(cb.amount, grads)
    assert model[0].weight_mask.flatten().nonzero().flatten().tolist() == kept
    assert not cb._prunes_any(cb.amount) and cb.sparsity()["global"] == 0.5


def test_the_pattern_holds_through_training_and_qat_conversion(tmp_path):
    dm = _digits()
    module = DistillationModule(_student("cnn"), None, KDLoss(1.0, 0.0), OPTIM, 10)
    qat = QuantizationAwareTraining(bits=8, shape=dm.shape, output_dir=tmp_path, flow="fx")  # train.py's choice with pruning
    pruning = Pruning("nm", 0.5, start_epoch=1, n=2, m=4, exclude=["features.0"])  # its 1 input channel cannot be 2:4
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[qat, pruning])
    trainer.fit(module, datamodule=dm)
    paths = [p for p, _ in pruning._layers]
    assert "features.0" not in paths and len(paths) == 2  # the other two convs (the classifier is never pruned)
    for _, m in pruning._layers:  # the weights trained for an epoch after the event: still 2:4
        assert follows(m.weight, 2, 4)
    report = pruning.measure(module.student)
    assert report.nm_pattern == "2:4" and report.nm_pattern_ok and set(report.nm_layers_ok) == set(paths)
    assert report.sparsity == pytest.approx(0.5)
    qmodules = dict(quant_backend.convert(module.student).named_modules())
    for path in paths:  # the integer weights keep it (symmetric weights: a zero's code is 0)
        assert follows(qmodules[path].weight().int_repr(), 2, 4), path


def test_a_resume_with_another_pattern_is_refused():
    cb = Pruning("nm", 0.5, n=2, m=4)
    state = cb.state_dict()
    assert state["n"] == 2 and state["m"] == 4
    with pytest.raises(ValueError, match="pruned 2:4"):
        Pruning("nm", 0.5, n=1, m=4).load_state_dict(state)


# --- bad settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (["prune.n=4", "prune.m=4"], "prune.n=4 prune.m=4: N:M keeps N of every M weights, so it needs 1 <= prune.n < prune.m"),
    (["prune.n=5", "prune.m=4"], "prune.n=5 prune.m=4"),
    (["prune.n=0"], "prune.n"),
    (["prune.m=1"], "prune.m"),
    (["prune.importance=fpgm"], "prune.importance=fpgm does not apply to prune.method=nm; choose from: magnitude, taylor"),
])
def test_bad_patterns_are_named_before_training(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(make_cfg("prune.method=nm", *overrides))
    assert message in str(info.value), str(info.value)


def test_a_layer_m_does_not_divide_is_named_before_the_teacher_trains(make_cfg):
    cfg = make_cfg("student=cnn", "prune.method=nm")
    validate(cfg)
    with pytest.raises(ConfigError) as info:
        check_student(cfg, {"num_classes": 10, "channels": 1, "image_size": 8})
    message = str(info.value)
    assert "layer 'features.0' (Conv2d, input channels 1) is not divisible by prune.m=4" in message
    assert "prune.exclude" in message
    check_student(make_cfg("student=cnn", "prune.method=nm", "prune.exclude=[features.0]"),
                  {"num_classes": 10, "channels": 1, "image_size": 8})  # no error
    with pytest.raises(ConfigError, match=r"prune.exclude: 'featurs.0' matches no layer of the student; its Linear / Conv2d layers: features.0, "):
        check_student(make_cfg("student=cnn", "prune.method=nm", "prune.exclude=[featurs.0]"),
                      {"num_classes": 10, "channels": 1, "image_size": 8})
    with pytest.raises(ConfigError, match=r"layer 'net.1' \(Linear, in_features 64\) is not divisible by prune.m=3"):
        check_student(make_cfg("student=mlp", "prune.method=nm", "prune.n=1", "prune.m=3"),
                      {"num_classes": 10, "channels": 1, "image_size": 8})


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.integration
def test_a_run_reports_the_pattern_check(make_cfg):
    from distill.pipeline import run

    summary = run(make_cfg(*FAST, "teacher=resnet18", "student=mlp", "prune.method=nm", "prune.importance=taylor",
                           "prune.importance_batches=2", "measure.latency=off"))
    student = summary["student"]
    assert student["prune_method"] == "nm" and student["nm_pattern"] == "2:4" and student["nm_pattern_ok"] is True
    assert student["sparsity"] == pytest.approx(0.5)
    assert summary["hparams"]["prune_nm"] == "2:4" and summary["hparams"]["prune_amount"] == 0.5


def test_the_early_student_check_leaves_the_random_state_alone(make_cfg):
    """The teacher is built (and trained) after the check: its initial weights must not depend on it."""
    before = torch.get_rng_state()
    check_student(make_cfg("student=cnn", "prune.method=nm", "prune.exclude=[features.0]"), {"num_classes": 10, "channels": 1, "image_size": 8})
    assert torch.equal(torch.get_rng_state(), before)
