"""The deployable files of four digits runs, each measured in its runtime: fp32 PyTorch, fp32 ONNX
Runtime, int8 PyTorch, int8 ONNX Runtime, fp16 ONNX Runtime (accuracy, bytes, latency at batch 1
and 1024), one ``train.py`` run per row (the teacher cached), figures from each run's summary.json.

    python bench/deploy.py              # prints the README's table and ratios, writes bench/deploy.json
                                        # and ONNX Runtime's per-node kernel times of the cnn's fp32 and int8 files

Rows: the ``mlp`` and ``cnn`` students with 8-bit QAT, the ``cnn`` with 50 % structured pruning
(channels removed from the fp32 student), and the same pruning under 8-bit QAT (the channels cut out
of the int8 and fp32 files' models, distill/compress/quant/qdq.py ``remove_channels``). Every file's
latency is timed inside its run, interleaved with the PyTorch models (``distill/compress/deploy.py``).
Then, in this process, the files are timed again interleaved over more rounds (a burst of load on a
shared machine can tip a run's three): each int8 file against its fp32 file, and the pruned CNN's
``student.onnx`` against the dense CNN's, against its MAC reduction (``macs_before / macs_after``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["logger=csv", "trainer.enable_progress_bar=false", "export.formats=[onnx,onnx_fp16,torch_export]"]
PLAN: dict[str, list[str]] = {
    "mlp, int8 QAT": ["student=mlp", "quant.bits=8"],
    "cnn, int8 QAT": ["student=cnn", "quant.bits=8"],
    "cnn, 50 % structured": ["student=cnn", "prune.method=structured", "prune.scope=layer", "prune.amount=0.5"],
    "cnn, 50 % structured, int8 QAT": ["student=cnn", "quant.bits=8", "prune.method=structured", "prune.scope=layer",
                                       "prune.amount=0.5"],
}
ROUNDS = 7  # of the interleaved re-timing in this process
COLUMNS = (("pytorch", "fp32 PyTorch"), ("onnx", "fp32 ONNX Runtime"), ("pytorch_int8", "int8 PyTorch"),
           ("onnx_int8", "int8 ONNX Runtime"), ("onnx_fp16", "fp16 ONNX Runtime"))


def run(name: str, overrides: list[str], work: Path) -> dict[str, Any]:
    out = work / name.replace(" ", "_").replace(",", "").replace("%", "pct")
    done = subprocess.run([sys.executable, "train.py", *COMMON, *overrides, f"hydra.run.dir={out}"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: train.py failed\n{done.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())


def retime(files: dict[str, Path], threads: int) -> dict[str, tuple[float, float]]:
    """``files`` (ONNX) timed interleaved in this process over :data:`ROUNDS` rounds: (ms at batch 1, at batch 1024)."""
    sys.path.insert(0, str(ROOT))
    # deferred: after the runs, in this process
    from distill.compress.deploy import OnnxRuntimeModel  # deferred
    from distill.measure import latency  # deferred

    lat = latency.measure_many({k: OnnxRuntimeModel(p, threads) for k, p in files.items()}, (1, 8, 8), 1024, threads, rounds=ROUNDS)
    return {k: (v.ms, v.ms_batch) for k, v in lat.items()}


def profile(path: Path, threads: int, calls: int = 30) -> list[tuple[str, float]]:
    """ONNX Runtime's profiler on ``path`` at batch 1024: (node: operator, ms per call), slowest first."""
    import collections  # deferred: the profile only
    import json as js  # deferred

    import numpy as np  # deferred
    import onnxruntime as ort  # deferred

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.enable_profiling = threads, 1, True
    options.profile_file_prefix = str(path.parent / f"profile_{path.stem}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1024, 1, 8, 8), dtype=np.float32)
    for _ in range(calls):
        session.run(None, {"input": x})
    events = js.loads(Path(session.end_profiling()).read_text())
    spent: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            spent[f"{e['name'].removesuffix('_kernel_time')}: {e['args']['op_name']}"] += e["dur"]
    return [(name, us / calls / 1e3) for name, us in spent.most_common()]


def cpu() -> dict[str, Any]:
    """This machine's CPU as far as ONNX Runtime's int8 kernels care: with VNNI (AVX-512 VNNI / AVX-VNNI)
    u8 x s8 products are added in int32; on AVX2 without it in int16 pairs, at about half the rate."""
    import platform  # deferred

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "deploy.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summaries = {}
        for name, overrides in PLAN.items():
            summaries[name] = run(name, overrides, Path(tmp))
            print(f"{name}: done", flush=True)
        rows: dict[str, Any] = {}
        for name, summary in summaries.items():
            files = {a["format"]: a for a in summary["artifacts"]}
            rows[name] = {"overrides": PLAN[name], "student_acc": summary["student"]["test_acc"], "files": files,
                          "macs_before": summary["student"].get("macs_before"), "macs_after": summary["student"].get("macs_after")}
        threads = rows["cnn, int8 QAT"]["files"]["onnx"]["latency_threads"]
        files = {f"{name}: {f}": Path(summary["run_dir"]) / f for name, summary in summaries.items()
                 for f in ("student.onnx", "student_int8.onnx") if (Path(summary["run_dir"]) / f).exists()}
        retimed = retime(files, threads)
        dense, pruned = retimed["cnn, int8 QAT: student.onnx"], retimed["cnn, 50 % structured: student.onnx"]
        speed_1, speed_batch = dense[0] / pruned[0], dense[1] / pruned[1]
        macs = rows["cnn, 50 % structured"]
        cnn_dir = Path(summaries["cnn, int8 QAT"]["run_dir"])
        profiles = {f: profile(cnn_dir / f, threads) for f in ("student.onnx", "student_int8.onnx")}
        result = {"rows": rows, "retimed_ms": retimed, "retime_rounds": ROUNDS, "pruned_speedup_b1": speed_1,
                  "pruned_speedup_b1024": speed_batch, "pruned_mac_reduction": macs["macs_before"] / macs["macs_after"],
                  "cnn_profile_ms": profiles, "cpu": cpu()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nCPU: {result['cpu']}")
    print("\n| student | file | runtime | test acc | bytes | ms, batch 1 | ms, batch 1024 |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        for fmt, label in COLUMNS:
            a = row["files"].get(fmt)
            if a is None or a.get("error"):
                print(f"| {name} | {label} | - | not built{': ' + a['error'] if a else ''} | | | |")
                continue
            size = f"{a['size_bytes']:,}" if a.get("size_bytes") else "-"
            print(f"| {name} | {label} | {a['runtime']} | {100 * a['acc']:.2f} | {size} | {a['latency_ms']:.3f} | {a['latency_ms_batch']:.2f} |")
    print()
    for name, row in rows.items():
        f = row["files"]
        if "onnx_int8" in f and not f["onnx_int8"].get("error"):
            print(f"{name}: int8 / fp32 in ONNX Runtime: {f['onnx']['latency_ms'] / f['onnx_int8']['latency_ms']:.2f}x at batch 1, "
                  f"{f['onnx']['latency_ms_batch'] / f['onnx_int8']['latency_ms_batch']:.2f}x at batch 1024; "
                  f"int8 accuracy ONNX Runtime - PyTorch: {100 * (f['onnx_int8']['acc'] - f['pytorch_int8']['acc']):+.2f} points")
    for name in summaries:
        fp32, int8 = retimed.get(f"{name}: student.onnx"), retimed.get(f"{name}: student_int8.onnx")
        if fp32 and int8:
            print(f"{name}, re-timed here over {ROUNDS} interleaved rounds: int8 {int8[0]:.3f} / {int8[1]:.2f} ms, "
                  f"fp32 {fp32[0]:.3f} / {fp32[1]:.2f} ms (batch 1 / 1024): {fp32[0] / int8[0]:.2f}x / {fp32[1] / int8[1]:.2f}x")
    for f, nodes in profiles.items():
        print(f"cnn {f}, ONNX Runtime's kernel time per call at batch 1024: "
              + ", ".join(f"{name} {ms:.2f} ms" for name, ms in nodes[:6]))
    print(f"cnn, 50 % structured: MACs {result['pruned_mac_reduction']:.2f}x fewer; ONNX Runtime {speed_1:.2f}x faster at batch 1, "
          f"{speed_batch:.2f}x at batch 1024 (goal: >= 0.6 x {result['pruned_mac_reduction']:.2f} = {0.6 * result['pruned_mac_reduction']:.2f}x)")


if __name__ == "__main__":
    main()
