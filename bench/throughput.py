"""Distillation throughput: how close does distilling get to the speed of training the student alone?

    python bench/throughput.py                      # both default setups, results in bench/throughput.json
    python bench/throughput.py --setup digits_mlp   # one of them
    python bench/throughput.py --seconds 5          # longer measurements, less noise

For each setup, in one process, it measures samples per second of
  - student_only:  training the student on labels (forward, backward, optimizer step),
  - cached:        distillation with the teacher's logits read from the precomputed table,
  - live:          distillation running the teacher on every batch,
  - teacher:       teacher inference alone (inference mode),
and prints the ratios ``cached / student_only`` and ``live / ideal_live``, where
``ideal_live = 1 / (1/teacher + 1/student_only)`` is what a live teacher costs if nothing but its
own inference is added. Each figure is the median of ``--repeats`` timed windows, the methods
interleaved, so a noisy shared machine biases none of them. All variants use the same data loader,
batch size, KDLoss and optimizer as training (distill.distillation.module / distill.distillation.losses); weights are random,
which does not change the arithmetic. Peak memory is the process's peak RSS after each method
(cumulative, so read it as "at most"), and the CUDA peak on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.data.datamodules import build_datamodule  # noqa: E402
from distill.distillation.losses.kd import KDLoss  # noqa: E402
from distill.distillation.module import DistillationModule  # noqa: E402
from distill.distillation.optim import build_optimizer  # noqa: E402
from distill.models.registry import build_student, build_teacher  # noqa: E402
from distill.teacher.outputs import compute_teacher_logits  # noqa: E402

SETUPS = {
    "digits_mlp": {"teacher": "resnet50", "student": "mlp", "data": "digits", "data_overrides": {}},
    "synthetic32_cnn": {
        "teacher": "resnet50", "student": "cnn", "data": "synthetic",
        "data_overrides": {"num_classes": 10, "channels": 3, "image_size": 32, "num_samples": 2048},
    },
}


def _cfg(group: str, name: str, **overrides) -> OmegaConf:
    cfg = OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, overrides)
    return cfg


def _data_cfg(name: str, overrides: dict) -> OmegaConf:
    from distill.config.schema import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), _cfg("data", name), overrides)


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


def _rate(step: Callable[[tuple], None], batches: Iterator, seconds: float, batch_size: int, warmup: int = 3) -> float:
    """Samples per second of ``step`` over at least ``seconds`` (and at least 3 steps)."""
    for _ in range(warmup):
        step(next(batches))
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        step(next(batches))
        n += 1
    return n * batch_size / (time.perf_counter() - start)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_setup(name: str, setup: dict, seconds: float, repeats: int, batch_size: int, device: str) -> dict:
    torch.manual_seed(0)
    dm = build_datamodule(_data_cfg(setup["data"], {**setup["data_overrides"], "batch_size": batch_size}))
    dm.setup("fit")
    shape = dm.shape
    teacher = build_teacher(_cfg("teacher", setup["teacher"]), **shape).to(device).eval().requires_grad_(False)
    student = build_student(_cfg("student", setup["student"]), **shape).to(device)
    optim_cfg = OmegaConf.create({"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9})
    optimizer = build_optimizer(student.parameters(), optim_cfg)
    table = compute_teacher_logits(teacher, dm.train_set, device=device).to(device)

    live = DistillationModule(student, teacher, KDLoss(4.0, 0.9), optim_cfg, shape["num_classes"], teacher_channels_last=True)
    cached = DistillationModule(student, None, KDLoss(4.0, 0.9), optim_cfg, shape["num_classes"], teacher_outputs=table)
    plain = DistillationModule(student, None, KDLoss(4.0, 0.0), optim_cfg, shape["num_classes"])
    for m in (live, cached, plain):
        m.to(device).train()

    def train_step(module: DistillationModule, use_index: bool) -> Callable[[tuple], None]:
        def step(batch: tuple) -> None:
            x, y, idx = (t.to(device, non_blocking=True) for t in batch)
            logits = module.student(x)
            loss = module.distill_loss(logits, module.teacher_logits(x, idx if use_index else None), y)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    @torch.inference_mode()
    def teacher_step(batch: tuple) -> None:
        x = batch[0].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        teacher(x)

    dm.index_train = True  # batches carry sample indices, as in a run with precomputed outputs
    batches = _cycle(dm.train_dataloader())
    methods = {
        "student_only": train_step(plain, False),
        "cached": train_step(cached, True),
        "live": train_step(live, False),
        "teacher": teacher_step,
    }
    rates: dict[str, list[float]] = {k: [] for k in methods}
    memory: dict[str, float] = {}
    for _ in range(repeats):
        for key, step in methods.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rates[key].append(_rate(step, batches, seconds, batch_size))
            memory[key] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb()
    rate = {k: statistics.median(v) for k, v in rates.items()}
    ideal_live = 1.0 / (1.0 / rate["teacher"] + 1.0 / rate["student_only"])
    return {
        "setup": name,
        **{k: v for k, v in setup.items() if k != "data_overrides"},
        "data_overrides": setup["data_overrides"],
        "batch_size": batch_size,
        "device": device,
        "threads": torch.get_num_threads(),
        "samples_per_s": rate,
        "samples_per_s_all": rates,
        "ideal_live": ideal_live,
        "cached_over_student_only": rate["cached"] / rate["student_only"],
        "live_over_ideal_live": rate["live"] / ideal_live,
        "student_only_over_live": rate["student_only"] / rate["live"],
        "peak_memory_mb": memory,
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS (cumulative)",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=sorted(SETUPS), action="append", help="default: all")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per method (median)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "throughput.json")
    args = parser.parse_args(argv)

    results = []
    for name in args.setup or sorted(SETUPS):
        r = run_setup(name, SETUPS[name], args.seconds, args.repeats, args.batch_size, args.device)
        results.append(r)
        s = r["samples_per_s"]
        print(f"{name}: {r['teacher']} -> {r['student']} on {r['data']} (batch {r['batch_size']}, {r['threads']} threads, {r['device']})")
        for key in ("student_only", "cached", "live", "teacher"):
            print(f"  {key:>12}: {s[key]:10.1f} samples/s   peak mem {r['peak_memory_mb'][key]:8.1f} MB")
        print(f"  cached / student_only = {r['cached_over_student_only']:.3f}   (goal >= 0.9)")
        print(f"  live / ideal_live     = {r['live_over_ideal_live']:.3f}   (goal >= 0.9; ideal_live = {r['ideal_live']:.1f}/s)")
        print(f"  student_only / live   = {r['student_only_over_live']:.1f}x  (what the cache saves)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")
    return results


if __name__ == "__main__":
    main()
