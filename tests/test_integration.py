"""End-to-end runs of the real pipeline on composed configs (fast_dev_run or a few batches)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from distill.pipeline import run

from .conftest import FAST, run_script

pytestmark = pytest.mark.integration

# A small teacher keeps these runs quick; the default (resnet50) is exercised in test_default_teacher.
QUICK = [*FAST, "teacher=resnet18"]
SHORT_RUN = ["logger=csv", "teacher=resnet18", "teacher.epochs=1", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
             "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
             "export.formats=[]"]  # the ONNX / torch.export files: tests/test_deploy.py and the structured-pruning run below


@pytest.mark.parametrize("student", ["mlp", "cnn", "resnet18", "mobilenet_v3_small"])
def test_fast_dev_run_every_student(make_cfg, student):
    summary = run(make_cfg(*QUICK, f"student={student}"))
    assert summary["student"]["arch"] == student
    assert 0.0 <= summary["student"]["test_acc"] <= 1.0
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert saved["student"]["params"] == summary["student"]["params"] > 0
    assert saved["teacher"]["arch"] == "resnet18" and saved["teacher"]["source"] == "trained"


def test_default_teacher_fast_dev_run(make_cfg):
    summary = run(make_cfg(*FAST))
    assert summary["teacher"]["arch"] == "resnet50" and summary["teacher"]["params"] > 20_000_000


def test_synthetic_rgb_data(make_cfg):
    summary = run(make_cfg(*QUICK, "data=synthetic", "student=cnn", "data.num_classes=4"))
    assert summary["data"] == {"name": "synthetic", "num_classes": 4, "channels": 3, "image_size": 32}


def test_top5_is_reported_beside_top1_with_more_than_ten_classes(make_cfg):
    summary = run(make_cfg(*QUICK, "data=synthetic", "data.num_classes=20", "loss.alpha=0"))
    student = summary["student"]
    assert 0.0 <= student["test_acc"] <= student["test_acc5"] <= 1.0
    assert "test_acc5" not in run(make_cfg(*QUICK, "loss.alpha=0"))["student"]  # 10 classes: top-1 only


def test_alpha_zero_builds_no_teacher(make_cfg, cache_dir):
    summary = run(make_cfg(*QUICK, "loss.alpha=0"))
    assert summary["teacher"] is None
    assert not cache_dir.exists()


def test_second_run_reuses_the_cached_teacher(make_cfg):
    first = run(make_cfg(*QUICK))
    second = run(make_cfg(*QUICK))
    assert (first["teacher"]["source"], second["teacher"]["source"]) == ("trained", "cache")
    assert first["teacher"]["test_acc"] == second["teacher"]["test_acc"]


def test_user_callbacks_from_the_config_join_the_trainer(make_cfg, tmp_path):
    # EarlyStopping that stops at the first validation: 1 epoch of max_epochs=2 is trained.
    summary = run(make_cfg(*SHORT_RUN, "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
                           "+callbacks.stop.monitor=val/acc", "+callbacks.stop.mode=max", "+callbacks.stop.stopping_threshold=0.0"))
    last = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 3
    assert any(k.startswith("EarlyStopping") for k in last["callbacks"])


class TeacherProbe(Callback):
    """Test-only: saves the live teacher as the student's training leaves it (its state, and every
    module's training flag and parameter's requires_grad), for the test to compare with the cache."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = pl_module.teacher
        torch.save(None if teacher is None else {
            "state": {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()},
            "training": [m.training for m in teacher.modules()],
            "requires_grad": [p.requires_grad for p in teacher.parameters()],
        }, self.out)


def test_teacher_stays_frozen_and_out_of_checkpoints(make_cfg, tmp_path):
    # A live teacher (precompute_outputs=false): the student's module holds it while it trains, so
    # whether it is frozen and kept out of the checkpoints is observable (with precomputed outputs
    # the module holds no teacher at all).
    probe = tmp_path / "teacher_after_training.pt"
    summary = run(make_cfg(*SHORT_RUN, "teacher.precompute_outputs=false",
                           f"+callbacks.probe._target_={TeacherProbe.__module__}.TeacherProbe", f"+callbacks.probe.out={probe}"))
    assert summary["teacher_outputs"] == "live"
    ckpt = torch.load(summary["student"]["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["config"]["student"]["name"] == "mlp"
    # The teacher did not move while the student trained: after 2 epochs it is still the cached
    # entry, weights and BatchNorm running statistics alike, in eval mode and not trainable.
    entry = torch.load(summary["teacher"]["path"], weights_only=True)
    assert entry["meta"]["test_acc"] == summary["teacher"]["test_acc"]
    after = torch.load(probe, weights_only=True)
    assert after is not None, "the student trained with a live teacher"
    assert after["state"].keys() == entry["state_dict"].keys()
    moved = [k for k, v in entry["state_dict"].items() if not torch.equal(after["state"][k], v)]
    assert moved == []
    assert not any(after["training"]) and not any(after["requires_grad"])


def test_train_and_evaluate_scripts(tmp_path):
    cache = tmp_path / "cache"
    env = {"DISTILL_CACHE_DIR": str(cache)}
    result = run_script("train.py", *SHORT_RUN, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "teacher vs student" in result.stdout
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/kd", "train/ce", "train/acc", "val/acc", "test/acc"} <= set(header)  # the epoch means
    ev = run_script("evaluate.py", f"ckpt_path={summary['student']['best_checkpoint']}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"{100 * summary['student']['test_acc']:.2f} %" in ev.stdout
    # resume the student's training from the last checkpoint for one more epoch
    more = run_script("train.py", *SHORT_RUN, "trainer.max_epochs=3", f"ckpt_path={last}", f"hydra.run.dir={tmp_path}/run2", cwd=tmp_path, env=env)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "teacher: reusing cached resnet18" in more.stdout + more.stderr


def test_evaluate_rejects_a_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"\x00" * 100)
    ev = run_script("evaluate.py", f"ckpt_path={bad}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert ev.returncode == 2
    assert "broken.ckpt" in ev.stderr and "corrupt" in ev.stderr


def test_a_bad_value_exits_2_through_the_command_line(tmp_path):
    # Through the real command line, an out-of-range value found by validate() (tests/test_bad_input.py
    # checks 32 bad inputs, those found at compose time through the command line as well).
    result = run_script("train.py", *FAST, "loss.temperature=0", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
                        env={"DISTILL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert "loss.temperature=0.0 is out of range: must be a finite number > 0" in result.stderr
    assert not (tmp_path / "cache").exists()  # failed before any teacher work


def test_wandb_runs_offline_without_credentials(tmp_path):
    # No key in the environment, none in a netrc: W&B must neither prompt nor fail, but log offline.
    env = {"DISTILL_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc"),
           "WANDB_API_KEY": None, "WANDB_MODE": None}
    args = [a for a in SHORT_RUN if a != "logger=csv"]
    result = run_script("train.py", *args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run holds its data for `wandb sync`"
    # A clean console: none of the third-party noise (distill/runtime/console.py), no line printed twice.
    console = result.stdout + result.stderr
    for noise in ("litlogger", "litmodels", "anonymous setting", "LeafSpec", "to estimate number of stepping batches"):
        assert noise not in console, noise
    assert "INFO: Seed set to" not in console  # Lightning's own handler's copy of its log lines


def test_quantized_run_artifact_and_comparison(tmp_path):
    # A short real QAT run: summary keys, the packed artifact, evaluate.py on it, and runs= comparison.
    env = {"DISTILL_CACHE_DIR": str(tmp_path / "cache")}
    result = run_script("train.py", *SHORT_RUN, "student=cnn", "quant.bits=4", "quant.latency_batch_size=32",
                        f"hydra.run.dir={tmp_path}/runs/q4", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "q4" / "summary.json").read_text())
    student = summary["student"]
    for key in ("acc_fp32", "acc_quant", "size_bytes_fp32", "size_bytes_quant", "compression", "latency_ms_fp32", "latency_ms_quant"):
        assert isinstance(student[key], (int, float)), key
    assert student["size_bytes_quant"] == (tmp_path / "runs" / "q4" / "student_quant.pt.xz").stat().st_size
    assert "latency_ms" in summary["teacher"]
    assert "student int4" in result.stdout
    metrics = (tmp_path / "runs" / "q4" / "csv" / "metrics.csv").read_text()
    assert "student/acc_quant" in metrics and "student/compression" in metrics

    ev = run_script("evaluate.py", f"ckpt_path={student['artifact']}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"{100 * student['acc_quant']:.2f} %" in ev.stdout and "4-bit quantized" in ev.stdout

    # The QAT training checkpoint too (the fake-quant student is prepared before its weights load).
    ev = run_script("evaluate.py", f"ckpt_path={tmp_path}/runs/q4/checkpoints/last.ckpt", f"hydra.run.dir={tmp_path}/eval1", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "4-bit QAT (fake-quant)" in ev.stdout

    (tmp_path / "runs" / "crashed" / ".hydra").mkdir(parents=True)
    (tmp_path / "runs" / "crashed" / ".hydra" / "config.yaml").write_text("{}\n")
    cmp = run_script("evaluate.py", f"runs={tmp_path}/runs", f"hydra.run.dir={tmp_path}/eval2", cwd=tmp_path)
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    table = (tmp_path / "runs" / "comparison.md").read_text()
    assert "unfinished" in table and f"{student['acc_quant']:.4f}" in table
    assert (tmp_path / "runs" / "comparison.csv").is_file()


def test_evaluate_needs_a_checkpoint_or_runs(tmp_path):
    ev = run_script("evaluate.py", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert ev.returncode == 2 and "ckpt_path=PATH" in ev.stderr


def test_structured_pruning_run_removes_channels(tmp_path):
    env = {"DISTILL_CACHE_DIR": str(tmp_path / "cache")}
    # measure.latency=off: nothing is timed, and no latency figure is reported anywhere.
    with_files = [a for a in SHORT_RUN if not a.startswith("export.formats=")]  # the default formats: checked below
    result = run_script("train.py", *with_files, "student=cnn", "prune.method=structured", "prune.scope=layer",
                        "prune.amount=0.5", "prune.schedule=oneshot", "measure.latency=off",
                        f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    student = summary["student"]
    assert abs(student["sparsity"] - 0.5) < 0.01
    assert student["macs_after"] < student["macs_before"] and student["max_abs_diff_after_removal"] < 1e-4
    # the shrunk model is tested itself, and its accuracy is the deployed one
    assert student["removal_exact"] and student["acc_after_removal"] == summary["deployed"]["acc"]
    assert abs(student["acc_after_removal"] - student["test_acc"]) <= 1 / 360
    assert not [k for k in (*student, *summary["teacher"]) if k.startswith("latency_ms")]
    assert summary["deployed"]["latency_ms_batch"] is None
    assert student["size_bytes"] == student["size_bytes_dense"]  # masks baked, not weight_orig + mask
    shrunk = torch.jit.load(student["shrunk_artifact"])
    assert shrunk(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert "channels removed" in result.stdout
    # The ONNX and torch.export files are of the channel-removed model (the default export.formats).
    import onnx  # deferred: only this test reads an ONNX graph

    first_conv = next(i for i in onnx.load(str(tmp_path / "run" / "student.onnx")).graph.initializer if len(i.dims) == 4)
    assert first_conv.dims[0] == shrunk.state_dict()[next(k for k, v in shrunk.state_dict().items() if v.dim() == 4)].shape[0]
    artifacts = {a["format"]: a for a in summary["artifacts"]}
    assert artifacts["onnx"]["acc"] == pytest.approx(summary["deployed"]["acc"], abs=1.5 / 360)
    assert artifacts["torch_export"]["error"] is None and artifacts["onnx"]["latency_ms"] is None  # measure.latency=off


# (overrides, the terms logged as train/<term> epoch means, the hparams that name the method)
METHODS = [
    (["loss=dkd", "loss.warmup_epochs=2"], {"tckd", "nckd", "ce"}, {"loss": "dkd", "beta": 8.0, "warmup_epochs": 2}),
    (["loss=dist"], {"inter", "intra", "ce"}, {"loss": "dist", "beta": 2.0, "gamma": 2.0}),
    (["loss=nkd", "loss.logit_standardize=true"], {"target", "non_target", "ce"}, {"loss": "nkd", "logit_standardize": True}),
    (["loss.divergence=jsd"], {"kd", "ce"}, {"loss": "kd", "divergence": "jsd", "jsd_beta": 0.5}),
    (["loss=rkd", "loss.alpha=0.5"], {"kd", "ce", "rkd_distance", "rkd_angle"}, {"loss": "kd", "rkd_weight": 1.0}),
    (["loss=at", "student=cnn"], {"kd", "ce", "at"}, {"loss": "kd", "at_weight": 1000.0}),
    (["loss=dkd", "loss.pkt.weight=100", "loss.sp.weight=10", "loss.warmup_epochs=1"],
     {"tckd", "nckd", "ce", "pkt", "sp"}, {"loss": "dkd", "pkt_weight": 100.0, "sp_weight": 10.0}),
    (["loss=crd", "loss.crd.nce_k=64"], {"ce", "crd"}, {"loss": "kd", "crd_weight": 0.8}),
    (["teacher.ensemble=[{name:resnet18,epochs:2}]", "teacher.ensemble_weights=[1,3]"], {"kd", "ce"},
     {"loss": "kd", "ensemble": ["resnet18"], "ensemble_weights": [0.25, 0.75]}),
]


def test_every_method_trains_and_logs_its_terms(make_cfg, tmp_path):
    """Each logit loss and feature term, and a two-teacher ensemble, in a short run (cached teachers):
    its unweighted terms as epoch means in metrics.csv, its weights in the summary, and the teacher's
    logits and features read from the cache (without augmentation the teacher never runs in training)."""
    for index, (overrides, terms, hparams) in enumerate(METHODS):
        cfg = make_cfg(*SHORT_RUN, *overrides, "measure.latency=off", f"hydra.run.dir={tmp_path}/m{index}")  # about terms, not timings
        cfg.paths.output_dir = str(tmp_path / f"m{index}")
        summary = run(cfg)
        assert hparams.items() <= summary["hparams"].items(), (overrides, summary["hparams"])
        assert summary["teacher_outputs"].startswith("precomputed"), overrides
        header = (Path(summary["run_dir"]) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {f"train/{t}" for t in {"loss", "acc", *terms}} <= set(header), (overrides, header)
        assert summary["student"]["test_acc"] > 0.1
        if terms & {"rkd_distance", "at", "pkt", "crd"}:  # the resolved layers of each term, in the summary
            assert all(term["layers"] and term["weight"] > 0 for term in summary["features"].values()), summary["features"]
        if "ensemble" in hparams:
            [member] = summary["teacher"]["ensemble"]
            assert member["arch"] == "resnet18" and member["key"] != summary["teacher"]["key"]
