"""The deployed-model record: chosen by technique rank, printed from the summary's own figures,
derived for older summaries, read by the objective; and the pruned student's sparse file."""

from __future__ import annotations

import io

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from distill.compress.half import HalfReport
from distill.compress.lowrank import LowRankReport
from distill.compress.prune.callback import PruneReport
from distill.compress.quant.callback import QATReport
from distill.compress.registry import TECHNIQUES, Compression
from distill.compress.technique import StudentFigures
from distill.measure.record import DeployedModel, Latency
from distill.report.summary import deployed_model
from distill.report.table import print_comparison

STUDENT = StudentFigures("cnn", 94_186, 385_127, 0.97, "run/checkpoints/last.ckpt", Latency(0.2, 69.8))


class _Reported:
    def __init__(self, report):
        self.report = report


def _qat() -> QATReport:
    return QATReport(bits=8, backend="x86", acc_fp32=0.96, acc_fakequant=0.95, acc_quant=0.95, size_bytes_fp32=385_127,
                     size_bytes_quant=60_000, size_bytes_torchscript=120_000, compression=6.4, latency_ms_fp32=0.3,
                     latency_ms_quant=0.1, latency_ms_fp32_batch=50.0, latency_ms_quant_batch=20.0, latency_batch_size=1024,
                     latency_threads=2, artifact="run/student_quant.pt.xz", torchscript="run/student_quant.torchscript.pt")


def _prune() -> PruneReport:
    return PruneReport(prune_method="magnitude", sparsity=0.7, sparsity_per_layer={"a": 0.7}, nonzero_params=30_000,
                       size_bytes_dense=385_000, size_bytes_sparse=140_000, sparse_artifact="run/student_sparse.pt")


def test_the_strongest_technique_deploys_and_its_fp32_figures_win():
    both = Compression([(TECHNIQUES["quant"], _Reported(_qat())), (TECHNIQUES["prune"], _Reported(_prune()))])
    deployed = both.deployed(STUDENT)
    assert (deployed.kind, deployed.size_bytes, deployed.acc, deployed.path) == ("int8", 60_000, 0.95, "run/student_quant.pt.xz")
    assert both.fp32_size_bytes() == 385_127 and both.fp32_latency() == Latency(0.3, 50.0)
    pruned = Compression([(TECHNIQUES["prune"], _Reported(_prune()))]).deployed(STUDENT)
    assert (pruned.kind, pruned.size_bytes, pruned.latency_ms_batch) == ("pruned", 140_000, 69.8)
    plain = Compression().deployed(STUDENT)
    assert (plain.kind, plain.size_bytes, plain.path) == ("fp32", 385_127, "run/checkpoints/last.ckpt")


def test_half_report_without_native_kernels_keeps_no_latency_keys():
    simulated = HalfReport(half_dtype="bf16", half_mode="weights-rounded", acc_half=0.9, size_bytes_half=200_000, half_artifact="x")
    assert "latency_ms_half_batch" not in simulated.summary() and simulated.fp32_latency() is None


def test_table_shows_the_deployed_model_from_the_summary_figures():
    lowrank = LowRankReport(params_before_lowrank=94_186, size_bytes_before_lowrank=385_127, acc_before_lowrank=0.97,
                            acc_lowrank_before_recovery=0.5, lowrank_layers=3, lowrank_ranks={"a": 8}, params_after_lowrank=30_186,
                            size_bytes_lowrank=129_761, latency_ms_batch_before_lowrank=69.8, latency_ms_batch_after_lowrank=53.7)
    deployed = Compression([(TECHNIQUES["lowrank"], _Reported(lowrank))]).deployed(STUDENT)
    summary = {"data": {"name": "digits"}, "teacher": None, "deployed": deployed.as_dict(),
               "student": {"arch": "cnn", "params": 94_186, "size_bytes": 385_127, "test_acc": 0.97, "latency_ms_batch": 69.8,
                           "latency_batch_size": 1024}}
    out = io.StringIO()
    print_comparison(summary, Console(file=out, width=200))
    [row] = [line for line in out.getvalue().splitlines() if "student lowrank" in line]
    assert "30,186" in row and "129,761" in row and "53.700" in row
    assert "no test split" not in out.getvalue()
    out = io.StringIO()
    print_comparison({**summary, "data": {"name": "imagefolder", "test_split": "val"}}, Console(file=out, width=200))
    assert "imagefolder has no test split: the test accuracies above are measured on its val split" in out.getvalue()


def test_an_older_summary_yields_the_same_deployed_model_the_comparison_used():
    old = {"student": {"arch": "mlp", "bits": 4, "test_acc": 0.95, "acc_quant": 0.93, "size_bytes": 200_000,
                       "size_bytes_fp32": 200_000, "size_bytes_quant": 30_000, "size_bytes_torchscript": 80_000,
                       "latency_ms_quant": 0.1, "latency_ms_quant_batch": 2.0, "artifact": "a.pt.xz"}}
    d = deployed_model(old)
    assert (d.kind, d.acc, d.size_bytes, d.latency_ms_batch, d.bits) == ("int4", 0.93, 30_000, 2.0, 4)
    new = {"student": old["student"], "deployed": DeployedModel("int4", 0.9, 1, 123, 4, None, None, "b").as_dict()}
    assert deployed_model(new).size_bytes == 123  # the record wins over the keys


def test_objective_penalizes_the_deployed_size(make_cfg):
    from distill.report.objective import objective

    summary = {"student": {"test_acc": 0.9}, "deployed": DeployedModel("pruned", 0.9, 1, 2_000_000, 32, None, None, "x").as_dict()}
    assert objective(summary, make_cfg("objective.size_penalty=0.01")) == pytest.approx(0.88)


def test_sparse_file_round_trips_and_evaluates(tmp_path):
    from distill.compress.prune.sparse_format import decode, save_sparse
    from distill.config.schema import DataConfig
    from distill.evaluation import evaluate_checkpoint
    from distill.models.registry import build_student

    student_cfg = {"name": "mlp", "hidden_sizes": [256], "dropout": 0.0}
    data_cfg = OmegaConf.to_container(OmegaConf.structured(DataConfig(name="digits")))
    model = build_student(OmegaConf.create(student_cfg), num_classes=10, channels=1, image_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_((torch.rand_like(p) > 0.7).float())  # 70 % zeros
    path = save_sparse(tmp_path / "student_sparse.pt", model.state_dict(), {"student": student_cfg, "data": data_cfg})
    payload = torch.load(path, weights_only=True)
    assert all(torch.equal(decode(payload["state"])[k], v) for k, v in model.state_dict().items())
    assert path.stat().st_size < 0.6 * sum(v.numel() * 4 for v in model.state_dict().values())
    cfg = OmegaConf.create({"ckpt_path": str(path), "data": None, "batch_size": None, "accelerator": "cpu"})
    result = evaluate_checkpoint(cfg, Console(file=io.StringIO()))
    assert result["kind"] == "fp32 (pruned, sparse file)" and result["size_bytes"] == path.stat().st_size
    # The file's student is the saved one: the same predictions as the model in memory.
    from distill.data.datamodules import build_datamodule
    from distill.measure.accuracy import accuracy_on_test_split

    assert result["test_acc"] == accuracy_on_test_split(model, build_datamodule(OmegaConf.create(data_cfg)))


def test_a_row_timed_on_another_device_than_the_run_says_so():
    """In a GPU run (latency timed on CUDA) the int8 model is timed on CPU: its row is marked."""
    qat = _qat()
    deployed = qat.deployed(STUDENT)
    assert deployed.latency_device == "cpu"
    summary = {"data": {"name": "digits"}, "teacher": None, "deployed": deployed.as_dict(),
               "student": {"arch": "cnn", "params": 94_186, "size_bytes": 385_127, "test_acc": 0.97, "latency_ms": 0.05,
                           "latency_ms_batch": 9.0, "latency_batch_size": 1024, "latency_device": "cuda"}}
    out = io.StringIO()
    print_comparison(summary, Console(file=out, width=220))
    text = out.getvalue()
    assert "latency b=1024 (ms, cuda)" in text
    [row] = [line for line in text.splitlines() if "student int8" in line]
    assert "20.000 (cpu)" in row
