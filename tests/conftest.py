"""Shared fixtures: compose the real ``conf/`` with overrides, as train.py would."""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from distill.config.schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register_configs()


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path, config_name: str = "train") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve as in a run
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        del cfg["hydra"]
    return cfg


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """``make_cfg("student=cnn", ...)``: the real train config with overrides, in a temp run dir."""

    def make(*overrides: str, config_name: str = "train") -> DictConfig:
        return compose_config(list(overrides), tmp_path / "run", cache_dir, config_name)

    return make


FAST = ["debug=fast", "logger=csv"]


def run_script(
    script: str, *args: str, cwd: Path, env: dict[str, str | None] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run train.py / evaluate.py as a user would, in its own process (``env`` value None: unset)."""
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )



def write_fake_cifar10(root: Path, n_train_per_batch: int = 20, n_test: int = 30) -> None:
    """The binary layout torchvision's CIFAR10 reads: pickled dicts of uint8 rows (3072 = 3x32x32)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(batch(n_train_per_batch), fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(batch(n_test), fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)


# --- SLURM (tests/test_sweeps.py, tests/test_preemption.py) ---------------------------------------

def _local_slurm_script() -> Path | None:
    candidate = Path(os.environ.get("DISTILL_LOCAL_SLURM", ROOT.parent / "shared" / "tools" / "local-slurm.sh"))
    return candidate if candidate.is_file() else None


@pytest.fixture(scope="module")
def slurm_partition() -> str:
    """A SLURM partition to submit to: the running cluster's default, else a local one started here."""
    def default_partition() -> str | None:
        if not shutil.which("sinfo"):
            return None
        out = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30)
        up = [line.split()[0] for line in out.stdout.splitlines() if any(s in line for s in ("idle", "mixed", "alloc"))]
        return up[0].rstrip("*") if up else None

    partition = default_partition()
    if partition is None and (script := _local_slurm_script()) is not None and os.geteuid() == 0:
        started = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=900)
        partition = started.stdout.strip().splitlines()[-1] if started.returncode == 0 and started.stdout.strip() else None
    if partition is None:
        if os.environ.get("DISTILL_REQUIRE_SLURM"):
            pytest.fail("DISTILL_REQUIRE_SLURM is set but no SLURM cluster answers (sinfo) and none could be started")
        pytest.skip("no SLURM cluster (start one with ../shared/tools/local-slurm.sh start)")
    return partition


@functools.cache
def int32_dot_products() -> bool:
    """Whether ONNX Runtime's u8 x s8 integer kernels add their products exactly on this CPU, probed on
    one QGemm: 16 products of activation code 255 and weight 127. With VNNI (AVX-512 VNNI, AVX-VNNI)
    and on ARM they are added in int32; on x86 without VNNI (AVX2), MLAS adds pairs of products in
    int16 (``vpmaddubsw``), which saturates when codes above 127 meet weights near +-127. A QAT
    student's x86 activations stay at 0..127 inside their learned ranges, so int8 files that should
    agree bit for bit do so there on every CPU, and beyond those ranges only where this is true."""
    import onnx  # deferred: a few tests ask
    import onnxruntime as ort  # deferred
    from onnx import TensorProto, helper, numpy_helper  # deferred

    k = 16
    inits = [numpy_helper.from_array(np.full((1, k), 127, np.int8), "w"), numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zx"), numpy_helper.from_array(np.array(0, np.int8), "zw"),
             numpy_helper.from_array(np.zeros(1, np.int32), "b"), numpy_helper.from_array(np.array(1.0, np.float32), "sb")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"]), helper.make_node("DequantizeLinear", ["b", "sb"], ["bd"]),
             helper.make_node("Gemm", ["xd", "wd", "bd"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what the files run with
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "QGemm" in ops, ops  # the integer kernel is what is probed (a float Gemm would be exact anywhere)
    [[y]] = session.run(None, {"x": np.full((1, k), 255.0, np.float32)})[0]
    return float(y) == 16 * 255 * 127
