"""The teacher's intermediate features, cached like its logits, so that feature distillation runs
without the teacher.

When the teacher sees the same input for a sample in every epoch (no augmentation, or the replayed
views of ``teacher.cache_views``), what each feature term reads from it is a fixed table too. Each
term stores it in the form it consumes (:meth:`~distill.distillation.features.base.FeatureTerm.teacher_form`):
an attention map for AT (H*W numbers per sample, pooled to the student's resolution first where the
teacher's is larger), the flattened embedding for RKD, PKT, SP and CRD (the teacher's width: 2048 for
a ResNet-50), the feature map itself for FitNets (C x H x W: the largest). One table per hooked
teacher layer and form, ``<cache_dir>/features/<key>.npy`` with ``<key>.json`` describing it; the key
hashes the teacher (as the logit table's), the data fingerprint (views included), the layer, the
form and the storage dtype (``teacher.outputs_dtype``). The missing tables of a run are computed in
one pass of the teacher over the rows, under a file lock (the first process computes, the others
wait and read), each written to a temporary file, fsynced and renamed, its description last: a
reader finds a complete entry or none, and an entry that disagrees with its description is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader

from distill.distillation.features.combined import FeatureLoss
from distill.errors import ConfigError
from distill.runtime.atomic import atomic_write_text
from distill.teacher.outputs import DTYPES, TableRows
from distill.teacher.provision import make_cache_dir

log = logging.getLogger(__name__)

FORMAT = 1
IN_MEMORY_BYTES = 256 * 2**20  # larger tables stay memory-mapped (read per batch by the loader)


class FeatureTablesTooLarge(ConfigError):
    """The teacher's feature tables would not fit on the cache's disk."""


class MappedRows:
    """A memory-mapped feature table: ``rows(index)`` is the batch's rows as float32 tensors."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __len__(self) -> int:
        return self.values.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.values[index.cpu().numpy()])).float()


def feature_key(identity: str, fingerprint: dict[str, Any], layer: str, form: str, dtype: str) -> str:
    blob = json.dumps({"format": FORMAT, "teacher": identity, "data": fingerprint, "layer": layer, "form": form, "dtype": dtype},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TeacherFeatureCache:
    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir) / "features"

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.npy", self.dir / f"{key}.json"

    def read(self, key: str, rows: int) -> np.ndarray | None:
        """The entry for ``key`` if complete and consistent (memory-mapped); None if absent or damaged."""
        values_path, meta_path = self.paths(key)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            values = np.load(values_path, mmap_mode="r")
            if values.shape != (rows, *meta["shape"]) or meta["rows"] != rows:
                raise ValueError(f"shape {values.shape} does not match {rows} samples x {tuple(meta['shape'])}")
            if not np.isfinite(values[: min(rows, 1024)]).all():
                raise ValueError("non-finite values")
        except Exception as err:  # truncated .npy, bad JSON, wrong shape: rebuild
            log.warning("teacher features: cache entry %s is unusable (%s); rebuilding it", values_path, err)
            return None
        return values

    def build(self, keys: dict[str, str], features: FeatureLoss, teacher: nn.Module, rows: TableRows, dtype: str,
              device: str, batch_size: int = 256) -> None:
        """One pass of the teacher over ``rows``, writing the tables ``keys`` (feature key -> cache key)."""
        make_cache_dir(self.dir)
        n = len(rows.data)  # type: ignore[arg-type]
        teacher = teacher.to(device).eval()
        tables: dict[str, np.ndarray] = {}
        partial = {name: self.dir / f"{key}.partial.{os.getpid()}.npy" for name, key in keys.items()}
        start = time.perf_counter()
        try:
            done = 0
            for batch in DataLoader(rows.data, batch_size=batch_size, shuffle=False):
                x = batch[0].to(device)
                out = {name: value for name, value in features.teacher_pass(teacher, x).items() if name in keys}
                for name, value in out.items():
                    if not torch.isfinite(value).all():
                        raise FloatingPointError(f"the teacher produced non-finite features at {name} on the training split")
                    if name not in tables:  # the shape of the form is known from the first batch
                        tables[name] = np.lib.format.open_memmap(partial[name], mode="w+", dtype=DTYPES[dtype], shape=(n, *value.shape[1:]))
                    tables[name][done:done + len(x)] = value.cpu().numpy()
                done += len(x)
            for name, key in keys.items():
                values_path, meta_path = self.paths(key)
                meta_path.unlink(missing_ok=True)  # the description goes last: no reader trusts a half entry
                tables[name].flush()
                with open(partial[name], "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(partial[name], values_path)
                info = {"rows": n, "shape": list(tables[name].shape[1:]), "dtype": dtype, "feature": name, "format": FORMAT,
                        "seconds": time.perf_counter() - start}
                atomic_write_text(meta_path, json.dumps(info, indent=2, sort_keys=True))
        finally:
            tables.clear()
            for path in partial.values():
                path.unlink(missing_ok=True)


def teacher_features_for(cache_dir: str, features: FeatureLoss, teacher: nn.Module, identity: str, rows: TableRows, dtype: str,
                         device: str) -> tuple[dict[str, Any], str]:
    """Every feature column of the run (by feature key), read from the cache or computed into it, and
    where they came from ("cache" | "computed"). Small tables are read into memory; large ones stay mapped."""
    cache = TeacherFeatureCache(cache_dir)
    make_cache_dir(cache.dir)
    # Two terms reading one layer in one form (RKD and PKT on the embedding) share a table.
    keys = {name: feature_key(identity, rows.fingerprint, layer, form, dtype) for name, _, _, form, layer in _columns(features)}
    n = len(rows.data)  # type: ignore[arg-type]
    # One lock for the folder: two runs needing overlapping sets of tables (rkd, and rkd+at) must not
    # build a shared one at once. Held only while tables are built or checked, a pass of the teacher.
    with FileLock(str(cache.dir / "features.lock")):
        found = {name: cache.read(key, n) for name, key in keys.items()}
        missing = {name: key for name, key in keys.items() if found[name] is None}
        unique = {key: name for name, key in reversed(missing.items())}
        if unique:
            check_disk_space(cache.dir, features, teacher, rows, set(unique.values()), dtype, device)
            cache.build({name: key for key, name in unique.items()}, features, teacher, rows, dtype, device)
            found.update({name: cache.read(key, n) for name, key in missing.items()})  # only what was built is read again
    columns: dict[str, Any] = {}
    for name, values in found.items():
        if values is None:
            raise RuntimeError(f"teacher features {cache.paths(keys[name])[0]} were written but cannot be read back")
        small = values.nbytes <= IN_MEMORY_BYTES
        columns[name] = torch.from_numpy(np.array(values)).float() if small else MappedRows(values)
        per_sample = values.nbytes // max(n, 1)
        log.info("teacher features: %s, %s per %s, %s (%s)", name, _bytes(per_sample), "view" if rows.views else "sample",
                 "computed and cached" if name in missing else "read from the cache", cache.paths(keys[name])[0])
    return columns, "computed" if missing else "cache"


def check_disk_space(where: Path, features: FeatureLoss, teacher: nn.Module, rows: TableRows, names: set[str], dtype: str,
                     device: str) -> None:
    """The tables to write fit on the cache's disk (from one probe sample's sizes), or a ConfigError
    before the teacher's pass: a FitNets feature map of a 224-px image is megabytes per sample."""
    x = rows.data[0][0].unsqueeze(0).to(device)  # type: ignore[index]
    per_sample = sum(v[0].numel() for k, v in features.teacher_pass(teacher.to(device).eval(), x).items() if k in names)
    need = per_sample * np.dtype(DTYPES[dtype]).itemsize * len(rows.data)  # type: ignore[arg-type]
    free = shutil.disk_usage(where).free
    if need > 0.9 * free:
        raise FeatureTablesTooLarge(f"teacher.cache_dir: the teacher's cached features need {need / 2**30:.1f} GiB ({_bytes(need // len(rows.data))} "  # type: ignore[arg-type]
                          f"per sample) and {where} has {free / 2**30:.1f} GiB free; set teacher.precompute_outputs=false "
                          "(the teacher runs live), teacher.outputs_dtype=float16, or name smaller layers")


def _columns(features: FeatureLoss) -> list[tuple[str, str, int, str, str]]:
    """(feature key, term, pair, form, teacher layer) of each hooked teacher layer."""
    return [(key, name, i, form, features.pairs[name][i][1]) for key, name, i, form in features.teacher_keys()]


def _bytes(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"
