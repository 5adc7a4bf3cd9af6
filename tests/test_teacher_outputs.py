"""Precomputed teacher logits: same numbers as the live teacher, looked up by sample index."""

import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from distill.data.datamodules import build_datamodule
from distill.data.datasets import TensorSplit, WithTeacherRows
from distill.distillation.losses.kd import KDLoss
from distill.distillation.module import DistillationModule
from distill.teacher.outputs import (
    TeacherOutputCache,
    compute_teacher_logits,
    decode_topk,
    encode_topk,
)

from .test_teacher_cache import LOGGED_LOCKS, _lines, _wait_until, _waiting_on

OPTIM = OmegaConf.create({"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "scheduler": "none", "warmup_epochs": 0})


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))


def test_precomputed_logits_equal_live_teacher_in_eval_mode():
    teacher = _teacher().train()  # compute_teacher_logits must switch it to eval mode itself
    x = torch.randn(37, 1, 4, 4)
    data = TensorDataset(x, torch.randint(0, 5, (37,)))
    logits = compute_teacher_logits(teacher, data, batch_size=8)
    assert not teacher.training
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(x))


def test_each_sample_comes_with_its_own_row_of_the_table():
    x = torch.arange(12.0).reshape(6, 1, 2, 1)
    table = torch.arange(6.0).unsqueeze(1) * torch.ones(1, 3)  # row i = [i, i, i]
    split = TensorSplit(x, torch.arange(6), [4, 0, 5, 2, 1, 3])
    rows = WithTeacherRows(split, table)
    assert rows[2][2].tolist() == [2.0, 2.0, 2.0]  # item 2 is table row 2 (the split's item, not its sample 5)
    one_by_one = default_collate(rows.__getitems__([3, 0, 5]))
    for a, b in zip(one_by_one, rows.gather([3, 0, 5]), strict=True):
        torch.testing.assert_close(a, b)
    assert rows.gather([3, 0, 5])[2][:, 0].tolist() == [3.0, 0.0, 5.0]

    class WithViewRow(Dataset):  # items that name their own row, as ReplayedViews does
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> tuple:
            return x[i], i, 5 - i

    viewed = WithTeacherRows(WithViewRow(), table)
    assert viewed[1][2].tolist() == [4.0, 4.0, 4.0] and not hasattr(viewed, "gather")


def test_training_batches_carry_the_teachers_logits_of_their_samples(make_cfg):
    cfg = make_cfg("data=synthetic", "data.num_samples=90", "data.image_size=4", "data.channels=1", "data.num_classes=5",
                   "data.batch_size=8")
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    teacher = _teacher().eval()
    table = compute_teacher_logits(teacher, dm.train_set)
    dm.teacher_table = table
    loader = dm.train_dataloader()
    seen = 0
    with torch.no_grad():
        for x, y, logits in loader:  # shuffled: each batch's rows must follow its samples
            torch.testing.assert_close(logits, teacher(x))
            seen += len(y)
    assert seen == len(dm.train_set)
    first = next(iter(loader))[2]
    assert not torch.allclose(first, table[: len(first)])  # not the table's first rows in order


# --- the on-disk cache --------------------------------------------------------------------------



def _data(n: int = 50) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g))


def test_cache_computes_once_then_reads(tmp_path):
    teacher, data = _teacher().eval(), _data()
    cache = TeacherOutputCache(tmp_path)
    first, source1 = cache.get_or_build("k", teacher, data, 5)
    second, source2 = cache.get_or_build("k", teacher, data, 5)
    assert (source1, source2) == ("computed", "cache")
    expected = compute_teacher_logits(teacher, data)
    torch.testing.assert_close(second.dense(), expected)
    idx = torch.tensor([3, 0, 41])
    torch.testing.assert_close(second.rows(idx), expected[idx])


@pytest.mark.parametrize("damage", ["truncate", "shape", "meta"])
def test_damaged_entry_is_rebuilt(tmp_path, damage):
    teacher, data = _teacher().eval(), _data()
    cache = TeacherOutputCache(tmp_path)
    cache.get_or_build("k", teacher, data, 5)
    paths = cache.paths("k")
    if damage == "truncate":
        raw = paths["values"].read_bytes()
        paths["values"].write_bytes(raw[: len(raw) // 2])
    elif damage == "shape":
        np.save(paths["values"], np.zeros((7, 5), dtype=np.float32))
    else:
        paths["meta"].write_text("{not json")
    outputs, source = cache.get_or_build("k", teacher, data, 5)
    assert source == "computed"
    torch.testing.assert_close(outputs.dense(), compute_teacher_logits(teacher, data))


def test_float16_and_topk_storage(tmp_path):
    teacher, data = _teacher().eval(), _data()
    exact = compute_teacher_logits(teacher, data)
    half, _ = TeacherOutputCache(tmp_path).get_or_build("h", teacher, data, 5, dtype="float16")
    torch.testing.assert_close(half.dense(), exact, atol=1e-2, rtol=1e-3)
    top, _ = TeacherOutputCache(tmp_path).get_or_build("t", teacher, data, 5, topk=2)
    dense = top.dense()
    values, indices = exact.topk(2, dim=1)
    torch.testing.assert_close(dense.gather(1, indices), values)
    # the other 3 classes share the teacher's remaining probability evenly: their logit is L - log 3
    rest = dense.clone().scatter_(1, indices, float("inf"))
    rest_lse = exact.clone().scatter_(1, indices, float("-inf")).logsumexp(dim=1, keepdim=True)
    torch.testing.assert_close(rest[rest != float("inf")].reshape(len(data), 3), (rest_lse - math.log(3)).expand(-1, 3))


def _teacher_like_logits(n: int = 2000, classes: int = 100) -> torch.Tensor:
    """Logits shaped like a trained teacher's: one class well ahead, the others spread around 0."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, classes, generator=g) * 1.5
    z[torch.arange(n), torch.randint(0, classes, (n,), generator=g)] += 8.0
    return z


def _kl(full: torch.Tensor, approx: torch.Tensor, t: float) -> float:
    p, q = F.log_softmax(full / t, dim=1), F.log_softmax(approx / t, dim=1)
    return F.kl_div(q, p, reduction="batchmean", log_target=True).item()


@pytest.mark.parametrize("k", [5, 10])
@pytest.mark.parametrize("t", [1.0, 4.0, 8.0])
def test_topk_soft_targets_stay_close_to_the_full_table(k, t):
    logits = _teacher_like_logits()
    v, i = encode_topk(logits, k)
    decoded = decode_topk(torch.from_numpy(v), torch.from_numpy(i), 100)
    # The bound (nats per sample, 100 classes): what the even split of the rest's mass costs.
    assert _kl(logits, decoded, t) < 0.08
    # A fill constant (min(top-k) - 10, the old format) puts the constant's share on the rest.
    values, indices = logits.topk(k, dim=1)
    constant = (values.min(dim=1, keepdim=True).values - 10).expand(-1, 100).clone().scatter_(1, indices, values)
    assert _kl(logits, decoded, t) < 0.5 * _kl(logits, constant, t)


def test_topk_keeps_exact_probabilities_at_t1():
    logits = _teacher_like_logits(200)
    v, i = encode_topk(logits, 5)
    decoded = decode_topk(torch.from_numpy(v), torch.from_numpy(i), 100)
    top = torch.from_numpy(i).long()
    torch.testing.assert_close(F.softmax(decoded, 1).gather(1, top), F.softmax(logits, 1).gather(1, top), atol=1e-6, rtol=1e-5)
    # the example: top-5 logits 10, 8, 7, 6, 5 and 95 classes at 0
    z = torch.zeros(1, 100)
    z[0, :5] = torch.tensor([10.0, 8, 7, 6, 5])
    v, i = encode_topk(z, 5)
    rest_mass = F.softmax(decode_topk(torch.from_numpy(v), torch.from_numpy(i), 100) / 4, 1)[0, 5:].sum()
    assert rest_mass.item() == pytest.approx(F.softmax(z / 4, 1)[0, 5:].sum().item(), rel=1e-5)  # equal logits: exact at any T


def test_topk_round_trip():
    logits = torch.randn(6, 10)
    v, i = encode_topk(logits, 10)
    torch.testing.assert_close(decode_topk(torch.from_numpy(v), torch.from_numpy(i), 10), logits)


# Each worker notes when it starts to acquire a lock ("locking <pid> <lock file>") and when its teacher
# runs; the teacher's forward then holds (with the lock) until the test creates the "go" file.
WORKER = textwrap.dedent(
    """
    import os, sys, time, torch, filelock
    from torch import nn
    from torch.utils.data import Dataset, TensorDataset, default_collate
    from distill.teacher.outputs import TeacherOutputCache

    cache_dir, marker, go = sys.argv[1], sys.argv[2], sys.argv[3]

    # LOGGED_LOCKS

    class Held(nn.Module):
        def forward(self, x):
            note(f"forward {os.getpid()}")
            deadline = time.monotonic() + 120
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.02)
            return x.flatten(1)[:, :3] * 2

    data = TensorDataset(torch.arange(40.0).reshape(10, 1, 2, 2), torch.zeros(10, dtype=torch.long))
    outputs, source = TeacherOutputCache(cache_dir).get_or_build("k", Held(), data, 3)
    print(source, float(outputs.dense().sum()))
    """
).replace("# LOGGED_LOCKS", LOGGED_LOCKS)


@pytest.mark.timeout(300)
def test_two_processes_compute_the_outputs_once(tmp_path):
    """The overlap is made certain, not hoped for: the test holds the entry's lock until both workers
    wait on it, and the first to get it computes until the test lets it finish, with the other waiting."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    marker, go, cache_dir = tmp_path / "marker.txt", tmp_path / "go", tmp_path / "cache"
    root = Path(__file__).resolve().parents[1]
    cache = TeacherOutputCache(cache_dir)
    cache.dir.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    try:
        with (lock := FileLock(str(cache.dir / "k.lock"))):  # the lock get_or_build takes for key "k"
            procs = [subprocess.Popen([sys.executable, str(script), str(cache_dir), str(marker), str(go)], cwd=root,
                                      stdout=subprocess.PIPE, text=True) for _ in range(2)]

            def both_at_the_lock() -> bool:
                assert _lines(marker, "forward") == [], "a worker ran the teacher while the test held the lock"
                return len(_waiting_on(marker, lock.lock_file)) == 2

            _wait_until(both_at_the_lock, procs, "both workers to reach the lock")
            time.sleep(0.5)  # both are blocked on the held lock: neither computes, nothing is written
            assert all(p.poll() is None for p in procs)
            assert _lines(marker, "forward") == [] and not any(path.exists() for path in cache.paths("k").values())
        # Released: one worker gets the lock and computes; the other waits for it, however long it takes.
        _wait_until(lambda: len(_lines(marker, "forward")) == 1, procs, "one worker to run the teacher")
        time.sleep(0.5)
        assert len(_lines(marker, "forward")) == 1 and all(p.poll() is None for p in procs)
        go.touch()
        outs = [p.communicate(timeout=120)[0].split() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    assert len(_lines(marker, "forward")) == 1  # one batch, computed by one process only
    assert sorted(o[0] for o in outs) == ["cache", "computed"] and outs[0][1] == outs[1][1]


def test_cached_and_live_distillation_give_the_same_loss(tmp_path):
    teacher, data = _teacher().eval(), _data()
    table, _ = TeacherOutputCache(tmp_path).get_or_build("k16", teacher, data, 5, dtype="float16")
    torch.manual_seed(3)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    loss = KDLoss(temperature=4.0, alpha=0.9)
    live = DistillationModule(student, teacher, loss, OPTIM, 5)
    idx = [4, 17, 33, 8]
    x, y, rows = default_collate(WithTeacherRows(data, table).__getitems__(idx))  # the memory-mapped table's rows
    logits = student(x)
    live_loss = loss(logits, live.teacher_logits(x), y)["loss"]
    cached_loss = loss(logits, rows, y)["loss"]
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-3, atol=1e-4)  # fp16 storage
