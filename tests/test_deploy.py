"""Deployable files (export.formats): ONNX in ONNX Runtime and torch.export programs, written, loaded
back and measured from the file; failures recorded, not fatal; bad settings refused before training."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.checks import validate
from distill.compress.deploy import export_artifacts
from distill.errors import CheckpointError, ConfigError
from distill.evaluation import evaluate_checkpoint
from distill.pipeline import run

from .conftest import FAST


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 4, (40,), generator=g)), batch_size=16)


class DataDependent(nn.Module):
    """Control flow on a tensor's value: torch.export (and so the ONNX exporter) cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        if out.sum() > 0:
            return out
        return -out


def test_each_file_runs_in_its_runtime_as_the_model_does(tmp_path):
    model = _net()
    records = export_artifacts(model, ["onnx", "torch_export"], tmp_path, _loader(), (1, 8, 8), latency_batch=16, threads=1,
                               max_acc_drop=0.5, fp16=True)
    by = {r.format: r for r in records}
    assert list(by) == ["pytorch", "onnx", "onnx_fp16", "torch_export"]
    assert all(r.error is None and r.acc is not None and r.latency_ms and r.latency_ms_batch for r in records)
    assert by["onnx"].acc == by["pytorch"].acc == by["torch_export"].acc and not by["onnx"].flagged
    assert by["onnx"].opset == 18 and by["onnx"].runtime == "onnxruntime (CPUExecutionProvider)"
    assert by["onnx"].size_bytes == (tmp_path / "student.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "student.onnx"))
    # A dynamic batch axis: any batch size runs, with the PyTorch model's logits.
    session = ort.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    half = ort.InferenceSession(str(tmp_path / "student_fp16.onnx"), providers=["CPUExecutionProvider"])
    assert half.get_inputs()[0].type == "tensor(float16)"
    weights = [i for i in onnx.load(str(tmp_path / "student_fp16.onnx")).graph.initializer if len(i.dims) > 1]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    # The program loads and runs with plain torch: no import of this package.
    code = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); x = torch.load(sys.argv[2]); "
            "torch.save(m(x), sys.argv[3]); assert not any(k.startswith('distill') for k in sys.modules)")
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "student.pt2"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x).detach())


def test_a_failed_export_is_recorded_and_the_other_files_written(tmp_path):
    records = export_artifacts(DataDependent().eval(), ["onnx", "torch_export"], tmp_path, _loader(), (1, 8, 8), latency_batch=8,
                               threads=1, max_acc_drop=0.5, device=None)
    by = {r.format: r for r in records}
    assert by["torch_export"].error and by["torch_export"].path is None
    assert "\x1b" not in by["torch_export"].error and "step 1/3" not in by["torch_export"].error  # the cause, not the banner
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "student.pt2").exists()  # nothing half-written
    assert by["pytorch"].acc is not None
    with pytest.raises(Exception, match="(?i)data.dependent|guard|symbolic|Could not"):
        export_artifacts(DataDependent().eval(), ["torch_export"], tmp_path, _loader(), (1, 8, 8), latency_batch=8, threads=1,
                         max_acc_drop=0.5, device=None, strict=True)


def test_an_accuracy_off_by_more_than_the_limit_is_flagged(tmp_path, monkeypatch):
    from distill.compress import deploy

    faithful = deploy.OnnxRuntimeModel.forward
    [_, same] = export_artifacts(_net(), ["onnx"], tmp_path, _loader(), (1, 8, 8), latency_batch=8, threads=1,
                                 max_acc_drop=0.5, device=None)
    assert not same.flagged and same.acc_drop == 0.0 and same.latency_ms is None
    monkeypatch.setattr(deploy.OnnxRuntimeModel, "forward", lambda self, x: -faithful(self, x))  # a runtime that disagrees
    [reference, off] = export_artifacts(_net(), ["onnx"], tmp_path, _loader(), (1, 8, 8), latency_batch=8, threads=1,
                                        max_acc_drop=0.5, device=None)
    assert off.flagged and off.acc_drop == pytest.approx(100 * (reference.acc - off.acc)) and abs(off.acc_drop) > 0.5


@pytest.mark.parametrize(("overrides", "message"), [
    (["export.formats=[onnx,tflite]"], r"export.formats: unknown format 'tflite'; choose from: onnx, onnx_fp16, onnx_int8, torch_export"),
    (["export.formats=[onnx_int8]"], r"export.formats=\[..., onnx_int8\] needs quant.bits"),
    (["export.formats=[onnx,onnx]"], r"listed twice"),
    (["export.max_acc_drop=-1"], r"export.max_acc_drop=-1(.0)? is out of range"),
    (["export.eval_samples=0"], r"export.eval_samples.*null or an integer >= 1"),
])
def test_bad_export_settings_are_refused_before_training(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*FAST, *overrides))


@pytest.mark.integration
def test_a_run_writes_and_measures_its_files(make_cfg, capsys):
    summary = run(make_cfg(*FAST, "loss.alpha=0", "export.formats=[onnx,torch_export]", "export.dtype=fp16"))
    formats = {a["format"]: a for a in summary["artifacts"]}
    assert list(formats) == ["pytorch", "onnx", "onnx_fp16", "torch_export"]
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "student.onnx").exists() and (run_dir / "student.pt2").exists()
    assert formats["onnx"]["acc"] == pytest.approx(formats["pytorch"]["acc"], abs=0.005)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["artifacts"][1]["path"] == str(run_dir / "student.onnx")
    assert "file onnx" in capsys.readouterr().out
    # evaluate.py ckpt_path=<file>: the file alone, with the data config it carries
    for name, fmt, kind in (("student.onnx", "onnx", "onnx (CPUExecutionProvider)"), ("student.pt2", "torch_export", "torch.export"),
                            ("student_fp16.onnx", "onnx_fp16", "onnx (CPUExecutionProvider)")):
        cfg = OmegaConf.create({"ckpt_path": str(run_dir / name), "data": None, "batch_size": None, "accelerator": "cpu"})
        result = evaluate_checkpoint(cfg, Console(file=io.StringIO()))
        assert result["kind"] == kind and result["data"] == "digits" and result["student"] == "mlp"
        assert result["test_acc"] == pytest.approx(formats[fmt]["acc"], abs=1e-9)
        assert result["size_bytes"] == formats[fmt]["size_bytes"] and result["params"] > 0


@pytest.mark.integration
def test_a_quantized_run_writes_its_int8_file_with_the_learned_scales(make_cfg):
    summary = run(make_cfg(*FAST, "quant.bits=8", "export.formats=[onnx,onnx_fp16,torch_export]"))
    formats = {a["format"]: a for a in summary["artifacts"]}
    assert list(formats) == ["pytorch", "pytorch_int8", "onnx", "onnx_fp16", "onnx_int8", "torch_export"]
    assert not any(a["error"] for a in formats.values())
    run_dir = Path(summary["run_dir"])
    # the reference of the int8 file is the integer model the QAT report measured; of the fp32 files, its weights
    assert formats["pytorch_int8"]["acc"] == pytest.approx(summary["student"]["acc_quant"], abs=1e-9)
    assert formats["pytorch"]["acc"] == pytest.approx(summary["student"]["acc_fp32"], abs=0.01)
    graph = onnx.load(str(run_dir / "student_int8.onnx")).graph
    assert "QuantizeLinear" in {n.op_type for n in graph.node}
    assert formats["onnx_int8"]["size_bytes"] < 0.5 * formats["onnx"]["size_bytes"]
    assert formats["onnx_int8"]["bits"] == 8 and formats["onnx"]["bits"] == 32
    for name, fmt in (("student_int8.onnx", "onnx_int8"), ("student.onnx", "onnx"), ("student_fp16.onnx", "onnx_fp16"),
                      ("student.pt2", "torch_export")):
        cfg = OmegaConf.create({"ckpt_path": str(run_dir / name), "data": None, "batch_size": None, "accelerator": "cpu"})
        result = evaluate_checkpoint(cfg, Console(file=io.StringIO()))
        assert result["test_acc"] == pytest.approx(formats[fmt]["acc"], abs=1e-9)


@pytest.mark.integration
def test_a_quantized_student_with_no_qdq_form_loses_no_run_unless_strict(make_cfg, monkeypatch):
    from distill.compress.quant import callback

    def no_form(*args, **kwargs):
        raise NotImplementedError("Conv3d (features.0) has no QDQ export here")

    monkeypatch.setattr(callback, "qdq_models", no_form)
    summary = run(make_cfg(*FAST, "quant.bits=8", "export.formats=[onnx,torch_export]"))
    assert summary["student"]["acc_quant"] > 0  # the QAT report and the TorchScript int8 artifact stand
    errors = {a["format"]: a["error"] for a in summary["artifacts"]}
    assert set(errors) == {"onnx", "torch_export"} and all("Conv3d (features.0)" in e for e in errors.values())
    assert not list(Path(summary["run_dir"]).glob("student*.onnx")) and not list(Path(summary["run_dir"]).glob("*.pt2"))
    with pytest.raises(RuntimeError, match="export.strict=true: .* Conv3d"):
        run(make_cfg(*FAST, "quant.bits=8", "export.formats=[onnx]", "export.strict=true"))


def test_a_file_without_the_run_config_or_not_a_model_is_a_named_error(tmp_path):
    from distill.compress.deploy import save_onnx

    save_onnx(_net(), torch.zeros(2, 1, 8, 8), tmp_path / "bare.onnx")  # no meta: exported by hand
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    for name, message in (("bare.onnx", "carries no distill run config"), ("junk.pt2", "cannot read it as an exported model")):
        cfg = OmegaConf.create({"ckpt_path": str(tmp_path / name), "data": None, "batch_size": None, "accelerator": "cpu"})
        with pytest.raises(CheckpointError, match=message):
            evaluate_checkpoint(cfg, Console(file=io.StringIO()))


class MeanOverChannels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3), keepdim=True).flatten(1), x.mean(dim=1).flatten(1)], dim=1)


def test_the_onnx_file_writes_spatial_means_as_global_pools_and_no_debug_data(tmp_path):
    from distill.compress.deploy import save_onnx

    model = MeanOverChannels()
    path = save_onnx(model, torch.zeros(2, 3, 4, 4), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GlobalAveragePool") == 1 and ops.count("ReduceMean") == 1  # the mean over channels stays
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces with this machine's paths
    used = {name for n in proto.graph.node for name in n.input}
    assert all(i.name in used for i in proto.graph.initializer)
    x = torch.randn(5, 3, 4, 4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-6)


def test_eval_samples_limits_every_accuracy_to_the_first_samples(tmp_path):
    model = _net()
    loader = _loader()  # 40 samples in batches of 16
    first = DataLoader(TensorDataset(*(t[:20] for t in loader.dataset.tensors)), batch_size=16)
    [whole, _] = export_artifacts(model, ["onnx"], tmp_path, loader, (1, 8, 8), latency_batch=8, threads=1, max_acc_drop=0.5, device=None)
    [cut, onnx_cut] = export_artifacts(model, ["onnx"], tmp_path, loader, (1, 8, 8), latency_batch=8, threads=1, max_acc_drop=0.5,
                                       device=None, eval_samples=20)
    from distill.measure.accuracy import loader_accuracy

    assert (whole.test_samples, cut.test_samples, onnx_cut.test_samples) == (40, 20, 20)
    assert whole.whole_split and not cut.whole_split and not onnx_cut.whole_split
    assert cut.acc == pytest.approx(loader_accuracy(model, first)) and onnx_cut.acc == pytest.approx(cut.acc)
