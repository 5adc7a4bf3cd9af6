"""Quantization-aware training: the callback on every student, conversion, the packed artifact, resume."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from distill.compress.packing import pack_codes, unpack_codes
from distill.compress.quant import backend as quant_backend
from distill.compress.quant.artifact import load_quantized
from distill.compress.quant.callback import QuantizationAwareTraining
from distill.data.datamodules import build_datamodule
from distill.distillation.losses.kd import KDLoss
from distill.distillation.module import DistillationModule
from distill.models.registry import STUDENTS, build_student
from distill.models.sources import SOURCES

OPTIM = OmegaConf.create({"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "momentum": 0.9, "scheduler": "none", "warmup_epochs": 0})
STUDENT_CFG = {"hidden_sizes": [64, 32], "channels": [8, 16], "dropout": 0.0}


def _student_cfg(name: str) -> dict:
    return {"name": name, **STUDENT_CFG}


def _digits(batch_size: int = 64):
    dm = build_datamodule(OmegaConf.create({
        "name": "digits", "batch_size": batch_size, "num_workers": 0, "pin_memory": False, "persistent_workers": False,
        "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0, "augment": False, "root": None,
        "num_samples": 0, "mean": None, "std": None, "num_classes": None, "channels": None, "image_size": None,
    }))
    dm.setup("fit")
    return dm


def _fit(name: str, bits: int, tmp_path, epochs: int = 1, limit: int | None = 2, keep_every_epoch: bool = False, **qat_kwargs):
    dm = _digits()
    torch.manual_seed(0)
    student = build_student(OmegaConf.create(_student_cfg(name)), **dm.shape)
    module = DistillationModule(student, None, KDLoss(1.0, 0.0), OPTIM, dm.num_classes)
    qat = QuantizationAwareTraining(
        bits=bits, shape=dm.shape, output_dir=tmp_path / "out", latency_batch_size=8,
        student_cfg=_student_cfg(name), data_cfg=OmegaConf.to_container(dm.cfg), **qat_kwargs,
    )
    # keep_every_epoch: epoch=<e>-step=<s>.ckpt of every epoch is kept (else only the newest)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1 if keep_every_epoch else 1)
    trainer = L.Trainer(
        max_epochs=epochs, limit_train_batches=limit, limit_val_batches=limit, accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[qat, ckpt],
    )
    trainer.fit(module, datamodule=dm)
    return module, qat, dm, trainer, ckpt


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_codes_round_trips(bits):
    low = -(2 ** (bits - 1)) + 1
    values = torch.randint(low, 2 ** (bits - 1), (1001,))
    packed = pack_codes(values, bits, low)
    assert packed.numel() == (1001 * bits + 7) // 8  # b bits per value, no more
    assert torch.equal(unpack_codes(packed, bits, low, 1001), values)


def test_pack_codes_refuses_out_of_range_values():
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_codes(torch.tensor([0, 16]), 4, 0)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quant_range_is_b_bits(bits):
    lo, hi = quant_backend.quant_range(bits, signed=True)
    assert (lo, hi) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    assert quant_backend.quant_range(bits, signed=False) == (0, 2**bits - 1)


# The flow each named student's QAT takes (backend.py says why resnet18 is FX); a student whose
# flow changes (a torch / torchao upgrade, a model change) must be a decision, not a surprise.
FLOWS = {"mlp": "pt2e", "cnn": "pt2e", "mobilenet_v3_small": "pt2e", "resnet18": "fx"}


def test_every_named_student_has_a_pinned_flow():
    assert set(FLOWS) == set(STUDENTS) - set(SOURCES)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_callback_trains_converts_and_round_trips_every_student(name, tmp_path):
    bits = 4
    # Timed for the two small students only: compiling mobilenet_v3_small's integer graph with Inductor
    # for the timing costs a minute here, and its timing is no part of what this test checks.
    timed = name in ("mlp", "cnn")
    module, qat, dm, trainer, _ = _fit(name, bits, tmp_path, latency_device="cpu" if timed else None)
    assert quant_backend.is_prepared(module.student)
    assert qat.flow_used == FLOWS[name] == quant_backend.flow_of(module.student)
    report = qat.convert_and_measure(module.student, dm.test_dataloader()).summary()
    for key in ("acc_fp32", "acc_quant", "size_bytes_fp32", "size_bytes_quant", "compression",
                *(("latency_ms_fp32", "latency_ms_quant") if timed else ())):
        assert key in report
    assert report["flow"] == FLOWS[name]
    # The converted model holds b-bit integers only (FX: quantized tensors; PT2E: int8 weight constants).
    quantized, meta = load_quantized(report["artifact"])
    assert meta["bits"] == bits
    lo, hi = quant_backend.quant_range(bits, signed=True)
    weights = []
    for value in quantized.state_dict().values():
        weights += [v.int_repr() for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor) and v.is_quantized]
        weights += [value] if isinstance(value, torch.Tensor) and value.dtype == torch.int8 else []
    assert weights
    for w in weights:
        assert lo <= int(w.min()) and int(w.max()) <= hi
    # Loading the artifact back gives the saved model bit for bit.
    x = next(iter(dm.test_dataloader()))[0]
    assert torch.equal(quantized(x), qat.exportable.integer(x))
    assert report["size_bytes_quant"] < report["size_bytes_fp32"]


class _BatchNormProbe(L.Callback):
    """The first BatchNorm's running mean at each training epoch's start and end, and the mode of
    the graph's BatchNorm op in every training and validation batch."""

    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []
        self.modes: dict[str, set[bool]] = {"train": set(), "val": set()}

    @staticmethod
    def _bn(pl_module: L.LightningModule):
        graph = pl_module.student.graph_module
        return next(n for n in graph.graph.nodes if n.target == torch.ops.aten.batch_norm.default), graph

    def _record(self, pl_module: L.LightningModule) -> None:
        node, graph = self._bn(pl_module)
        self.means.append(graph.get_buffer(node.args[3].target).clone())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.modes["train"].add(self._bn(pl_module)[0].args[5])

    def on_validation_batch_end(self, trainer, pl_module, *args) -> None:
        self.modes["val"].add(self._bn(pl_module)[0].args[5])


def test_a_pt2e_student_trains_its_batchnorm_after_each_validation(tmp_path):
    # Lightning restores training mode after validation by setting flags, not by calling train():
    # the exported graph's BatchNorm must still go back to batch statistics (and update them).
    probe = _BatchNormProbe()
    dm = _digits()
    torch.manual_seed(0)
    module = DistillationModule(build_student(OmegaConf.create(_student_cfg("cnn")), **dm.shape), None, KDLoss(1.0, 0.0), OPTIM,
                                dm.num_classes)
    qat = QuantizationAwareTraining(bits=8, shape=dm.shape, output_dir=tmp_path / "out")
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[qat, probe])
    trainer.fit(module, datamodule=dm)
    assert qat.flow_used == "pt2e"
    assert probe.modes == {"train": {True}, "val": {False}}
    start, end = probe.means[2], probe.means[3]  # the second epoch, after a validation
    assert not torch.equal(start, end)


def test_artifact_size_follows_the_bit_width(tmp_path):
    # The default-size MLP: weights dominate the file, so its size tracks b/32 of the fp32 one.
    from distill.compress.quant.artifact import save_quantized_program
    from distill.measure.size import serialized_size_bytes

    cfg = {"name": "mlp", "hidden_sizes": [256, 128], "dropout": 0.0}
    shape = {"num_classes": 10, "channels": 1, "image_size": 8}
    student = build_student(OmegaConf.create(cfg), **shape)
    fp32 = serialized_size_bytes(student)
    sizes = {}
    for bits in (8, 4, 2):
        prepared = quant_backend.prepare_qat(student, bits, True, torch.zeros(1, 1, 8, 8))
        prepared(torch.randn(32, 1, 8, 8))  # calibrate the observers
        path = save_quantized_program(tmp_path / f"q{bits}.pt", quant_backend.convert(prepared), torch.zeros(2, 1, 8, 8),
                                      bits=bits, backend="x86", per_channel=True, student_cfg=cfg, shape=shape)
        sizes[bits] = path.stat().st_size
    assert fp32 / sizes[8] > 3.3 and fp32 / sizes[4] > 5.5 and fp32 / sizes[2] > 8


def test_fake_quant_and_converted_accuracy_agree(tmp_path):
    module, qat, dm, *_ = _fit("mlp", 8, tmp_path, epochs=3, limit=None)
    report = qat.convert_and_measure(module.student, dm.test_dataloader()).summary()
    assert report["acc_quant"] > 0.8  # it learned something, so the comparison means something
    # Fake quantization simulates the integer kernels but does not reproduce their rounding exactly
    # (requantization between layers): a few of the 360 test images may flip. Seen: 0.0 to 1.1 points.
    assert abs(report["acc_fakequant"] - report["acc_quant"]) <= 0.02


def test_schedule_switches_fake_quant_on_at_start_epoch(tmp_path):
    module, qat, *_ = _fit("cnn", 8, tmp_path, epochs=1, start_epoch=1)
    fq = list(quant_backend.fake_quant_modules(module.student))
    assert fq and all(int(m.fake_quant_enabled) == 0 for m in fq)  # epoch 0: fp32 distillation
    qat.apply_schedule(module.student, 1)
    assert all(int(m.fake_quant_enabled) == 1 and int(m.observer_enabled) == 1 for m in fq)
    qat.freeze_observers_epoch = 2
    qat.apply_schedule(module.student, 2)
    assert all(int(m.fake_quant_enabled) == 1 and int(m.observer_enabled) == 0 for m in fq)


QUANT_STATE = (".scale", ".zero_point", ".min_val", ".max_val")  # the fake quantizers' and observers' buffers


class _StateAtFirstStep(L.Callback):
    """Records, before the first training batch of the run, the epoch, the step and the student's state."""

    def __init__(self) -> None:
        self.epoch = self.step = self.state = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.state is None:
            self.epoch, self.step = trainer.current_epoch, trainer.global_step
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_resume_in_the_middle_of_qat_restores_scales(tmp_path):
    # Uninterrupted: 2 epochs of QAT (fake quantization and observers on from epoch 0), 2 steps each,
    # a checkpoint kept at every epoch end.
    module, qat, dm, trainer, ckpt = _fit("cnn", 8, tmp_path / "full", epochs=2, keep_every_epoch=True)
    assert trainer.global_step == 4
    mid_path = tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt"  # after epoch 0: half-way through QAT
    mid = torch.load(mid_path, map_location="cpu", weights_only=True)
    assert (mid["epoch"], mid["global_step"]) == (0, 2)
    quant = {k: v for k, v in mid["state_dict"].items() if k.startswith("student.") and k.endswith(QUANT_STATE)}
    scales = {k: v for k, v in quant.items() if k.endswith(".scale")}
    assert scales and any(not torch.all(v == 1.0) for v in scales.values()), "observers set real scales"

    # A new process would build a float student; the callback prepares it before the restore.
    torch.manual_seed(123)
    student = build_student(OmegaConf.create(_student_cfg("cnn")), **dm.shape)
    resumed = DistillationModule(student, None, KDLoss(1.0, 0.0), OPTIM, dm.num_classes)
    qat2 = QuantizationAwareTraining(bits=8, shape=dm.shape, output_dir=tmp_path / "out2")
    first = _StateAtFirstStep()
    trainer2 = L.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=2, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[qat2, first],
    )
    torch.manual_seed(0)  # the training order is seeded by torch.initial_seed(): the uninterrupted run's seed
    trainer2.fit(resumed, datamodule=dm, ckpt_path=str(mid_path))

    # It trained epoch 1 (2 steps), starting from the checkpoint's quantizer state, not a fresh one.
    assert (first.epoch, first.step, trainer2.global_step) == (1, 2, 4)
    assert first.state.keys() == mid["state_dict"].keys()
    not_restored = [k for k, v in quant.items() if not torch.equal(first.state[k], v)]
    assert not_restored == []
    # The observers kept calibrating while it trained (the scales moved from the checkpoint's) and it
    # ends exactly where the uninterrupted run ended: weights, BatchNorm statistics, scales, zero points, ranges.
    end = resumed.state_dict()
    assert any(not torch.equal(end[k], v) for k, v in scales.items())
    expected = module.state_dict()
    assert end.keys() == expected.keys()
    # num_batches_tracked aside: a PT2E graph counts evaluation batches too (torchao's eval switch
    # keeps the counter's add_), and the resumed run ran no sanity check; BatchNorm with a momentum
    # (every student's) never reads it.
    differ = [k for k, v in expected.items() if not torch.equal(end[k], v) and not k.endswith("num_batches_tracked")]
    assert differ == []


def test_resume_with_other_bits_is_refused(tmp_path):
    module, qat, dm, trainer, ckpt = _fit("mlp", 8, tmp_path, epochs=1)
    student = build_student(OmegaConf.create(_student_cfg("mlp")), **dm.shape)
    resumed = DistillationModule(student, None, KDLoss(1.0, 0.0), OPTIM, dm.num_classes)
    qat4 = QuantizationAwareTraining(bits=4, shape=dm.shape, output_dir=tmp_path / "out2")
    trainer2 = L.Trainer(max_epochs=2, limit_train_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[qat4])
    with pytest.raises(Exception, match="quant.bits=4 but the checkpoint .* quant.bits=8"):
        trainer2.fit(resumed, datamodule=dm, ckpt_path=ckpt.last_model_path)


@pytest.mark.parametrize("flow", ["pt2e", "fx"])
def test_the_packed_program_loads_without_any_prepare_or_convert_step(tmp_path, flow):
    # An FX student's artifact is its QDQ form as a program too (its fbgemm model is the TorchScript file)
    module, qat, dm, *_ = _fit("mlp", 4, tmp_path, flow=flow)
    report = qat.convert_and_measure(module.student, dm.test_dataloader()).summary()
    x = next(iter(dm.test_dataloader()))[0][:16]
    torch.save(x, tmp_path / "x.pt")
    torch.save(qat.exportable.integer(x), tmp_path / "want.pt")
    # A fresh interpreter in which neither quantization flow can even be imported.
    code = (
        "import sys, torch\n"
        "for name in ('torch.ao.quantization.quantize_fx', 'torchao.quantization.pt2e.quantize_pt2e'):\n"
        "    sys.modules[name] = None\n"
        "from distill.compress.quant.artifact import load_quantized\n"
        "model, meta = load_quantized(sys.argv[1])\n"
        "assert meta['format'] == 'distill.quantized-program/1', meta['format']\n"
        "torch.save(model(torch.load(sys.argv[2])), sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", code, report["artifact"], str(tmp_path / "x.pt"), str(tmp_path / "got.pt")], check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "got.pt"), torch.load(tmp_path / "want.pt"))
    assert report["flow"] == flow
    if flow == "pt2e":
        assert report["torchscript"] is None  # a PT2E graph's quantize ops are not TorchScript builtins
    else:  # fbgemm's integer model, as TorchScript: its own rounding, the same predictions almost everywhere
        scripted = torch.jit.load(report["torchscript"])
        got, want = scripted(x), torch.load(tmp_path / "want.pt")
        assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("saved_flow", ["fx", None])  # None: a checkpoint from before PT2E (no flow recorded: FX)
def test_a_resumed_run_prepares_the_student_in_its_checkpoints_flow(tmp_path, saved_flow):
    module, qat, dm, trainer, ckpt = _fit("mlp", 8, tmp_path, epochs=1, flow="fx")
    path = ckpt.last_model_path
    if saved_flow is None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        for state in checkpoint["callbacks"].values():
            state.pop("flow", None)
        torch.save(checkpoint, path)
    student = build_student(OmegaConf.create(_student_cfg("mlp")), **dm.shape)
    resumed = DistillationModule(student, None, KDLoss(1.0, 0.0), OPTIM, dm.num_classes)
    again = QuantizationAwareTraining(bits=8, shape=dm.shape, output_dir=tmp_path / "out2")  # flow "auto": PT2E for a new run
    again.resume_from = path  # as the pipeline sets it (Lightning knows ckpt_path only after setup)
    trainer2 = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[again])
    trainer2.fit(resumed, datamodule=dm, ckpt_path=path)
    assert again.flow_used == "fx" and trainer2.global_step == 3


def test_torchscript_artifact_runs_with_plain_pytorch(tmp_path):
    module, qat, dm, *_ = _fit("mlp", 8, tmp_path, flow="fx")
    report = qat.convert_and_measure(module.student, dm.test_dataloader()).summary()
    x = next(iter(dm.test_dataloader()))[0][:4]
    expected = quant_backend.convert(module.student)(x)
    torch.save(x, tmp_path / "x.pt")
    # A fresh interpreter that never imports distill.
    code = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]); "
        "assert 'distill' not in sys.modules; torch.save(m(x), sys.argv[3])"
    )
    subprocess.run([sys.executable, "-c", code, report["torchscript"], str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_an_empty_quantized_tensor_packs_and_unpacks():
    from distill.compress.quant.artifact import _decode_qtensor, _encode_qtensor

    for dtype, low in ((torch.qint8, -7), (torch.quint8, 0)):
        empty = torch.quantize_per_tensor(torch.empty(0, 4), 0.1, 0, dtype)
        entry = _encode_qtensor(empty, 4)
        assert entry["low"] == low and _decode_qtensor(entry, 4).shape == (0, 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stored_codes_decode_to_themselves_through_the_public_quantize_functions(bits):
    from distill.compress.quant.artifact import _decode_qtensor, _encode_qtensor

    g = torch.Generator().manual_seed(bits)
    lo, hi = quant_backend.quant_range(bits, signed=True)
    codes = torch.randint(lo, hi + 1, (64, 27), generator=g, dtype=torch.int8)
    scales = torch.rand(64, generator=g, dtype=torch.float64) * 1e-1 + 1e-6  # awkward float32 mantissas
    scales = scales.float().double()  # as observers compute them
    weight = torch.quantize_per_channel((codes.double() * scales[:, None]).float(), scales, torch.zeros(64, dtype=torch.int64), 0, torch.qint8)
    assert torch.equal(weight.int_repr(), codes)
    back = _decode_qtensor(_encode_qtensor(weight, bits), bits)
    assert torch.equal(back.int_repr(), codes) and torch.equal(back.q_per_channel_scales(), weight.q_per_channel_scales())
    act = torch.quantize_per_tensor(torch.rand(5, 7, generator=g) * 3, 0.0123457, 3, torch.quint8)
    assert torch.equal(_decode_qtensor(_encode_qtensor(act, 8), 8).int_repr(), act.int_repr())
