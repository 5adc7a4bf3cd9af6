"""Nothing lost: kill and resume, SIGTERM, SLURM requeue (slow tier), and atomic, finite checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, run_script

pytestmark = pytest.mark.xdist_group("slurm")  # its module's reference run, and the SLURM cluster test_sweeps.py uses too

# A run long enough to be interrupted mid-way: a CNN student, 4 epochs of 12 batches.
RUN = ["logger=csv", "student=cnn", "teacher=resnet18", "teacher.epochs=1", "trainer.max_epochs=4",
       "trainer.limit_train_batches=12", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
       "trainer.accelerator=cpu", "quant.latency_batch_size=32",
       "measure.latency=off", "export.formats=[]"]  # resuming is checked on checkpoints and accuracy, not timings or files


def _env(tmp_path: Path) -> dict[str, str]:
    return {"DISTILL_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def _start(tmp_path: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, **_env(tmp_path)}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: DDP workers die with it


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted one-process run, and the teacher cache it filled, shared by the tests below."""
    base = tmp_path_factory.mktemp("reference")
    result = run_script("train.py", *RUN, f"hydra.run.dir={base}/run", cwd=base, env=_env(base), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return base


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hung rank fails in minutes
@pytest.mark.parametrize(
    "extra",
    [pytest.param([], id="one-process"),
     pytest.param(["strategy=ddp", "trainer.devices=2", "quant.bits=8", "prune.method=magnitude", "prune.amount=0.5",
                   "prune.end_epoch=2", "prune.importance=fisher"], id="ddp-qat-pruning")],  # gradient-scored masks
)
def test_sigkill_after_a_checkpoint_then_rerun_ends_bitwise_equal(tmp_path, request, extra):
    if extra:
        base = tmp_path
        result = run_script("train.py", *RUN, *extra, f"hydra.run.dir={base}/run", cwd=base, env=_env(base), timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        base = request.getfixturevalue("reference")

    victim = tmp_path / "victim"
    proc = _start(base, victim, *extra)
    _wait_for(victim / "checkpoints" / "last.ckpt", proc)  # end of epoch 0 (written atomically)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (victim / "summary.json").exists(), "killed before it finished"

    # The same command again, in the same run directory: resume=auto continues from last.ckpt.
    again = run_script("train.py", *RUN, *extra, f"hydra.run.dir={victim}", cwd=tmp_path, env=_env(base), timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume: continuing from" in (victim / "train.log").read_text()
    _assert_bitwise_equal(base / "run" / "checkpoints" / "last.ckpt", victim / "checkpoints" / "last.ckpt")
    ref, got = (json.loads((d / "summary.json").read_text())["student"] for d in (base / "run", victim))
    assert got["test_acc"] == ref["test_acc"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hung rank fails in minutes
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_mid_epoch_checkpoint_exits_128_plus_signum_and_resumes_exactly(tmp_path, reference, sig):
    run_dir, marker = tmp_path / "run", tmp_path / "at-step-17"
    # The run holds at step 17 (epoch 1 of 12-batch epochs) until the signal comes: it lands mid-epoch.
    proc = _start(reference, run_dir, "+callbacks.pause._target_=tests.pause_callback.PauseAtStep",
                  "+callbacks.pause.step=17", f"+callbacks.pause.marker={marker}")
    _wait_for(marker, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert f"stopped by {signal.Signals(sig).name}: checkpoint saved to {run_dir / 'checkpoints' / 'last.ckpt'}" in stderr
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 17, "the checkpoint is of the step the signal arrived at"
    # The same command again (without the pause): it continues from step 17 and ends where the reference did.
    again = run_script("train.py", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=_env(reference), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_bitwise_equal(reference / "run" / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hung rank fails in minutes
def test_slurm_requeue_resumes_to_the_uninterrupted_result(tmp_path, slurm_partition):
    """Two identical jobs of one sweep; the second is requeued (`scontrol requeue`) mid-run."""
    env = {**os.environ, **_env(tmp_path)}
    sweep = tmp_path / "sweep"
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", *RUN, "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_partition}",
         "hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1", "seed=0,0", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(sweep / "1" / "checkpoints" / "last.ckpt", launcher, timeout=900)
    [job] = [p.name for p in (sweep / ".submitit").iterdir() if p.name.endswith("_1")]
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    # SLURM holds a requeued job for two minutes (its begin time); a cluster would wait, the test need not.
    deadline = time.monotonic() + 120
    while subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip() != "PENDING":
        assert time.monotonic() < deadline, f"job {job} was not requeued"
        time.sleep(0.5)
    # (If the job has started again meanwhile, the update fails harmlessly.)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False, capture_output=True)
    _, stderr = launcher.communicate(timeout=1200)
    assert launcher.returncode == 0, stderr[-4000:]
    log = (sweep / "1" / "train.log").read_text()
    assert "stopped by SIGTERM: checkpoint saved to" in log and "resume: continuing from" in log
    _assert_bitwise_equal(sweep / "0" / "checkpoints" / "last.ckpt", sweep / "1" / "checkpoints" / "last.ckpt")


# --- checkpoint files ----------------------------------------------------------------------------

_WRITER = """
import sys, torch
from distill.runtime.checkpoint_io import AtomicCheckpointIO
io, target, i = AtomicCheckpointIO(), sys.argv[1], 0
big = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB: a write takes long enough to be killed half-way
while True:
    io.save_checkpoint({"state_dict": {"w": big + i}, "i": i}, target)
    i += 1
"""


def test_random_kills_while_saving_never_leave_a_partial_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    rng = __import__("random").Random(0)
    for attempt in range(15):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=ROOT)
        while not target.exists() and proc.poll() is None:  # Python and torch are up: writes are under way
            time.sleep(0.01)
        time.sleep(rng.random() * 0.3)
        proc.kill()
        proc.wait()
        if target.exists():  # absent, or complete and loadable
            saved = torch.load(target, map_location="cpu", weights_only=True)
            expected = torch.arange(1_000_000, dtype=torch.float32) + saved["i"]
            assert torch.equal(saved["state_dict"]["w"], expected), f"attempt {attempt}: a mixed or partial file"
    # A kill can leave a hidden temporary file; no reader ever opens those.
    assert all(p.name == "last.ckpt" or (p.name.startswith(".last.ckpt.") and p.suffix == ".tmp") for p in tmp_path.iterdir())


def test_non_finite_weights_are_never_written(tmp_path):
    from distill.runtime.checkpoint_io import AtomicCheckpointIO

    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    with pytest.raises(FloatingPointError, match="non-finite values in w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan"), 2.0])}}, target)
    assert torch.equal(_weights(target)["w"], torch.ones(3))  # the previous checkpoint is intact


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path):
    from distill.runtime.checkpoint_io import AtomicCheckpointIO

    disk = tmp_path / "tmpfs"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        io, target = AtomicCheckpointIO(), disk / "last.ckpt"
        io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, target)
        with pytest.raises(OSError):
            io.save_checkpoint({"state_dict": {"w": torch.zeros(1_000_000)}}, target)  # 4 MB > 2 MB
        assert torch.equal(_weights(target)["w"], torch.ones(1000))
        assert [p.name for p in disk.iterdir()] == ["last.ckpt"]  # the partial temporary file is gone
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_resume_auto_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    from distill.runtime.checkpoint_io import find_resume_checkpoint

    good, bad = tmp_path / "epoch001.ckpt", tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    torch.save({"state_dict": {"w": torch.ones(100_000)}}, bad)
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated, and newer
    os.utime(good, (1, 1))
    assert find_resume_checkpoint(tmp_path) == good
    assert f"skipping unreadable checkpoint: checkpoint {bad} is corrupt" in caplog.text


def test_resume_auto_removes_temporary_files_left_by_a_killed_save(tmp_path, caplog):
    from distill.runtime.checkpoint_io import find_resume_checkpoint

    good = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    stale = tmp_path / ".last.ckpt.k2j3h4.tmp"
    stale.write_bytes(b"PK\x03\x04 half")
    other = tmp_path / "notes.tmp"  # not ours: kept
    other.write_text("x")
    caplog.set_level("INFO", logger="distill.runtime.checkpoint_io")
    assert find_resume_checkpoint(tmp_path) == good
    assert not stale.exists() and other.exists()
    assert "removed .last.ckpt.k2j3h4.tmp" in caplog.text


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, evil)
    result = run_script("evaluate.py", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert result.returncode == 2 and str(evil) in result.stderr
    train = run_script("train.py", "debug=fast", "logger=csv", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
                       env=_env(tmp_path))
    assert train.returncode == 2 and f"ckpt_path {evil} is corrupt or not a PyTorch checkpoint" in train.stderr
    assert not marker.exists()  # the payload never ran


def test_nan_loss_stops_within_one_step_and_writes_no_bad_checkpoint(tmp_path):
    blow_up = ["optim.name=sgd", "optim.lr=1e30", "optim.momentum=0"]
    result = run_script("train.py", *RUN, *blow_up, "teacher.epochs=0", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
                        env=_env(tmp_path))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite training loss at epoch 0, step" in result.stderr
    for ckpt in (tmp_path / "run").rglob("*.ckpt"):
        assert all(torch.isfinite(v).all() for v in _weights(ckpt).values() if v.is_floating_point())



def test_on_nonfinite_skip_drops_the_batch_and_counts_it(make_cfg):
    from distill.distillation.losses.kd import KDLoss
    from distill.distillation.module import DistillationModule
    from distill.errors import NonFiniteLossError
    from distill.models.registry import build_student

    cfg = make_cfg()
    batch = (torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))
    for skip in (False, True):
        student = build_student(cfg.student, num_classes=10, channels=1, image_size=8)
        module = DistillationModule(student, None, KDLoss(4.0, 0.0), cfg.optim, 10, skip_nonfinite=skip)
        if not skip:
            with pytest.raises(NonFiniteLossError, match="loss.on_nonfinite=skip"):
                module.training_step(batch, 0)
        else:
            assert module.training_step(batch, 0) is None  # no backward, no optimizer step
            assert module.skipped_batches == 1
