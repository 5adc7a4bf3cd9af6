from __future__ import annotations

import subprocess
import sys
import textwrap
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
                    "teacher.augment=false"):
        assert _teacher_key_for(make_cfg, here, "teacher.augment=true", changed) != base, changed
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


WORKER = textwrap.dedent(
    """
    import sys, time, torch
    from omegaconf import OmegaConf
    from distill.teacher.provision import provision_teacher
    cache, marker, out = sys.argv[1:4]
    cfg = OmegaConf.create({"teacher": {"name": "resnet18", "pretrained": False, "checkpoint": None, "epochs": 1,
                                        "cache_dir": cache}, "seed": 0})
    def train(model):
        with open(marker, "a") as fh:
            fh.write("trained\\n")
        time.sleep(3)  # long enough that the other process arrives while this one trains
        torch.nn.init.constant_(model.fc.weight, 0.25)
        return 0.75
    model, info = provision_teacher(cfg, {"num_classes": 3, "channels": 1, "image_size": 8}, {"d": 1}, train)
    torch.save({"fc": model.fc.weight, "source": info.source}, out)
    """
)


def test_two_processes_train_the_teacher_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    marker = tmp_path / "marker.txt"
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(marker), str(tmp_path / f"out{i}.pt")], cwd=root)
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert marker.read_text().count("trained") == 1
    outs = [torch.load(tmp_path / f"out{i}.pt") for i in range(2)]
    assert sorted(o["source"] for o in outs) == ["cache", "trained"]
    assert torch.equal(outs[0]["fc"], outs[1]["fc"]) and float(outs[0]["fc"][0, 0]) == 0.25


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    """A failure mid-write leaves no entry (and no partial file) behind."""
    cache = TeacherCache(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.write("resnet18", "k", torch.nn.Linear(2, 2), {})
    assert list(tmp_path.iterdir()) == []
