"""Pruning: the schedule, achieved sparsity, masks across checkpoints, channel removal, with QAT."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import onnx
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf
from onnx import numpy_helper
from torch import nn

from distill.compress.deploy import OnnxRuntimeModel, export_artifacts
from distill.compress.prune.callback import Pruning, gradual_sparsity
from distill.compress.prune.channel_removal import KeptChannels, count_macs, remove_pruned_channels
from distill.compress.prune.masks import bake, effective
from distill.compress.prune.sparse_format import decode, encode, save_sparse
from distill.compress.quant import backend as quant_backend
from distill.compress.quant.callback import QuantizationAwareTraining
from distill.compress.quant.qdq import QDQConv2d
from distill.distillation.losses.kd import KDLoss
from distill.distillation.module import DistillationModule
from distill.models.registry import build_student
from tests.test_qat import OPTIM, _digits

SHAPE = {"num_classes": 10, "channels": 1, "image_size": 8}


def _student(name: str):
    torch.manual_seed(0)
    cfg = {"name": name, "hidden_sizes": [256, 128], "channels": [32, 64, 128], "dropout": 0.0}
    return build_student(OmegaConf.create(cfg), **SHAPE)


class _Holder(torch.nn.Module):
    """What the callback sees: a module with a ``student`` attribute."""

    def __init__(self, student):
        super().__init__()
        self.student = student


def _setup(callback: Pruning, student) -> _Holder:
    holder = _Holder(student)
    callback.setup(None, holder, "fit")
    return holder


def test_gradual_schedule_follows_zhu_and_gupta():
    final, start, end = 0.8, 2, 10
    assert gradual_sparsity(1, start, end, final) == 0.0
    assert gradual_sparsity(start, start, end, final) == 0.0
    assert gradual_sparsity(end, start, end, final) == pytest.approx(final)
    assert gradual_sparsity(end + 5, start, end, final) == pytest.approx(final)
    for t in (3, 6, 9):
        expected = final * (1 - (1 - (t - start) / (end - start)) ** 3)
        assert gradual_sparsity(t, start, end, final) == pytest.approx(expected)
    values = [gradual_sparsity(t, start, end, final) for t in range(0, 12)]
    assert values == sorted(values)  # sparsity only grows


@pytest.mark.parametrize(("method", "scope"), [("magnitude", "global"), ("magnitude", "layer"), ("structured", "layer")])
@pytest.mark.parametrize("student", ["mlp", "cnn"])
def test_achieved_sparsity_matches_the_target(method, scope, student):
    callback = Pruning(method, 0.7, scope=scope, schedule="oneshot", sample_shape=(1, 8, 8))
    holder = _setup(callback, _student(student))
    callback.prune_to(0.3)
    first = {p: m.weight_mask.clone() for p, m in callback._layers}
    callback.prune_to(0.7)
    report = callback.sparsity()
    assert report["global"] == pytest.approx(0.7, abs=0.01)
    if scope == "layer":
        for path, value in report["per_layer"].items():
            assert value == pytest.approx(0.7, abs=0.02), path
    for path, module in callback._layers:  # what was pruned at 30 % stays pruned at 70 %
        assert torch.all(module.weight_mask[first[path] == 0] == 0)
    assert holder.student(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_structured_pruning_zeroes_whole_channels_with_their_batchnorm():
    callback = Pruning("structured", 0.5, scope="layer", schedule="oneshot", sample_shape=(1, 8, 8))
    holder = _setup(callback, _student("cnn"))
    callback.prune_to(0.5)
    conv = holder.student.features[0]
    bn = holder.student.features[1]
    dead = ~conv.weight_mask.flatten(1).any(dim=1)
    assert int(dead.sum()) == 16
    assert torch.all(effective(bn, "weight")[dead] == 0) and torch.all(effective(bn, "bias")[dead] == 0)
    # The classifier keeps all of its outputs.
    assert "head.2" not in dict(callback._layers)


def _assert_kept(model: nn.Module, cut) -> None:
    """What each weight layer kept, in its original indices: the shrunk weights are exactly those rows and columns."""
    baked, modules = bake(copy.deepcopy(model)), dict(cut.model.named_modules())
    assert set(cut.kept) >= set(cut.removed)
    for name, layer in baked.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            kept = cut.kept.get(name, KeptChannels())
            want = layer.weight[list(kept.out)] if kept.out is not None else layer.weight
            want = want[:, list(kept.in_)] if kept.in_ is not None else want
            assert torch.equal(modules[name].weight, want), name


@pytest.mark.parametrize("student", ["mlp", "cnn"])
def test_removing_pruned_channels_keeps_the_outputs(student):
    callback = Pruning("structured", 0.5, scope="layer", schedule="oneshot", sample_shape=(1, 8, 8))
    holder = _setup(callback, _student(student))
    model = holder.student
    # Non-trivial BatchNorm statistics, as after training.
    model.train()
    with torch.no_grad():
        model(torch.randn(256, 1, 8, 8) * 2 + 0.5)
    callback.prune_to(0.5)
    model.eval()
    example = torch.zeros(1, 1, 8, 8)
    cut = remove_pruned_channels(model, example, callback.pruned_channels())
    shrunk, removed = cut.model, cut.removed
    assert removed and all(n > 0 for n in removed.values())
    _assert_kept(model, cut)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), model(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in shrunk.parameters()) < 0.5 * sum(p.numel() for p in _student(student).parameters())
    assert count_macs(shrunk, example) < 0.5 * count_macs(model, example)


def test_sparse_encoding_round_trips_and_is_smaller(tmp_path):
    callback = Pruning("magnitude", 0.7, schedule="oneshot")
    holder = _setup(callback, _student("mlp"))
    callback.prune_to(0.7)
    from distill.compress.prune.masks import bake

    state = bake(holder.student).state_dict()
    decoded = decode(encode(state))
    assert all(torch.equal(decoded[k], state[k]) for k in state)
    dense = sum(v.numel() * v.element_size() for v in state.values())
    assert save_sparse(tmp_path / "s.pt", state, {}).stat().st_size < 0.4 * dense  # 0.3 x 4 bytes + 1 bit per weight


class _AssertMasked(Callback):
    """Fails if any masked weight is non-zero when a training step starts."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks, self.checked = masks, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        modules = dict(pl_module.student.named_modules())
        for path, mask in self.masks.items():
            w = effective(modules[path], "weight")
            assert torch.all(w[mask == 0] == 0), path
        self.checked += 1


def test_masks_survive_checkpoint_and_resume(tmp_path):
    dm = _digits()
    module = DistillationModule(_student("mlp"), None, KDLoss(1.0, 0.0), OPTIM, 10)
    pruning = Pruning("magnitude", 0.6, schedule="oneshot", start_epoch=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning, ckpt])
    trainer.fit(module, datamodule=dm)
    saved = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=True)
    masks = {k[len("student."):-len(".weight_mask")]: v for k, v in saved["state_dict"].items() if k.endswith("weight_mask")}
    assert masks and sum(int((m == 0).sum()) for m in masks.values()) > 0

    # A new process: a dense student; the callback re-creates the reparametrisation before restore.
    resumed = DistillationModule(_student("mlp"), None, KDLoss(1.0, 0.0), OPTIM, 10)
    check = _AssertMasked(masks)
    trainer2 = L.Trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[Pruning("magnitude", 0.6, schedule="oneshot", start_epoch=0), check])
    trainer2.fit(resumed, datamodule=dm, ckpt_path=ckpt.last_model_path)
    assert check.checked == 6  # every step of the two resumed epochs, from the first one
    modules = dict(resumed.student.named_modules())
    for path, mask in masks.items():
        assert torch.equal(modules[path].weight_mask, mask)


def test_pruning_with_qat_keeps_zeros_after_conversion(tmp_path):
    dm = _digits()
    module = DistillationModule(_student("cnn"), None, KDLoss(1.0, 0.0), OPTIM, 10)
    qat = QuantizationAwareTraining(bits=8, shape=dm.shape, output_dir=tmp_path, flow="fx")  # train.py's choice with pruning
    pruning = Pruning("magnitude", 0.7, schedule="oneshot", start_epoch=0)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[qat, pruning])
    trainer.fit(module, datamodule=dm)
    masks = {p: m.weight_mask.clone() for p, m in pruning._layers}
    assert pruning.sparsity()["global"] == pytest.approx(0.7, abs=0.01)
    quantized = quant_backend.convert(module.student)
    qmodules = dict(quantized.named_modules())
    checked = 0
    for path, mask in masks.items():
        weight = qmodules[path].weight()
        assert torch.all(weight.int_repr()[mask == 0] == 0), path
        checked += 1
    assert checked == len(masks)


def test_pruning_a_pt2e_qat_student_is_a_named_error(tmp_path):
    dm = _digits()
    module = DistillationModule(_student("cnn"), None, KDLoss(1.0, 0.0), OPTIM, 10)
    callbacks = [QuantizationAwareTraining(bits=8, shape=dm.shape, output_dir=tmp_path), Pruning("magnitude", 0.5, schedule="oneshot")]
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    with pytest.raises(ValueError, match="QAT with pruning takes the FX flow"):
        trainer.fit(module, datamodule=dm)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_step_interval_counts_optimizer_steps_and_stops_at_end(monkeypatch, accumulate):
    """prune.interval=step: events at start + k * frequency and at end, in optimizer steps (what
    global_step counts), once per step however many batches it accumulates, and none after end."""
    from types import SimpleNamespace

    callback = Pruning("magnitude", 0.5, schedule="gradual", start_epoch=1, end_epoch=3, frequency=4, interval="step")
    events: list[int] = []
    trainer = SimpleNamespace(num_training_batches=8 * accumulate, accumulate_grad_batches=accumulate, global_step=0)
    monkeypatch.setattr(callback, "prune_to", lambda sparsity, *_: events.append(trainer.global_step))
    for step in range(6 * 8):  # six epochs of 8 optimizer steps
        trainer.global_step = step
        for batch in range(accumulate):
            callback.on_train_batch_start(trainer, None, None, batch)
    assert events == [8, 12, 16, 20, 24]  # epochs 1 to 3 = steps 8 to 24, every 4, then nothing


@pytest.mark.parametrize("student", ["resnet18", "mobilenet_v3_small"])
def test_residual_and_depthwise_students_keep_their_outputs_after_removal(student):
    """Structured pruning of coupled channels: a residual stream (ResNet-18's shortcuts) and
    depthwise / squeeze-excite blocks (MobileNetV3) lose each channel in every layer that writes it,
    so removing the channels leaves the outputs on a test batch unchanged (within 1e-4)."""
    callback = Pruning("structured", 0.5, scope="layer", schedule="oneshot", sample_shape=(1, 8, 8))
    model = _setup(callback, build_student(OmegaConf.create({"name": student}), **SHAPE)).student
    dm = _digits()
    dm.setup("test")
    x = next(iter(dm.test_dataloader(shard=False)))[0]
    model.train()
    with torch.no_grad():  # BatchNorm statistics of real images, as after training
        for _ in range(3):
            model(x)
    callback.prune_to(0.5)
    model.eval()
    pruned = callback.pruned_channels()
    assert all(len(v) > 0 for v in pruned.values())
    cut = remove_pruned_channels(model, torch.zeros(1, 1, 8, 8), pruned)
    shrunk, removed = cut.model, cut.removed
    assert removed
    _assert_kept(model, cut)  # channels coupled across a residual add or a depthwise conv: one index set each
    with torch.no_grad():
        assert float((shrunk(x) - model(x)).abs().max()) < 1e-4
    # Half of each group's channels: about a quarter of the multiply-adds of a conv between two
    # pruned groups, never the 15x drop of removing live shortcut channels.
    ratio = count_macs(model, torch.zeros(1, 1, 8, 8)) / count_macs(shrunk, torch.zeros(1, 1, 8, 8))
    assert 2.0 < ratio < 5.0, ratio


def _qat_structured(tmp_path, latency_device: str | None = "cpu"):
    """A cnn student FX-prepared for 8-bit QAT, half of each conv's channels pruned after its first epoch."""
    dm = _digits()
    module = DistillationModule(_student("cnn"), None, KDLoss(1.0, 0.0), OPTIM, 10)
    qat = QuantizationAwareTraining(bits=8, shape=dm.shape, output_dir=tmp_path, flow="fx", latency_device=latency_device)
    # Pruned after an epoch of training: the BatchNorm statistics are the data's by then, not zero.
    pruning = Pruning("structured", 0.5, scope="layer", schedule="oneshot", start_epoch=1, sample_shape=(1, 8, 8))
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[qat, pruning])
    trainer.fit(module, datamodule=dm)
    return module, qat, pruning, dm, trainer


def test_structured_pruning_of_a_qat_student_masks_its_fused_batchnorm(tmp_path):
    """With QAT the student is FX-prepared (conv and BatchNorm fused); the groups are found on the
    QAT callback's float copy and every producer, the fused BatchNorm's shift included, is masked
    (its scale is not: the fused conv divides by it), and training stays finite."""
    module, _, _, dm, trainer = _qat_structured(tmp_path)
    fused = [m for m in module.student.modules() if isinstance(getattr(m, "bn", None), torch.nn.BatchNorm2d)]
    assert fused
    for conv in fused:
        dead = ~conv.weight_mask.flatten(1).any(dim=1)
        assert int(dead.sum()) == conv.weight.shape[0] // 2
        assert torch.all(effective(conv.bn, "bias")[dead] == 0)
        assert torch.all(conv.bn.running_mean[dead] == 0)  # so the channel is zero in eval mode too
    outputs = {}
    hooks = [conv.register_forward_hook(lambda m, i, o, c=conv: outputs.__setitem__(c, o)) for conv in fused]
    module.student.eval()
    with torch.no_grad():
        module.student(next(iter(dm.val_dataloader()))[0])
    for h in hooks:
        h.remove()
    for conv, out in outputs.items():
        dead = ~conv.weight_mask.flatten(1).any(dim=1)
        assert torch.all(out[:, dead] == 0)
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["train/loss"].item()))


def test_a_structured_pruned_qat_student_deploys_int8_and_fp32_files_without_the_channels(tmp_path):
    """The QAT callback cuts the pruned channels out of the deployable forms (Torch-Pruning on the
    fp32 form, the same rows and columns of the integer weights and their scales): the files hold
    the smaller network and compute what the masked network's files do."""
    module, qat, pruning, dm, _ = _qat_structured(tmp_path, latency_device=None)
    pruned = pruning.channels_to_remove()
    assert pruned is not None and set(pruned) == {"features.0", "features.4", "features.7"}
    loader = dm.test_dataloader(shard=False)
    files = {}
    for label, channels in (("masked", None), ("shrunk", pruned)):
        report = qat.convert_and_measure(module.student, loader, channels)
        forms = qat.deployable_quantized()
        out = tmp_path / label
        out.mkdir()
        files[label] = {r.format: r for r in export_artifacts(forms.fp32, ["onnx"], out, loader, (1, 8, 8), latency_batch=8,
                                                               threads=1, max_acc_drop=0.5, quantized=forms, device=None)}
    assert report.channels_removed == {"features.0": 16, "features.4": 32, "features.7": 64}
    convs = [m for m in forms.qdq.modules() if isinstance(m, QDQConv2d)]
    assert [tuple(c.weight.codes.shape[:2]) for c in convs] == [(16, 1), (32, 16), (64, 32)]
    assert [tuple(c.weight.scale.shape) for c in convs] == [(16,), (32,), (64,)]  # per-channel scales cut too
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(files["shrunk"]["onnx_int8"].path).graph.initializer}
    shapes = sorted(a.shape for a in weights.values() if a.dtype == np.int8 and a.ndim >= 2)
    assert shapes == sorted([(16, 4, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)])  # the first conv aligned to 4 inputs
    x = next(iter(loader))[0]
    for fmt in ("onnx_int8", "onnx"):
        masked, shrunk = (OnnxRuntimeModel(files[k][fmt].path, threads=1)(x) for k in ("masked", "shrunk"))
        # the same integer codes and scales with fewer zero terms summed: float rounding, which may
        # move a requantized code by one step, no more
        assert (shrunk - masked).abs().max() <= 0.02 * float(masked.abs().max()), fmt
        assert (shrunk.argmax(1) == masked.argmax(1)).float().mean() >= 0.98, fmt
        assert files["shrunk"][fmt].size_bytes < 0.5 * files["masked"][fmt].size_bytes
