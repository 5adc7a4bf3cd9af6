from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.errors import CheckpointError
from distill.teacher.provision import TeacherCache, provision_teacher, teacher_key

SHAPE = {"num_classes": 3, "channels": 1, "image_size": 8}
FP = {"name": "synthetic", "split_seed": 0}


def cfg_for(cache_dir: Path, **teacher) -> OmegaConf:
    t = {"name": "resnet18", "pretrained": False, "checkpoint": None, "epochs": 1, "batch_size": 8,
         "optim": {"name": "sgd", "lr": 0.1}, "cache_dir": str(cache_dir), **teacher}
    return OmegaConf.create({"teacher": t, "seed": 0})


def fake_train(calls: list[int]):
    def train(model: torch.nn.Module) -> float:
        calls.append(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # a recognisable change
        return 0.5

    return train


def test_key_depends_on_what_determines_the_teacher(tmp_path):
    cfg = cfg_for(tmp_path)
    base = teacher_key(cfg.teacher, FP, 0)
    assert base == teacher_key(cfg_for(tmp_path / "elsewhere").teacher, FP, 0)  # cache_dir is not in the key
    assert base != teacher_key(cfg_for(tmp_path, epochs=2).teacher, FP, 0)
    assert base != teacher_key(cfg.teacher, {**FP, "split_seed": 1}, 0)
    assert base != teacher_key(cfg.teacher, FP, 1)


def _image_tree(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _teacher_key_for(make_cfg, root: Path, *overrides: str) -> str:
    from distill.data.datamodules import build_datamodule
    from distill.teacher.provision import teacher_fingerprint

    cfg = make_cfg("data=imagefolder", f"data.root={root}", *overrides)
    return teacher_key(cfg.teacher, teacher_fingerprint(cfg, build_datamodule(cfg.data).fingerprint()), int(cfg.seed))


def test_the_key_follows_the_data_not_its_location_and_the_teachers_own_training(make_cfg, tmp_path):
    """Issue 15, defect 8: data staged elsewhere (a SLURM job's $TMPDIR) is the same teacher; the
    student's augmentation is not the teacher's; precision, accumulation and clipping are."""
    here = _image_tree(tmp_path / "here")
    base = _teacher_key_for(make_cfg, here, "teacher.augment=true")
    import shutil

    moved = tmp_path / "scratch" / "copy"
    shutil.copytree(here, moved)
    assert _teacher_key_for(make_cfg, moved, "teacher.augment=true") == base
    assert _teacher_key_for(make_cfg, here, "teacher.augment=true", "data.augment=true") == base
    for changed in ("trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=1.0",
                    "teacher.augment=false", "+teacher.trainer.precision=bf16-mixed"):
        assert _teacher_key_for(make_cfg, here, "teacher.augment=true", changed) != base, changed
    # teacher.trainer settings that do not change what it learns leave the key alone (and an empty
    # teacher.trainer is the key teachers had before the setting existed)
    assert _teacher_key_for(make_cfg, here, "teacher.augment=true", "+teacher.trainer.enable_progress_bar=false") == base
    from omegaconf import OmegaConf

    from distill.data.datamodules import build_datamodule
    from distill.teacher.provision import teacher_fingerprint

    cfg = make_cfg("data=imagefolder", f"data.root={here}", "teacher.augment=true")
    without = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items() if k != "trainer"})
    fingerprint = teacher_fingerprint(cfg, build_datamodule(cfg.data).fingerprint())
    assert teacher_key(without, fingerprint, int(cfg.seed)) == base
    (moved / "train" / "cat" / "extra.png").write_bytes((here / "train" / "cat" / "0.png").read_bytes())
    assert _teacher_key_for(make_cfg, moved, "teacher.augment=true") != base  # other files: another teacher


def test_train_once_then_reuse(tmp_path):
    calls: list[int] = []
    cfg = cfg_for(tmp_path)
    first, info1 = provision_teacher(cfg, SHAPE, FP, fake_train(calls))
    second, info2 = provision_teacher(cfg, SHAPE, FP, fake_train(calls))
    assert calls == [1]
    assert (info1.source, info2.source) == ("trained", "cache")
    assert info2.test_acc == 0.5
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not second.training and not any(p.requires_grad for p in second.parameters())


def test_corrupt_entry_is_set_aside_and_rebuilt(tmp_path):
    calls: list[int] = []
    cfg = cfg_for(tmp_path)
    provision_teacher(cfg, SHAPE, FP, fake_train(calls))
    [entry] = tmp_path.glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated
    _, info = provision_teacher(cfg, SHAPE, FP, fake_train(calls))
    assert calls == [1, 1] and info.source == "trained"
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 1


def test_explicit_checkpoint_is_loaded_and_bad_one_named(tmp_path):
    calls: list[int] = []
    provision_teacher(cfg_for(tmp_path), SHAPE, FP, fake_train(calls))
    [entry] = tmp_path.glob("*.pt")
    _, info = provision_teacher(cfg_for(tmp_path / "other", checkpoint=str(entry)), SHAPE, FP, fake_train(calls))
    assert info.source == "checkpoint" and info.test_acc == 0.5 and calls == [1]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        provision_teacher(cfg_for(tmp_path, checkpoint=str(bad)), SHAPE, FP, fake_train(calls))
    with pytest.raises(CheckpointError, match="does not fit teacher=resnet50"):
        provision_teacher(cfg_for(tmp_path, name="resnet50", checkpoint=str(entry)), SHAPE, FP, fake_train(calls))


# Put at the top of a worker script: it notes in ``marker`` when it starts to acquire a lock
# ("locking <pid> <lock file>"), so a test can see that a worker is waiting on a given lock.
LOGGED_LOCKS = textwrap.dedent(
    """
    def note(line):
        with open(marker, "a") as fh:
            fh.write(line + "\\n")

    acquire = filelock.FileLock.acquire
    def logged_acquire(self, *args, **kwargs):
        note(f"locking {os.getpid()} {self.lock_file}")
        return acquire(self, *args, **kwargs)
    filelock.FileLock.acquire = logged_acquire
    """
)


# Each worker notes when it starts to acquire a lock ("locking <pid> <lock file>") and when it trains;
# the training then holds (with the lock) until the test creates the "go" file.
WORKER = textwrap.dedent(
    """
    import os, sys, time, torch, filelock
    from omegaconf import OmegaConf
    from distill.teacher.provision import provision_teacher
    cache, marker, out, go = sys.argv[1:5]

    # LOGGED_LOCKS

    cfg = OmegaConf.create({"teacher": {"name": "resnet18", "pretrained": False, "checkpoint": None, "epochs": 1,
                                        "cache_dir": cache}, "seed": 0})
    def train(model):
        note(f"trained {os.getpid()}")
        deadline = time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.02)
        torch.nn.init.constant_(model.fc.weight, 0.25)
        return 0.75
    model, info = provision_teacher(cfg, {"num_classes": 3, "channels": 1, "image_size": 8}, {"d": 1}, train)
    torch.save({"fc": model.fc.weight, "source": info.source}, out)
    """
).replace("# LOGGED_LOCKS", LOGGED_LOCKS)


def _lines(marker: Path, word: str) -> list[str]:
    return [line for line in marker.read_text().splitlines() if line.startswith(word)] if marker.exists() else []


def _waiting_on(marker: Path, lock_file: str) -> set[str]:
    """The workers (pids) that have started to acquire ``lock_file``."""
    return {pid for _, pid, path in (line.split(" ", 2) for line in _lines(marker, "locking ")) if path == lock_file}


def _wait_until(condition, procs: list[subprocess.Popen], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), f"a worker exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.timeout(300)
def test_two_processes_train_the_teacher_once(tmp_path):
    """The overlap is made certain, not hoped for: the test holds the teacher's lock until both workers
    wait on it, and the first to get it trains until the test lets it finish, with the other waiting."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    marker, go, cache_dir = tmp_path / "marker.txt", tmp_path / "go", tmp_path / "cache"
    root = Path(__file__).resolve().parents[1]
    cfg = OmegaConf.create({"teacher": {"name": "resnet18", "pretrained": False, "checkpoint": None, "epochs": 1,
                                        "cache_dir": str(cache_dir)}, "seed": 0})
    cache, key = TeacherCache(cache_dir), teacher_key(cfg.teacher, {"d": 1}, 0)  # the workers' entry
    lock = cache.lock("resnet18", key)  # the lock provision_teacher takes for it
    procs: list[subprocess.Popen] = []
    try:
        with lock:
            procs = [subprocess.Popen([sys.executable, str(script), str(cache_dir), str(marker), str(tmp_path / f"out{i}.pt"), str(go)],
                                      cwd=root) for i in range(2)]

            def both_at_the_lock() -> bool:
                assert _lines(marker, "trained") == [], "a worker trained while the test held the teacher's lock"
                return len(_waiting_on(marker, lock.lock_file)) == 2

            _wait_until(both_at_the_lock, procs, "both workers to reach the lock")
            time.sleep(0.5)  # both are blocked on the held lock: neither trains, nothing is written
            assert all(p.poll() is None for p in procs)
            assert _lines(marker, "trained") == [] and not cache.path("resnet18", key).exists()
        # Released: one worker gets the lock and trains; the other waits for it, however long it takes.
        _wait_until(lambda: len(_lines(marker, "trained")) == 1, procs, "one worker to train")
        time.sleep(0.5)
        assert len(_lines(marker, "trained")) == 1 and all(p.poll() is None for p in procs)
        go.touch()
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert len(_lines(marker, "trained")) == 1
    outs = [torch.load(tmp_path / f"out{i}.pt") for i in range(2)]
    assert sorted(o["source"] for o in outs) == ["cache", "trained"]
    assert torch.equal(outs[0]["fc"], outs[1]["fc"]) and float(outs[0]["fc"][0, 0]) == 0.25


# Writes a new 4 MB entry over "resnet18-k" through TeacherCache.write (distill.runtime.atomic), its
# bytes in 64 KiB pieces with a pause after each (a write that lasts seconds), and touches the file
# argv[2] once the first piece is out: the test kills it then, part-way through.
SLOW_WRITER = textwrap.dedent(
    """
    import io, pathlib, sys, time, torch
    from distill.teacher.provision import TeacherCache

    real_save = torch.save
    def slow_save(obj, fh):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        for i in range(0, len(data), 1 << 16):
            fh.write(data[i:i + (1 << 16)])
            fh.flush()
            pathlib.Path(sys.argv[2]).touch()
            time.sleep(0.05)
    torch.save = slow_save
    TeacherCache(sys.argv[1]).write("resnet18", "k", torch.nn.Linear(1024, 1024), {"test_acc": 0.9})
    """
)


@pytest.mark.timeout(300)
def test_cache_write_is_atomic(tmp_path, monkeypatch):
    """A writer killed mid-write, or failing mid-write, leaves the previous entry intact at the
    destination: never a partial file there."""
    cache = TeacherCache(tmp_path / "cache")
    torch.manual_seed(0)
    old_model = torch.nn.Linear(8, 8)
    dest = cache.write("resnet18", "k", old_model, {"test_acc": 0.5})
    old_bytes = dest.read_bytes()

    def temporaries() -> list[Path]:  # where distill.runtime.atomic writes before its rename
        return sorted(cache.dir.glob(f".{dest.name}.*.tmp"))

    def assert_old_entry_intact() -> None:
        assert dest.read_bytes() == old_bytes
        entry = cache.read("resnet18", "k")
        assert entry is not None and entry["meta"] == {"test_acc": 0.5}
        assert entry["state_dict"].keys() == old_model.state_dict().keys()
        assert all(torch.equal(entry["state_dict"][k], v) for k, v in old_model.state_dict().items())
        assert sorted(p.name for p in cache.dir.iterdir() if not p.name.startswith(".")) == [dest.name]  # nothing set aside

    script, started = tmp_path / "writer.py", tmp_path / "started"
    script.write_text(SLOW_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(cache.dir), str(started)], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert_old_entry_intact()
    [partial] = temporaries()  # killed part-way: its temporary file is left behind, short of the 4 MB entry
    assert 0 < partial.stat().st_size < 4 * 1024 * 1024

    # A write that fails after its bytes are out: the old entry stays, its temporary file goes.
    real_save = torch.save

    def fail_after_writing(obj, fh):
        real_save(obj, fh)
        fh.flush()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        cache.write("resnet18", "k", torch.nn.Linear(16, 16), {"test_acc": 0.7})
    monkeypatch.undo()
    assert_old_entry_intact()
    assert temporaries() == [partial]
