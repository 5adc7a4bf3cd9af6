"""Distillation throughput: how close do distilling, and the service's own training path, get to the
speed of a plain PyTorch loop?

    python bench/throughput.py                      # both default setups, results in bench/throughput.json
    python bench/throughput.py --setup digits_mlp   # one of them
    python bench/throughput.py --seconds 5          # longer step windows, less noise

For each setup, in one process, it measures samples per second of

step by step (the same data loader, batch size, loss and optimizer as training; random weights,
which do not change the arithmetic):
  - student_only:  training the student on labels (forward, backward, optimizer step),
  - cached:        distillation from the teacher's cached logits, which the data loader returns
                   with each batch (distill/data/datasets.py: WithTeacherRows),
  - cached_<m>:    the same with each other logit loss (dkd, dist, nkd, kd with JSD, kd with
                   logit standardization),
  - features_<f>:  kd from the cached logits plus a feature term whose teacher side is read from the
                   cached teacher features with each batch (distill/teacher/features.py): rkd, pkt,
                   sp, crd on every student, at and hint (FitNets) on convolutional ones,
  - live_<f>:      the same feature term with the teacher run on every batch (what the feature cache saves),
  - live:          distillation running the teacher on every batch,
  - teacher:       teacher inference alone (inference mode);

whole runs of ``--epochs`` epochs:
  - trainer_fit:   ``distill.pipeline.fit_student``, the path of ``train.py``: its Trainer with every
                   callback of a run (best and last checkpoints, resume state, preemption, the progress
                   bar), the CSV logger, the module and data module, from the cached logits;
  - plain_loop:    a hand-written loop doing the same work: the same student, loss, optimizer, LR
                   schedule and data loader; each epoch a validation pass, a ``torch.save`` of the
                   student and optimizer, and a second one when validation accuracy improves;

and prints the ratios ``cached / student_only``, ``live / ideal_live`` (``ideal_live = 1 / (1/teacher +
1/student_only)``: what a live teacher costs if nothing but its own inference is added) and
``trainer_fit / plain_loop``. Each figure is the median of ``--repeats`` measurements, the methods
interleaved, so a noisy shared machine biases none of them. Peak memory is the process's peak RSS
after each step method (cumulative, so read it as "at most"), and the CUDA peak on a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config.schema import register_configs  # noqa: E402
from distill.data.datamodules import BaseDataModule, build_datamodule  # noqa: E402
from distill.distillation.features.combined import build_features  # noqa: E402
from distill.distillation.losses.registry import build_loss  # noqa: E402
from distill.distillation.optim import build_optimizer, build_scheduler  # noqa: E402
from distill.models.registry import build_student, build_teacher  # noqa: E402
from distill.pipeline import Teacher, fit_student  # noqa: E402
from distill.runtime.cuda_probe import skip_nvml_check_without_nvml  # noqa: E402
from distill.teacher.outputs import compute_teacher_logits  # noqa: E402

SETUPS = {
    "digits_mlp": {"teacher": "resnet50", "student": "mlp", "data": "digits", "data_overrides": {}, "epochs": 30},
    "synthetic32_cnn": {
        "teacher": "resnet50", "student": "cnn", "data": "synthetic", "epochs": 5,
        "data_overrides": {"num_classes": 10, "channels": 3, "image_size": 32, "num_samples": 2048},
    },
}


def compose_run_config(setup: dict, batch_size: int, epochs: int, output_dir: Path) -> DictConfig:
    """The config ``train.py`` composes for the setup (logger=csv: no W&B start-up in the figures)."""
    overrides = [f"teacher={setup['teacher']}", f"student={setup['student']}", f"data={setup['data']}", "logger=csv",
                 f"data.batch_size={batch_size}", f"trainer.max_epochs={epochs}", "resume=never",
                 *(f"data.{k}={v}" for k, v in setup["data_overrides"].items())]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve as in a run
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(output_dir.parent / "cache")  # nothing is cached: no teacher is provisioned
        del cfg["hydra"]
    return cfg


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


# The logit losses timed from the cache beside kd (``cached``): loss config overrides by label.
LOGIT_METHODS: dict[str, dict] = {
    "dkd": {"name": "dkd", "alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup_epochs": 0},
    "dist": {"name": "dist", "beta": 2.0, "gamma": 2.0, "ce_weight": 1.0},
    "nkd": {"name": "nkd", "temperature": 1.0, "alpha": 1.0, "gamma": 1.5, "ce_weight": 1.0},
    "kd_jsd": {"divergence": "jsd"},
    "kd_standardized": {"logit_standardize": True},
}


# The feature terms timed with cached teacher features (``features_<term>``), on top of kd: loss config
# overrides by term. ``conv``: needs feature maps (a convolutional student).
FEATURE_METHODS: dict[str, dict] = {
    "rkd": {"rkd": {"weight": 1.0}}, "pkt": {"pkt": {"weight": 30000.0}}, "sp": {"sp": {"weight": 3000.0}},
    "crd": {"crd": {"weight": 0.8, "nce_k": 512}},  # below the digits split's ~970 negatives per class
    "at": {"at": {"weight": 1000.0}, "conv": True}, "hint": {"hint": {"weight": 1.0}, "conv": True},
}


def feature_methods(student_name: str) -> list[str]:
    return [m for m, o in FEATURE_METHODS.items() if not o.get("conv") or student_name != "mlp"]


def step_rates(cfg: DictConfig, dm: BaseDataModule, teacher: torch.nn.Module, table: torch.Tensor, seconds: float, repeats: int,
               device: str) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Samples/s of single training steps: student alone, from the cached logits (kd, and each of
    :data:`LOGIT_METHODS` as ``cached_<label>``), with the live teacher; teacher inference."""
    batch_size = dm.batch_size
    student = build_student(cfg.student, **dm.shape).to(device).train()
    optimizer = build_optimizer(student.parameters(), cfg.optim)
    kd, ce = build_loss(cfg.loss), build_loss(OmegaConf.merge(cfg.loss, {"alpha": 0.0}))

    def train_step(loss_of: Callable[[torch.Tensor, tuple], torch.Tensor]) -> Callable[[tuple], None]:
        def step(batch: tuple) -> None:
            x, y, *rest = (t.to(device, non_blocking=True) for t in batch)
            logits = student(x)
            loss = loss_of(logits, (x, y, *rest))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    @torch.inference_mode()
    def teacher_step(batch: tuple) -> None:
        teacher(batch[0].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    plain_batches = _cycle(dm.train_dataloader())  # (x, y)
    dm.teacher_table = table
    cached_batches = _cycle(dm.train_dataloader())  # (x, y, the teacher's logits), as in a run from the cache
    dm.teacher_table = None
    methods = {
        "student_only": (train_step(lambda logits, b: ce(logits, None, b[1])["loss"]), plain_batches),
        "cached": (train_step(lambda logits, b: kd(logits, b[2], b[1])["loss"]), cached_batches),
        "live": (train_step(lambda logits, b: kd(logits, live_logits_of(teacher, b[0]), b[1])["loss"]), plain_batches),
        "teacher": (teacher_step, plain_batches),
    }
    for label, overrides in LOGIT_METHODS.items():
        loss = build_loss(OmegaConf.merge(cfg.loss, overrides))
        methods[f"cached_{label}"] = (train_step(lambda logits, b, loss=loss: loss(logits, b[2], b[1])["loss"]), cached_batches)
    for term in feature_methods(cfg.student.name):
        methods.update(feature_steps(cfg, dm, student, teacher, table, term, optimizer, kd, device))
    rates: dict[str, list[float]] = {k: [] for k in methods}
    memory: dict[str, float] = {}
    for _ in range(repeats):
        for key, (step, batches) in methods.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rates[key].append(_rate(step, batches, seconds, batch_size))
            memory[key] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb()
    return rates, memory


def feature_steps(cfg: DictConfig, dm: BaseDataModule, student: torch.nn.Module, teacher: torch.nn.Module, table: torch.Tensor,
                  term: str, optimizer: torch.optim.Optimizer, kd: torch.nn.Module, device: str) -> dict[str, tuple]:
    """``features_<term>`` (teacher features from the cache, with the batch) and ``live_<term>`` (the
    teacher run every step, its hooks keeping its layers' outputs) training steps: kd plus the term."""
    overrides = {k: v for k, v in FEATURE_METHODS[term].items() if k != "conv"}
    fcfg = OmegaConf.merge(cfg, {"loss": overrides})
    features = build_features(fcfg, student, teacher, dm.shape, labels=dm.train_labels().to(device))
    assert features is not None
    features.to(device)
    if list(features.parameters()):  # FitNets' regressors, CRD's heads: trained with the student, as in a run
        optimizer.add_param_group({"params": list(features.parameters())})
    with torch.no_grad():  # the cached columns, as distill.teacher.features computes them (in memory here)
        rows = dm.train_set
        parts = [features.teacher_pass(teacher, rows.gather(list(range(i, min(i + 256, len(rows)))))[0].to(device))
                 for i in range(0, len(rows), 256)]
    columns = {key: torch.cat([p[key] for p in parts]).cpu() for key in parts[0]}
    dm.teacher_table, dm.with_index = {"logits": table, **columns}, features.needs_index
    cached_batches = _cycle(dm.train_dataloader())  # (x, y, {logits, features, index})
    dm.teacher_table, dm.with_index = None, features.needs_index
    live_batches = _cycle(dm.train_dataloader())  # (x, y[, {index}])
    dm.with_index = False

    def step(batch: tuple, live: bool) -> None:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        extra = {k: v.to(device, non_blocking=True) for k, v in batch[2].items()} if len(batch) > 2 else {}
        with features.taps.record():
            logits = student(x)
            t_logits = live_logits_of(teacher, x) if live else extra["logits"]
        _, weighted = features(None if live else extra, index=extra.get("index"))
        loss = kd(logits, t_logits, y)["loss"] + weighted
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {f"features_{term}": (lambda b: step(b, False), cached_batches), f"live_{term}": (lambda b: step(b, True), live_batches)}


def live_logits_of(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(x.contiguous(memory_format=torch.channels_last))


def trainer_fit(cfg: DictConfig, dm: BaseDataModule, table: torch.Tensor, output_dir: Path) -> float:
    """Seconds of ``fit_student`` (train.py's Trainer, module and data module) from the cached logits."""
    dm.teacher_table = table
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    start = time.perf_counter()
    fit_student(cfg, dm, Teacher(outputs=table), output_dir, [])
    seconds = time.perf_counter() - start
    dm.teacher_table = None
    return seconds


def plain_loop(cfg: DictConfig, dm: BaseDataModule, table: torch.Tensor, output_dir: Path, device: str) -> float:
    """Seconds of the same training written as a plain loop: forward, loss, backward, step; and each
    epoch a validation pass, a checkpoint of the student and optimizer, and a best checkpoint when it improved."""
    torch.manual_seed(int(cfg.seed))
    start = time.perf_counter()
    student = build_student(cfg.student, **dm.shape).to(device)
    loss_fn = build_loss(cfg.loss)
    optimizer = build_optimizer(student.parameters(), cfg.optim)
    dm.teacher_table = table
    train, val = dm.train_dataloader(), dm.val_dataloader()
    dm.teacher_table = None
    epochs = int(cfg.trainer.max_epochs)
    scheduler = build_scheduler(optimizer, cfg.optim, epochs * len(train), steps_per_epoch=len(train))
    best = -1.0
    output_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(epochs):
        train.batch_sampler.set_epoch(epoch)  # as Lightning does: the epoch's shuffled order
        student.train()
        for x, y, t in train:
            x, y, t = x.to(device, non_blocking=True), y.to(device, non_blocking=True), t.to(device, non_blocking=True)
            loss = loss_fn(student(x), t, y)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        student.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((student(x.to(device)).argmax(-1) == y.to(device)).sum())
                seen += len(y)
        state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        torch.save(state, output_dir / "last.pt")
        if correct / seen > best:
            best = correct / seen
            torch.save(state, output_dir / "best.pt")
    return time.perf_counter() - start


def run_setup(name: str, setup: dict, seconds: float, repeats: int, batch_size: int, device: str, fit_repeats: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    cfg = compose_run_config(setup, batch_size, setup["epochs"], work / "run")
    torch.manual_seed(0)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    shape = dm.shape
    teacher = build_teacher(cfg.teacher, **shape).to(device).eval().requires_grad_(False)
    teacher.to(memory_format=torch.channels_last)
    table = compute_teacher_logits(teacher, dm.train_set, device=device)

    rates, memory = step_rates(cfg, dm, teacher, table, seconds, repeats, device)
    fit_seconds: dict[str, list[float]] = {"trainer_fit": [], "plain_loop": []}
    for i in range(fit_repeats):  # interleaved, each on a fresh run directory
        fit_seconds["trainer_fit"].append(trainer_fit(cfg, dm, table, work / f"fit{i}"))
        fit_seconds["plain_loop"].append(plain_loop(cfg, dm, table, work / f"plain{i}", device))
    samples = setup["epochs"] * len(dm.train_set)
    for key, values in fit_seconds.items():
        rates[key] = [samples / s for s in values]
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
        "fit_seconds_all": fit_seconds,
        "ideal_live": ideal_live,
        "cached_over_student_only": rate["cached"] / rate["student_only"],
        "methods_over_student_only": {label: rate[f"cached_{label}"] / rate["student_only"] for label in LOGIT_METHODS},
        "features_over_student_only": {t: rate[f"features_{t}"] / rate["student_only"] for t in feature_methods(setup["student"])},
        "features_cached_over_live": {t: rate[f"features_{t}"] / rate[f"live_{t}"] for t in feature_methods(setup["student"])},
        "live_over_ideal_live": rate["live"] / ideal_live,
        "student_only_over_live": rate["student_only"] / rate["live"],
        "trainer_fit_over_plain_loop": rate["trainer_fit"] / rate["plain_loop"],
        "peak_memory_mb": memory,
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS (cumulative)",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=sorted(SETUPS), action="append", help="default: all")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each timed step window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per step method (median)")
    parser.add_argument("--fit-repeats", type=int, default=3, help="whole runs of trainer_fit and of plain_loop (median)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "throughput.json")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one run's start-up lines, not every fit's
    skip_nvml_check_without_nvml()  # as train.py does (distill.pipeline.run), for every method alike

    results = []
    for name in args.setup or sorted(SETUPS):
        r = run_setup(name, SETUPS[name], args.seconds, args.repeats, args.batch_size, args.device, args.fit_repeats)
        results.append(r)
        s = r["samples_per_s"]
        print(f"{name}: {r['teacher']} -> {r['student']} on {r['data']} (batch {r['batch_size']}, {r['threads']} threads, {r['device']}, "
              f"whole runs of {r['epochs']} epochs)")
        for key in ("student_only", "cached", "live", "teacher"):
            print(f"  {key:>12}: {s[key]:10.1f} samples/s   peak mem {r['peak_memory_mb'][key]:8.1f} MB")
        for key in ("trainer_fit", "plain_loop"):
            print(f"  {key:>12}: {s[key]:10.1f} samples/s   (median of {len(r['fit_seconds_all'][key])} runs: "
                  f"{', '.join(f'{v:.2f}' for v in r['fit_seconds_all'][key])} s)")
        print(f"  cached / student_only    = {r['cached_over_student_only']:.3f}   (goal >= 0.95)")
        for label, ratio in r["methods_over_student_only"].items():
            print(f"  cached_{label} / student_only = {ratio:.3f}   (goal >= 0.9; {s['cached_' + label]:.1f} samples/s)")
        for term, ratio in r["features_over_student_only"].items():
            print(f"  features_{term} / student_only = {ratio:.3f}   (goal >= 0.9; {s['features_' + term]:.1f} samples/s; "
                  f"{r['features_cached_over_live'][term]:.1f}x the live teacher's {s['live_' + term]:.1f}/s)")
        print(f"  live / ideal_live        = {r['live_over_ideal_live']:.3f}   (goal >= 0.9; ideal_live = {r['ideal_live']:.1f}/s)")
        print(f"  trainer_fit / plain_loop = {r['trainer_fit_over_plain_loop']:.3f}   (goal >= {0.8 if r['data'] == 'digits' else 0.9})")
        print(f"  student_only / live      = {r['student_only_over_live']:.1f}x  (what the cache saves)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")
    return results


if __name__ == "__main__":
    main()
