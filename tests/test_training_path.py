"""The fast parts of the training path: epoch sums on the device, checkpoints written in the
background, batches gathered at once, the rate-limited progress bar, the quiet console."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

from distill.data.datamodules import build_datamodule
from distill.distillation.epoch_sums import EpochSums
from distill.runtime.checkpoint_io import BackgroundCheckpointIO, load_checkpoint, snapshot
from distill.runtime.console import drop_wandb_anonymous, quiet_third_party
from distill.runtime.cuda_probe import VARIABLE, skip_nvml_check_without_nvml


def test_epoch_sums_give_sample_weighted_means_and_accuracy():
    sums = EpochSums(("loss", "kd"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    sums.update({"loss": torch.tensor(1.0), "kd": torch.tensor(0.5)}, logits, torch.tensor([0, 1, 1]))  # 2 of 3 right
    sums.update({"loss": torch.tensor(4.0), "kd": torch.tensor(2.0)}, logits[:1], torch.tensor([0]))  # 1 of 1
    reduced = []
    means = sums.means(lambda t: reduced.append(t.clone()) or t * 2)  # a "two-rank" sum: the means are unchanged
    assert len(reduced) == 1 and reduced[0][-1] == 4  # one collective per epoch, over 4 samples
    assert means["loss"].item() == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)
    assert means["kd"].item() == pytest.approx((3 * 0.5 + 1 * 2.0) / 4)
    assert means["acc"].item() == pytest.approx(3 / 4)
    assert sums.means() == {}  # zeroed: a new epoch with no sample yet has no figure


def _held_writes(io: BackgroundCheckpointIO, monkeypatch, seconds: float | None = None) -> threading.Event:
    """Hold ``io``'s writer thread before each write until the returned event is set (or for ``seconds``)."""
    gate = threading.Event()
    real_save = io.checkpoint_io.save_checkpoint

    def held_save(*args, **kwargs):
        if seconds is None:
            gate.wait(10)
        else:
            time.sleep(seconds)
        real_save(*args, **kwargs)

    monkeypatch.setattr(io.checkpoint_io, "save_checkpoint", held_save)
    return gate


def test_a_checkpoint_is_written_as_it_was_when_saved(tmp_path, monkeypatch):
    io = BackgroundCheckpointIO()
    gate = _held_writes(io, monkeypatch)  # the write starts only after training changed the weights in place
    weight = torch.ones(1000)
    checkpoint = {"state_dict": {"w": weight}, "hyper_parameters": {"config": {"lr": [0.1, 0.2]}}, "epoch": 3}
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint, path)
    weight.mul_(0)  # the next optimizer step
    checkpoint["hyper_parameters"]["config"]["lr"].append(9)
    gate.set()
    io.wait()
    saved = load_checkpoint(path)
    assert torch.equal(saved["state_dict"]["w"], torch.ones(1000)) and saved["hyper_parameters"]["config"]["lr"] == [0.1, 0.2]
    io.teardown()


def test_the_module_holds_no_epoch_sums_that_ddp_would_broadcast_or_a_cast_would_round():
    from omegaconf import OmegaConf

    from distill.distillation.losses.kd import KDLoss
    from distill.distillation.module import DistillationModule

    module = DistillationModule(torch.nn.Linear(4, 3), None, KDLoss(1.0, 0.0), OmegaConf.create({}), 3)
    assert not any(b.dtype == torch.float64 for b in module.buffers())  # DDP syncs every buffer from rank 0
    module.to(torch.bfloat16)  # a bf16-true run
    module.train_sums.update({"loss": torch.tensor(0.7), "ce": torch.tensor(0.7), "kd": torch.tensor(0.0)},
                             torch.zeros(64, 3), torch.zeros(64, dtype=torch.long))
    for _ in range(999):
        module.train_sums.update({"loss": torch.tensor(0.7), "ce": torch.tensor(0.7), "kd": torch.tensor(0.0)},
                                 torch.zeros(64, 3), torch.zeros(64, dtype=torch.long))
    assert module.train_sums.means()["loss"].item() == pytest.approx(0.7, rel=1e-6)


def test_snapshot_keeps_state_dict_metadata_and_mapping_types():
    state = torch.nn.Linear(2, 2).state_dict()
    copy = snapshot({"state_dict": state, "pair": (1, torch.zeros(1))})
    assert copy["state_dict"]._metadata == state._metadata and type(copy["state_dict"]) is type(state)
    assert copy["state_dict"]["weight"] is not state["weight"] and torch.equal(copy["state_dict"]["weight"], state["weight"])
    assert isinstance(copy["pair"], tuple)


def test_writes_and_removals_happen_in_the_order_asked(tmp_path, monkeypatch):
    io = BackgroundCheckpointIO()
    gate = _held_writes(io, monkeypatch)  # the write is still running when the removal is asked for
    old = tmp_path / "epoch001.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, old)
    io.remove_checkpoint(old)  # Lightning's save_top_k: the previous best goes
    gate.set()
    io.wait()
    assert not old.exists(), "a removal ran before the write of the same file, which then left it behind"
    io.teardown()


def test_a_nonfinite_checkpoint_is_refused_when_saved_and_a_failed_write_is_raised(tmp_path, monkeypatch):
    io = BackgroundCheckpointIO()
    with pytest.raises(FloatingPointError, match="bad.ckpt.*w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
    gate = _held_writes(io, monkeypatch)  # the write fails after its save call returned
    blocked = tmp_path / "file"
    blocked.write_text("")
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}}, blocked / "last.ckpt")  # its directory is a file
    gate.set()
    with pytest.raises(OSError, match="last.ckpt"):
        io.wait()
    gate.clear()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}}, blocked / "again.ckpt")
    gate.set()
    with pytest.raises(OSError, match="again.ckpt"):  # at the end of fit
        io.teardown()
    gate.clear()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}}, blocked / "third.ckpt")
    with pytest.raises(KeyboardInterrupt):  # on the way out of another error, that error stays the run's
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            gate.set()
            io.teardown()  # logs the failed write instead of replacing the exception
            raise
    io.teardown()  # the failure was reported once, not again


def test_a_slurm_requeue_checkpoint_is_on_disk_when_its_save_returns(tmp_path, monkeypatch):
    io = BackgroundCheckpointIO()
    _held_writes(io, monkeypatch, seconds=0.3)
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}}, tmp_path / "hpc_ckpt_1.ckpt")
    assert (tmp_path / "hpc_ckpt_1.ckpt").is_file()  # Lightning requeues the job right after this call
    io.teardown()


def test_an_in_memory_split_is_read_a_batch_at_a_time_in_a_new_order_each_epoch(make_cfg):
    dm = build_datamodule(make_cfg("data=digits", "data.batch_size=50").data)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.batch_sampler.batch_size == 50 and len(loader) == -(-len(dm.train_set) // 50)
    epochs = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)  # what Lightning calls on the loader's batch sampler each epoch
        xs, ys = zip(*loader, strict=True)
        assert sum(len(y) for y in ys) == len(dm.train_set)
        epochs.append(torch.cat(ys))
        x, y = dm.train_set.gather(range(5))
        torch.testing.assert_close(x[3], dm.train_set[3][0])
    assert not torch.equal(epochs[0], epochs[1])  # shuffled anew
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist())


def test_the_nvml_probe_is_switched_off_only_where_nvml_is_missing(monkeypatch):
    monkeypatch.setenv(VARIABLE, "1")
    try:
        import ctypes

        ctypes.CDLL("libnvidia-ml.so.1")
        has_nvml = True
    except OSError:
        has_nvml = False
    assert skip_nvml_check_without_nvml() is (not has_nvml)
    assert (os.environ.get(VARIABLE) == "1") is has_nvml
    monkeypatch.setenv(VARIABLE, "0")
    assert skip_nvml_check_without_nvml() is False and os.environ[VARIABLE] == "0"


def test_third_party_noise_is_dropped_and_other_lines_kept(caplog):
    quiet_third_party()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero.info("Loading `train_dataloader` to estimate number of stepping batches.")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]

    class FakeWandb:
        _wandb_init = {"project": "p", "anonymous": None}

    assert "anonymous" not in drop_wandb_anonymous(FakeWandb())._wandb_init
    FakeWandb._wandb_init = {"anonymous": "allow"}  # asked for by the user: kept
    assert drop_wandb_anonymous(FakeWandb())._wandb_init == {"anonymous": "allow"}


def test_lightning_lines_reach_the_configured_logging_once(monkeypatch):
    root, pl = logging.getLogger(), logging.getLogger("lightning.pytorch")
    own = logging.StreamHandler()  # what Lightning adds when imported before logging is configured
    configured = logging.NullHandler()  # Hydra's job logging
    monkeypatch.setattr(pl, "handlers", [own])
    monkeypatch.setattr(pl, "propagate", False)
    monkeypatch.setattr(root, "handlers", [*root.handlers, configured])
    quiet_third_party()
    assert own not in pl.handlers and pl.propagate  # its records now go to the configured handlers, once
