"""Bring-your-own-model runs on digits: one whole ``train.py`` run per model source (torchvision,
timm, Hugging Face, your own class), each from an empty teacher cache, timed from the outside.

    python bench/sources.py                 # every source; prints the README's table, writes bench/sources.json
    python bench/sources.py --only timm     # one row

This machine has no internet, so no row downloads weights: the torchvision and timm teachers start
from random weights and are trained here on digits; the Hugging Face teacher is a small ResNet
written with ``save_pretrained`` into a local directory (a user passes a hub id the same way) and
fine-tuned here (all layers); your own class (``examples/nets.py``) is trained once, then its saved
state dict is loaded with ``teacher.checkpoint`` and used as it is (not trained).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["student=mlp", "logger=csv", "trainer.enable_progress_bar=false", "measure.latency=off"]


@dataclass
class Row:
    source: str
    overrides: list[str]
    teacher_arch: str
    teacher_source: str  # trained | as-is | checkpoint | fine-tuned ...
    teacher_acc: float
    teacher_seconds: float
    student_acc: float
    wall_seconds: float


def hf_resnet(directory: Path) -> None:
    """A small Hugging Face ResNet for 8-px grey digits, saved with save_pretrained (random weights)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic",
                          downsample_in_first_stage=False, num_labels=10,
                          id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    ResNetForImageClassification(config).save_pretrained(directory)


def run(source: str, overrides: list[str], work: Path, cache: Path) -> Row:
    out = work / f"run-{source.replace(' ', '_').replace(',', '')}"
    env = {**os.environ, "DISTILL_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *COMMON, *overrides, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{source}: train.py failed\n{done.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    teacher = summary["teacher"]
    return Row(source, overrides, str(teacher["arch"]), str(teacher["source"]), float(teacher["test_acc"]),
               float(teacher.get("train_seconds") or 0.0), float(summary["student"]["test_acc"]), wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only the rows whose source starts with this")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "sources.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "cache"  # empty: every teacher is built (trained, fine-tuned or measured) in its row
        hf_resnet(work / "hf-resnet")
        own = ["teacher=custom", "teacher._target_=examples.nets.DigitsNet", "+teacher.kwargs.width=32"]
        plan: list[tuple[str, list[str]]] = [
            ("torchvision", ["teacher=torchvision", "teacher.arch=efficientnet_b0", "teacher.resize=32"]),
            ("timm", ["teacher=timm", "teacher.arch=resnet18"]),
            ("hf", ["teacher=hf", f"teacher.repo={work / 'hf-resnet'}", "teacher.finetune_epochs=10", "teacher.finetune=all"]),
            ("own class, trained", own),
        ]
        rows = []
        for source, overrides in plan:
            if args.only and not source.startswith(args.only):
                continue
            rows.append(run(source, overrides, work, cache))
            print(f"{source}: {rows[-1]}", flush=True)
        if not args.only or "own".startswith(args.only):
            trained = sorted((cache / "teachers").glob("custom*.pt"))
            if not trained:
                raise SystemExit(f"no cached DigitsNet teacher (custom*.pt) under {cache / 'teachers'}")
            saved = work / "digitsnet.pt"  # the user's file: the state dict under "state_dict", as trainers save it
            import torch  # deferred: only for the checkpoint hand-over

            entry = torch.load(trained[-1], map_location="cpu", weights_only=True)
            torch.save({"state_dict": entry["state_dict"]}, saved)
            rows.append(run("own class, from its checkpoint", [*own, f"teacher.checkpoint={saved}",
                                                               "teacher.checkpoint_key=state_dict"], work, cache))
            print(f"own class, from its checkpoint: {rows[-1]}", flush=True)
    args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print("\n| source | command (after `python train.py student=mlp`) | teacher | trained here | teacher acc | student acc | wall time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        shown = " ".join(o if "/tmp" not in o else o.split("=")[0] + "=<dir>" for o in r.overrides)
        trained = {"trained": f"yes ({r.teacher_seconds:.0f} s)", "fine-tuned": f"fine-tuned ({r.teacher_seconds:.0f} s)"}
        print(f"| {r.source} | `{shown}` | {teacher_name(r.overrides)} | {trained.get(r.teacher_source, f'no: {r.teacher_source}, used as is')} | "
              f"{100 * r.teacher_acc:.2f} | {100 * r.student_acc:.2f} | {r.wall_seconds:.0f} s |")


def teacher_name(overrides: list[str]) -> str:
    """The model a row's overrides name: its architecture, class or repository."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    if "teacher._target_" in given:
        return given["teacher._target_"].rsplit(".", 1)[-1]
    if "teacher.repo" in given:
        return "HF ResNet (save_pretrained dir)"
    resize = f", seeing {given['teacher.resize']} px" if "teacher.resize" in given else ""
    return f"{given['teacher'].split('=')[-1]} {given.get('teacher.arch', '')}{resize}".strip()


if __name__ == "__main__":
    main()
