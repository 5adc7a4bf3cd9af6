"""Teacher outputs computed once, stored on disk, and reused by every run and sweep job.

When the student's training data is not randomly augmented, the teacher sees the same input for a
sample in every epoch, so its logits are a fixed table. Computing it once (batched, inference
mode) and looking rows up by sample index makes distillation cost about as much as training the
student alone: a ResNet-50 teacher runs ~700 8x8 images/s on 2 CPU cores while an MLP student
trains at ~16,000/s, so the live teacher would otherwise dominate every epoch.

The table lives next to the cached teachers, ``<cache_dir>/outputs/<key>.npy`` (a NumPy array,
memory-mapped when read, so DDP ranks share the page cache and each reads only its own rows), with
``<key>.json`` describing it. The key hashes the teacher's identity (its cache key, or the
checksum of ``teacher.checkpoint``), the data fingerprint (dataset, split, normalisation,
augmentation) and the storage format. Writing happens under a file lock, into a temporary file
that is fsynced and renamed, and the description is written last: a reader either finds a complete
entry or none. An entry whose description and array disagree (truncated, wrong shape, non-finite
values) is rebuilt.

Storage: ``float32`` (exact), ``float16`` (half the size; logits lose ~3 significant digits, far
below what the softmax at temperature T resolves), or the top-k logits per sample
(``teacher.outputs_topk``) plus one more number, the log-sum-exp ``L`` of the other ``C - k``
logits. Decoding gives each of those the logit ``L - log(C - k)``: at T = 1 the rest's total
probability is then exactly the teacher's (only its split among the rest is lost, spread evenly),
so the top-k classes keep their exact probabilities. At T > 1 the even split over-states the
rest's softened mass (by Jensen's inequality, sum_j e^(z_j/T) <= (C - k) e^((L - log(C - k))/T)),
by little when the rest's logits are close together, as a trained teacher's small logits are;
``tests/test_teacher_outputs.py`` bounds the KL divergence to the full table's targets at
T = 1, 4 and 8. (A fill constant, as before this format, put a share on the rest that depended on
the constant, not on the teacher: 45 % of the mass at T = 4 for top-5 of 100 classes.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2

from distill.data.datamodules import BaseDataModule
from distill.data.datasets import TensorSplit, TransformedSubset
from distill.data.mixing import batch_mix, mixing_of
from distill.errors import ConfigError
from distill.runtime import launch_plan
from distill.runtime.atomic import atomic_write, atomic_write_text
from distill.teacher.provision import TeacherInfo, file_checksum, make_cache_dir
from distill.teacher.training import teacher_trainer_kwargs
from distill.teacher.views import ReplayedViews

log = logging.getLogger(__name__)

FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16}


@torch.inference_mode()
def compute_teacher_logits(
    teacher: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Teacher logits for every sample of ``dataset``, in dataset order, as a float32 CPU tensor."""
    teacher = teacher.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks = [teacher(batch[0].to(device)).float().cpu() for batch in loader]
    logits = torch.cat(chunks)
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the teacher produced non-finite logits on the training split")
    return logits


class _Indexed(Dataset):
    """``dataset``'s inputs with their position: (x, i)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i][0], i


class _TableWriter(L.LightningModule):
    """Each rank runs the teacher over its shard and writes its rows into the one memory-mapped table."""

    def __init__(self, teacher: nn.Module, path: Path) -> None:
        super().__init__()
        self.teacher, self.path, self.table = teacher, str(path), None

    def on_predict_start(self) -> None:
        self.table = np.load(self.path, mmap_mode="r+")

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        x, index = batch
        # (Were a shard padded with repeated samples, they would write the same row twice, harmlessly.)
        self.table[index.cpu().numpy()] = self.teacher(x).float().cpu().numpy()

    def on_predict_end(self) -> None:
        self.table.flush()
        self.table = None
        log.info("teacher outputs: rank %d of %d wrote its shard of %s", self.global_rank, self.trainer.world_size, self.path)


def table_by_all_ranks(teacher: nn.Module, dataset: Dataset, path: Path, trainer_kwargs: dict[str, Any], batch_size: int = 256) -> None:
    """Every rank of the launch computes its shard of the teacher's logits into ``path`` (a float32
    ``.npy`` of the table's shape, created by rank 0), then all wait for each other."""
    keep = {k: trainer_kwargs[k] for k in ("accelerator", "devices", "num_nodes", "strategy") if k in trainer_kwargs}
    trainer = L.Trainer(**keep, precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(_TableWriter(teacher.eval(), path), DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False),
                    return_predictions=False)
    launch_plan.barrier()  # every shard is on disk before rank 0 reads the table


def outputs_key(teacher_identity: str, data_fingerprint: dict[str, Any], dtype: str, topk: int | None) -> str:
    stored = None if topk is None else {"k": topk, "rest": "logsumexp"}  # the top-k format of the docstring
    blob = json.dumps({"format": FORMAT, "teacher": teacher_identity, "data": data_fingerprint, "dtype": dtype, "topk": stored}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_topk(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the k largest logits and, as column k, the log-sum-exp of the others; their class indices)."""
    values, indices = logits.topk(k, dim=1)
    rest = logits.double().scatter(1, indices, float("-inf")).logsumexp(dim=1, keepdim=True)  # -inf when k = C
    return torch.cat([values.double(), rest], dim=1).numpy().astype(np.float32), indices.numpy().astype(np.int32)


def decode_topk(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense logits from :func:`encode_topk`'s: the top k as they were, each other class at
    ``L - log(C - k)``, so that at T = 1 the others' total probability is exactly the teacher's."""
    k = indices.shape[1]
    top, rest = values[:, :k], values[:, k:]
    fill = rest - math.log(num_classes - k) if num_classes > k else rest
    dense = fill.expand(-1, num_classes).clone()
    return dense.scatter_(1, indices.long(), top)


class TeacherOutputs:
    """The stored table for one (teacher, data, format): look up rows by sample index."""

    def __init__(self, values: np.ndarray, indices: np.ndarray | None, num_classes: int) -> None:
        self.values, self.indices, self.num_classes = values, indices, num_classes

    def __len__(self) -> int:
        return self.values.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        idx = index.cpu().numpy()
        values = torch.from_numpy(np.ascontiguousarray(self.values[idx])).float()
        if self.indices is None:
            return values
        return decode_topk(values, torch.from_numpy(np.ascontiguousarray(self.indices[idx])), self.num_classes)

    def dense(self) -> torch.Tensor:
        """The whole table as dense float32 logits (small tables are kept on the device)."""
        return self.rows(torch.arange(len(self)))


class TeacherOutputCache:
    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir) / "outputs"

    def paths(self, key: str) -> dict[str, Path]:
        return {"values": self.dir / f"{key}.npy", "indices": self.dir / f"{key}.indices.npy", "meta": self.dir / f"{key}.json"}

    def read(self, key: str, rows: int, num_classes: int) -> TeacherOutputs | None:
        """The entry for ``key`` if it is complete and consistent; None if absent or damaged."""
        p = self.paths(key)
        if not p["meta"].is_file():
            return None
        try:
            meta = json.loads(p["meta"].read_text())
            values = np.load(p["values"], mmap_mode="r")
            indices = np.load(p["indices"], mmap_mode="r") if meta["topk"] else None
            k = meta["topk"]
            width = k + 1 if k else num_classes  # top-k: the k logits and the rest's log-sum-exp
            if values.shape != (rows, width) or meta["rows"] != rows or meta["num_classes"] != num_classes:
                raise ValueError(f"shape {values.shape} does not match {rows} samples x {width}")
            if indices is not None and indices.shape != (rows, k):
                raise ValueError(f"index shape {indices.shape} does not match {rows} x {k}")
            if not np.isfinite(values[: min(rows, 4096), : k or num_classes]).all():
                raise ValueError("non-finite values")
        except Exception as err:  # truncated .npy, bad JSON, wrong shape: rebuild
            log.warning("teacher outputs: cache entry %s is unusable (%s); rebuilding it", p["values"], err)
            return None
        return TeacherOutputs(values, indices, num_classes)

    def write(self, key: str, logits: torch.Tensor, dtype: str, topk: int | None, meta: dict[str, Any]) -> None:
        p = self.paths(key)
        make_cache_dir(self.dir)
        p["meta"].unlink(missing_ok=True)  # the description goes last: no reader trusts a half entry
        if topk:
            values, indices = encode_topk(logits, topk)
            atomic_write(p["indices"], lambda fh: np.save(fh, indices))
        else:
            values = logits.numpy()
        stored = values.astype(DTYPES[dtype])
        atomic_write(p["values"], lambda fh: np.save(fh, stored))
        info = {**meta, "rows": logits.shape[0], "num_classes": logits.shape[1], "dtype": dtype, "topk": topk, "format": FORMAT}
        atomic_write_text(p["meta"], json.dumps(info, indent=2, sort_keys=True))

    def get_or_build(
        self, key: str, teacher: nn.Module, dataset: Dataset, num_classes: int, *, dtype: str = "float32",
        topk: int | None = None, device: str = "cpu", meta: dict[str, Any] | None = None,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> tuple[TeacherOutputs, str]:
        """The stored outputs for ``key``, computing and storing them first if needed (once, under a
        lock, however many processes ask). Returns (outputs, "cache" | "computed").

        ``trainer_kwargs`` with a multi-process strategy (the teacher's: see
        :func:`distill.teacher.training.teacher_trainer_kwargs`): every rank of the launch computes its
        shard into one memory-mapped table; rank 0 holds the lock, decides for all
        (:mod:`distill.runtime.launch_plan`) and writes the entry."""
        rows = len(dataset)  # type: ignore[arg-type]
        make_cache_dir(self.dir)
        partial = self.dir / f"{key}.partial.npy"
        shared = trainer_kwargs is not None
        if shared and not launch_plan.is_rank_zero():
            plan = launch_plan.decide(f"outputs_{key}", None)
            if plan.startswith("error:"):
                raise RuntimeError(f"teacher outputs: rank 0 failed: {plan[len('error:'):]}")
            if plan == "compute":
                table_by_all_ranks(teacher, dataset, partial, trainer_kwargs)
                launch_plan.share_outcome(None)  # rank 0 has written the entry, or says why not
            found = self.read(key, rows, num_classes)
            if found is None:
                raise RuntimeError(f"teacher outputs {self.paths(key)['values']}: rank 0 wrote them, but this process cannot read them")
            return found, "computed" if plan == "compute" else "cache"
        with FileLock(str(self.dir / f"{key}.lock")):
            found = self.read(key, rows, num_classes)
            if shared:
                def plan() -> str:
                    if found is not None:
                        return "cache"
                    try:  # the table every rank writes its shard into (the other ranks learn of a failure)
                        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(rows, num_classes)).flush()
                    except OSError as err:
                        return f"error:cannot create {partial}: {err}"
                    return "compute"

                decided = launch_plan.decide(f"outputs_{key}", plan)
                if decided.startswith("error:"):
                    raise RuntimeError(f"teacher outputs: {decided[len('error:'):]}")
            if found is not None:
                return found, "cache"
            start = time.perf_counter()
            if shared:
                table_by_all_ranks(teacher, dataset, partial, trainer_kwargs)
                try:
                    logits = torch.from_numpy(np.array(np.load(partial, mmap_mode="r")))
                    if not torch.isfinite(logits).all():
                        raise FloatingPointError("the teacher produced non-finite logits on the training split")
                    self.write(key, logits, dtype, topk, {**(meta or {}), "seconds": time.perf_counter() - start})
                except Exception as err:
                    launch_plan.share_outcome(f"{type(err).__name__}: {err}")  # the other ranks raise it too
                    raise
                launch_plan.share_outcome(None)  # the entry is complete: the other ranks may read it
            else:
                logits = compute_teacher_logits(teacher, dataset, device=device)
                self.write(key, logits, dtype, topk, {**(meta or {}), "seconds": time.perf_counter() - start})
            partial.unlink(missing_ok=True)
            found = self.read(key, rows, num_classes)
            if found is None:
                raise RuntimeError(f"teacher outputs written to {self.paths(key)['values']} cannot be read back")
            return found, "computed"


@dataclass
class TableRows:
    """What the rows of a run's teacher tables are: the training samples, or with
    ``teacher.cache_views`` every replayed view of each (the data module then yields those views);
    and the fingerprint of that data, for the tables' cache keys."""

    data: Dataset
    fingerprint: dict[str, Any]
    views: bool


def table_rows(cfg: DictConfig, datamodule: BaseDataModule) -> TableRows:
    """The rows every teacher table of the run is computed over (once per run: the replayed views
    replace the data module's training set)."""
    datamodule.setup("fit")
    fingerprint = datamodule.fingerprint()
    if not cfg.teacher.cache_views:
        return TableRows(datamodule.train_set, fingerprint, False)
    # K seeded views per sample; the student replays exactly those.
    train = datamodule.train_set
    mix = batch_mix(cfg.data, datamodule.num_classes)  # Mixup / CutMix: part of each view, so cached with it
    if isinstance(train, TransformedSubset):
        base, transform = train.dataset, train.transform
    elif isinstance(train, TensorSplit) and mix is not None:  # in memory, not augmented: the views differ by their mixes
        base, transform = TensorDataset(train.x, train.y), v2.Identity()
    else:
        raise ConfigError(f"teacher.cache_views: data={cfg.data.name} has no per-sample training transform to replay")
    replay = ReplayedViews(base, train.indices, transform, cfg.teacher.cache_views, int(cfg.seed), mix)
    datamodule.train_set = replay  # yields (x, y, row of its view)
    datamodule.batch_mixing = False
    mixing = {"mix": mixing_of(cfg.data)} if mix is not None else {}
    return TableRows(replay.all_views(), {**fingerprint, "views": cfg.teacher.cache_views, "view_seed": int(cfg.seed), **mixing}, True)


def teacher_identity(info: TeacherInfo) -> str:
    """The teacher in a table's cache key: its architecture and its cache key (or its file's checksum)."""
    if info.key:
        return f"{info.arch}:{info.key}"
    return f"{info.arch}:{file_checksum(info.path)}" + (f":resize{info.resize}" if info.resize else "")  # a checkpoint file


def teacher_outputs_for(cfg: DictConfig, teacher: nn.Module, info: TeacherInfo, datamodule: BaseDataModule,
                        rows: TableRows) -> tuple[Any, str]:
    """The teacher's logits for the table's ``rows`` (:func:`table_rows`), from the on-disk cache or
    computed into it, and where they came from. The data module's training batches then carry each
    sample's logits (``datamodule.teacher_table``, set by the caller); with ``teacher.cache_views``
    the items of its training set (the replayed views, :mod:`distill.teacher.views`) name their row."""
    tcfg = cfg.teacher
    if tcfg.outputs_topk is not None and tcfg.outputs_topk > datamodule.num_classes:
        raise ConfigError(f"teacher.outputs_topk={tcfg.outputs_topk} exceeds the {datamodule.num_classes} classes of data={cfg.data.name}")
    identity = teacher_identity(info)
    key = outputs_key(identity, rows.fingerprint, tcfg.outputs_dtype, tcfg.outputs_topk)
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    cache = TeacherOutputCache(tcfg.cache_dir)
    kwargs, world = teacher_trainer_kwargs(cfg)  # several processes: each computes its shard of the table
    outputs, source = cache.get_or_build(
        key, teacher, rows.data, datamodule.num_classes, dtype=tcfg.outputs_dtype,
        topk=tcfg.outputs_topk, device=device, meta={"teacher": info.arch, "teacher_identity": identity.partition(":")[2]},
        trainer_kwargs=kwargs if world > 1 else None,
    )
    log.info("teacher: %s's logits for %d training %s %s (%s)", info.arch, len(outputs), "views" if rows.views else "samples",
             "read from the cache" if source == "cache" else "computed and cached", cache.paths(key)["values"])
    # A table that fits comfortably in memory is read into it (decoded once); a large one
    # (ImageNet-scale) stays memory-mapped. Either way the data loader reads each batch's rows (in its
    # worker processes, when there are any) and they travel with the batch to the device.
    small = len(outputs) * datamodule.num_classes * 4 <= 256 * 2**20
    return outputs.dense() if small else outputs, f"precomputed ({source})"


class StackedRows:
    """Several teachers' tables as one column: ``rows(index)`` is ``(len(index), K, C)``, teacher k's
    logits at ``[:, k]`` (the loss mixes them: :meth:`distill.distillation.losses.base.DistillationLoss.prepared`)."""

    def __init__(self, tables: list[Any]) -> None:
        self.tables = tables

    def __len__(self) -> int:
        return len(self.tables[0])

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([t[index] if isinstance(t, torch.Tensor) else t.rows(index) for t in self.tables], dim=1)
