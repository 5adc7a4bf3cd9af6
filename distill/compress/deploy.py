"""Artifacts that run outside PyTorch's eager mode, each measured from its file (``export.formats``).

- ``onnx``: ``student.onnx`` through ``torch.onnx.export(dynamo=True)`` (the maintained exporter,
  on ``torch.export``), a dynamic batch axis, checked with ``onnx.checker``; with ``export.dtype=fp16``
  also ``student_fp16.onnx``, and in a ``quant.bits`` run also ``student_int8.onnx``: QuantizeLinear /
  DequantizeLinear nodes with the scales and zero points QAT learned, int8 weights per channel
  (distill/compress/quant/qdq.py), which ONNX Runtime runs as integer kernels (QLinearConv, QGemm).
  Run in ONNX Runtime (the CPU execution provider, its intra-op threads fixed to the run's latency
  threads; the CUDA provider first when the run is on a GPU and onnxruntime-gpu is installed).
- ``onnx_fp16`` / ``onnx_int8``: only that file (``onnx_fp16`` also in a QAT run: the trained fp32
  weights in half precision; ``onnx_int8`` needs ``quant.bits``).
- ``torch_export``: ``student.pt2`` (``torch.export.save``): ``torch.export.load(path).module()``
  runs it with no import of this package.

Each file is written atomically, then loaded back and measured as a user would run it: test
accuracy over the whole test split (or its first ``export.eval_samples``), size in bytes, latency at batch 1 and at the latency batch
(interleaved with the PyTorch model, so a burst of load on a shared machine lands on none alone).
A format that fails (an operator with no ONNX mapping, a model ``torch.export`` cannot trace) does
not lose the run: its record names the exporter's first error line, and the other formats are
still written (``export.strict=true`` makes it fatal). An artifact whose accuracy differs from the
PyTorch model's by more than ``export.max_acc_drop`` points is flagged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.compress.quant.bias import quantize_gemm_biases
from distill.compress.quant.channels import align_input_channels, generic_int8_convs
from distill.compress.technique import QuantizedDeployable
from distill.errors import ConfigError, first_line
from distill.measure import latency
from distill.measure.accuracy import loader_accuracy

log = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx_fp16", "onnx_int8", "torch_export")
ONNX_OPSET = 18  # ONNX Runtime >= 1.14 runs every opset-18 operator; the dynamo exporter's default


@dataclass(frozen=True)
class ExportedArtifact:
    """One deployable file and what it does in its runtime (``error``: why it is missing)."""

    format: str  # pytorch | pytorch_int8 (the references) | onnx | onnx_fp16 | onnx_int8 | torch_export
    path: str | None
    runtime: str  # onnxruntime (<provider>) | torch.export
    acc: float | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    latency_ms_batch: float | None = None
    latency_threads: int | None = None
    bits: int | None = None  # of the weights: 32, 16, or the QAT bits of the int8 file (its codes fit in int8)
    latency_device: str | None = None  # cpu | cuda (ONNX Runtime's CUDA provider: inputs and outputs on the host)
    opset: int | None = None
    acc_drop: float | None = None  # the PyTorch reference's accuracy minus the artifact's, in points (int8: the integer model's)
    flagged: bool = False  # acc_drop > export.max_acc_drop
    test_samples: int | None = None  # the test samples its accuracy is measured on (export.eval_samples)
    whole_split: bool = True  # False: on the first export.eval_samples only (not comparable with the run's own accuracy)
    rewrites: tuple[str, ...] = ()  # graph changes beyond the exporter's (export.align_int8_channels, export.int32_biases)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_export(cfg: Any) -> None:
    """``export.formats``: known names, no repeats, int8 only for a quantized run (a named error
    before training)."""
    formats = list(cfg.export.get("formats") or [])
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"export.formats: unknown format {unknown[0]!r}; choose from: {', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise ConfigError(f"export.formats={formats}: a format is listed twice")
    if "onnx_int8" in formats and cfg.quant.get("bits") is None:
        raise ConfigError("export.formats=[..., onnx_int8] needs quant.bits: the int8 file carries the scales and zero "
                          "points quantization-aware training learns (add quant.bits=8)")
    drop = cfg.export.get("max_acc_drop")
    if drop is None or not 0 <= float(drop) < float("inf"):
        raise ConfigError(f"export.max_acc_drop={drop!r} is out of range: must be >= 0 (accuracy points)")


class OnnxRuntimeModel(nn.Module):
    """An ONNX file in an ONNX Runtime session, called like a module (CPU tensors in and out), so the
    accuracy and latency code that measures PyTorch models measures it the same way."""

    def __init__(self, path: str | Path, threads: int, device: str = "cpu", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        import onnxruntime as ort  # deferred: only runs that export ONNX need it

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = ["CUDAExecutionProvider"] if device.startswith("cuda") and "CUDAExecutionProvider" in available else []
        self.session = ort.InferenceSession(str(path), options, providers=[*providers, "CPUExecutionProvider"])
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        # The input's element type from the file itself (float16 for student_fp16.onnx, however named).
        self.dtype = dtype or (torch.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().cpu().to(self.dtype).numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: feed})[0]).float()


class ProgramModel(nn.Module):
    """A ``torch.export`` file loaded as a user would (``torch.export.load(path).module()``), callable
    like a module. The program's module refuses ``eval()`` / ``train()`` (its mode is fixed at export):
    it is held outside the module tree, so the measuring code's ``.eval()`` does not reach it."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self._program = [torch.export.load(str(path)).module()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._program[0](x)


def _atomic_file(path: Path, write: Any) -> Path:
    """``write(tmp_path)`` then rename onto ``path``: a failed export leaves no half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")  # torch.export wants .pt2
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _batch_dim(example: torch.Tensor) -> tuple[dict[int, Any], ...]:
    return ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)


META_KEY = "distill"  # the run's student and data config (JSON): ONNX metadata_props, a .pt2's extra file distill.json
REWRITES_KEY = "distill.rewrites"  # what the export changed in the graph beyond the exporter's output (JSON list)


def save_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = ONNX_OPSET, meta: dict[str, Any] | None = None,
              align_channels: bool = False, int32_biases: bool = False) -> Path:
    """``model`` as ONNX with a dynamic batch axis (``input`` -> ``logits``), checked by ``onnx.checker``;
    ``meta`` (the run's student and data config) in the model's metadata, for ``evaluate.py``.
    The int8 file's rewrites for ONNX Runtime's integer kernels, each listed in the metadata
    (:func:`read_rewrites`): ``align_channels``, the first convs' input channels padded to a multiple of 4
    (:mod:`distill.compress.quant.channels`); ``int32_biases``, a float-output Gemm's bias as int32 codes
    (:mod:`distill.compress.quant.bias`)."""
    import onnx  # deferred: only runs that export ONNX need it

    for chatty in ("onnx_ir", "onnxscript"):  # an INFO line per deduplicated or unfolded constant otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)

    def write(tmp: Path) -> None:
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, dynamic_shapes=_batch_dim(example),
                                    input_names=["input"], output_names=["logits"], opset_version=opset, verbose=False)
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        # The exporter annotates every node with its FX node and Python stack trace (this machine's
        # paths): debug data, often larger than a small student's weights. The shipped file drops it.
        for node in proto.graph.node:
            del node.metadata_props[:]
        _global_average_pools(proto)
        props = {META_KEY: json.dumps(meta, default=str)} if meta is not None else {}
        rewrites: list[str] = []
        if align_channels:
            proto, rewrites = _aligned(proto, path.name)
        if int32_biases:
            proto, done = _rewritten(proto, path.name, quantize_gemm_biases, "the float-output Gemms' biases are not int32 codes")
            if done:
                log.info("%s: %s (ONNX Runtime fuses the Gemm into its integer QGemm instead of dequantizing its weight on "
                         "every call)", path.name, "; ".join(done))
            rewrites += done
        if rewrites:
            props[REWRITES_KEY] = json.dumps(rewrites)
        if props:
            onnx.helper.set_model_props(proto, props)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)

    return _atomic_file(path, write)


def _aligned(proto: Any, name: str) -> tuple[Any, list[str]]:
    """``proto`` with its first int8 convs' input channels padded (:func:`align_input_channels`), and
    what changed (:func:`_rewritten`: a padding that fails ships the graph as it was); the log names the
    int8 convs left on ONNX Runtime's generic path."""
    aligned, rewrites = _rewritten(proto, name, align_input_channels, "the first convs' input channels are not padded")
    if rewrites:
        log.info("%s: %s (zero weights: the same outputs; ONNX Runtime's int8 conv kernels take channels in fours)",
                 name, "; ".join(rewrites))
    slow = generic_int8_convs(aligned)
    if slow:
        log.info("%s: ONNX Runtime runs %s on its generic int8 path (its fast kernels need input channels in fours and "
                 "at least 16 output channels, a multiple of 8)", name, ", ".join(slow))
    return aligned, rewrites


def _rewritten(proto: Any, name: str, rewrite: Callable[[Any], list[str]], failed: str) -> tuple[Any, list[str]]:
    """``rewrite`` (changing a graph in place, returning what it changed) applied to a copy of ``proto``.
    A rewrite is only a speed-up: if it raises, or leaves a graph ``onnx.checker`` refuses, ``proto``
    ships as it was and a warning says ``failed`` and why."""
    import onnx  # deferred

    changed = copy.deepcopy(proto)
    try:
        done = rewrite(changed)
        if done:
            onnx.checker.check_model(changed, full_check=True)
    except Exception as err:  # noqa: BLE001  (onnx's checker and shape inference raise their own types)
        log.warning("%s: %s (%s); the graph is written without that change", name, failed, first_line(err))
        return proto, []
    return changed, done


def _global_average_pools(proto: Any) -> None:
    """Write a global average pool (``AdaptiveAvgPool2d(1)``, exported as ``ReduceMean`` over the two
    spatial axes of a 4-D tensor) as ONNX's ``GlobalAveragePool``: the same values, and the operator
    ONNX Runtime runs in int8 between DequantizeLinear and QuantizeLinear (QLinearGlobalAveragePool)
    and in its blocked fp32 layout, where a ``ReduceMean`` makes it convert the whole feature map back."""
    import onnx  # deferred
    from onnx import numpy_helper  # deferred

    constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.graph.value_info, *inferred.graph.input]}
    for node in proto.graph.node:
        if node.op_type != "ReduceMean" or len(node.input) != 2 or node.input[1] not in constants:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = sorted(int(a) % 4 for a in constants[node.input[1]].ravel())
        if ranks.get(node.input[0]) == 4 and axes == [2, 3] and attrs.get("keepdims", 1) == 1:
            node.op_type = "GlobalAveragePool"
            del node.input[1:]
            del node.attribute[:]
    used = {name for node in proto.graph.node for name in node.input}
    unused = [i for i in proto.graph.initializer if i.name not in used]  # the rewritten pools' axes
    for initializer in unused:
        proto.graph.initializer.remove(initializer)


def save_program(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any] | None = None) -> Path:
    """``model`` as a ``torch.export`` program (``torch.export.load(path).module()`` runs it), ``meta``
    in its extra file ``distill.json``."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=_batch_dim(example))
    extra = {f"{META_KEY}.json": json.dumps(meta, default=str)} if meta is not None else None
    return _atomic_file(path, lambda tmp: torch.export.save(program, str(tmp), extra_files=extra))


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The run config an exported file carries (None: a file without it, e.g. exported by hand)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx  # deferred

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[META_KEY]) if META_KEY in props else None
    extra = {f"{META_KEY}.json": ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[f"{META_KEY}.json"]) if extra[f"{META_KEY}.json"] else None


def read_rewrites(path: str | Path) -> tuple[str, ...]:
    """The graph rewrites an ONNX file's export made (:data:`REWRITES_KEY`; none for other files)."""
    path = Path(path)
    if path.suffix != ".onnx":
        return ()
    import onnx  # deferred

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return tuple(json.loads(props[REWRITES_KEY])) if REWRITES_KEY in props else ()


def exported_params(path: str | Path) -> int:
    """The parameter count stored in an exported file: its ONNX initializers' (weights, biases, scales
    and zero points; not int64 shapes), or the program's parameters and buffers."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx  # deferred
        from onnx import numpy_helper  # deferred

        # int64 initializers are shapes and axes, not weights
        return int(sum(a.size for i in onnx.load(str(path)).graph.initializer if (a := numpy_helper.to_array(i)).dtype != np.int64))
    program = torch.export.load(str(path))
    return int(sum(t.numel() for t in program.state_dict.values()))


def export_artifacts(model: nn.Module, formats: Iterable[str], out_dir: Path, test_loader: Iterable,
                     sample_shape: tuple[int, int, int], latency_batch: int, threads: int,
                     max_acc_drop: float, fp16: bool = False, device: str | None = "cpu", strict: bool = False,
                     name: str = "student", meta: dict[str, Any] | None = None,
                     quantized: QuantizedDeployable | None = None, eval_samples: int | None = None,
                     align_int8_channels: bool = True, int32_biases: bool = True) -> list[ExportedArtifact]:
    """Write ``model`` (an fp32 module) in each of ``formats``, load each file back and measure it.
    The first record is the PyTorch model itself (eager, ``format="pytorch"``), measured on the same
    split and timed interleaved with the files, the reference of every fp32 and fp16 ``acc_drop``.
    With ``quantized`` (a QAT run), ``onnx`` / ``onnx_int8`` also write ``<name>_int8.onnx`` (its QDQ
    form), whose reference is the integer model in PyTorch (``format="pytorch_int8"``, timed too).
    ``eval_samples``: every accuracy (references included) on the first N test samples only.
    ``align_int8_channels``: the int8 file's first convs padded to a multiple of 4 input channels
    (:mod:`distill.compress.quant.channels`); ``int32_biases``: its float-output Gemms' biases as int32
    codes (:mod:`distill.compress.quant.bias`); the record's ``rewrites`` say which."""
    model = model.cpu().eval()
    sampler = getattr(test_loader, "sampler", None)  # what the loader yields (a shard or subset included)
    samples = len(sampler) if sampler is not None else None  # type: ignore[arg-type]
    whole = True
    if eval_samples is not None:
        test_loader = _FirstSamples(test_loader, eval_samples)
        whole = samples is not None and samples <= eval_samples
        samples = eval_samples if samples is None else min(samples, eval_samples)
    example = torch.zeros(2, *sample_shape)  # batch 2: a batch of 1 would let the exporter specialise the axis
    formats = list(formats)
    loaded: dict[str, nn.Module] = {"pytorch": model}
    records: dict[str, ExportedArtifact] = {"pytorch": ExportedArtifact("pytorch", None, "pytorch (eager)", loader_accuracy(model, test_loader, "cpu"),
                                                                         latency_threads=threads, test_samples=samples, whole_split=whole)}
    jobs: list[tuple[str, Path, Any, str]] = []  # (format, file, writer, the reference it is compared with)
    if "onnx" in formats:
        jobs.append(("onnx", out_dir / f"{name}.onnx", lambda p: save_onnx(model, example, p, meta=meta), "pytorch"))
    if "onnx_fp16" in formats or ("onnx" in formats and fp16):
        half = _half_copy(model)
        jobs.append(("onnx_fp16", out_dir / f"{name}_fp16.onnx", lambda p: save_onnx(half, example.half(), p, meta=meta), "pytorch"))
    if quantized is None and "onnx_int8" in formats:
        jobs.append(("onnx_int8", out_dir / f"{name}_int8.onnx", _fail("no quantized student to export (quant.bits)"), "pytorch"))
    if quantized is not None and ("onnx" in formats or "onnx_int8" in formats):
        integer = quantized.integer.cpu().eval()
        # Accuracy from the integer model as converted; timed as PyTorch runs it fast (compiled for PT2E).
        loaded["pytorch_int8"] = quantized.runtime if quantized.runtime is not None else integer
        records["pytorch_int8"] = ExportedArtifact("pytorch_int8", None, f"pytorch ({quantized.engine})",
                                                   loader_accuracy(integer, test_loader, "cpu"), latency_threads=threads,
                                                   test_samples=samples, whole_split=whole)
        qdq, why = quantized.qdq, quantized.error or "no QDQ form of the quantized student"
        jobs.append(("onnx_int8", out_dir / f"{name}_int8.onnx",
                     (lambda p: save_onnx(qdq, example, p, meta=meta, align_channels=align_int8_channels,
                                                 int32_biases=int32_biases)) if qdq is not None else _fail(why), "pytorch_int8"))
    if "torch_export" in formats:
        jobs.append(("torch_export", out_dir / f"{name}.pt2", lambda p: save_program(model, example, p, meta=meta), "pytorch"))
    for fmt, path, write, reference in jobs:
        runtime = "torch.export" if fmt == "torch_export" else "onnxruntime"
        try:
            path.unlink(missing_ok=True)  # an earlier attempt's file never stands in for this run's
            write(path)
            if fmt == "torch_export":
                loaded[fmt] = ProgramModel(path)
            else:
                session = OnnxRuntimeModel(path, threads, device or "cpu")
                runtime = f"onnxruntime ({session.provider})"
                loaded[fmt] = session
            acc = loader_accuracy(loaded[fmt], test_loader, "cpu")
        except Exception as err:  # noqa: BLE001 (any exporter or runtime failure is recorded, not fatal)
            if strict:
                raise
            log.warning("export %s failed: %s (the other artifacts are still written; export.strict=true makes this fatal)",
                        fmt, first_line(err))
            loaded.pop(fmt, None)
            path.unlink(missing_ok=True)  # written but not loadable or measurable: not shipped
            records[fmt] = ExportedArtifact(fmt, None, runtime, error=first_line(err))
            continue
        ref = records[reference]
        drop = 100 * (float(ref.acc) - acc)
        bits = quantized.bits if fmt == "onnx_int8" and quantized is not None else 16 if fmt == "onnx_fp16" else 32
        records[fmt] = ExportedArtifact(fmt, str(path), runtime, acc, path.stat().st_size, opset=ONNX_OPSET if fmt != "torch_export" else None,
                                        acc_drop=drop, flagged=abs(drop) > max_acc_drop, latency_threads=threads, test_samples=samples,
                                        whole_split=whole, bits=bits, rewrites=read_rewrites(path))
        if records[fmt].flagged:
            log.warning("export %s: accuracy %.2f %% in %s, %.2f points from %s's (export.max_acc_drop=%g)",
                        fmt, 100 * acc, runtime, -drop, ref.runtime, max_acc_drop)
    if device is not None:
        timed = latency.measure_many(loaded, sample_shape, latency_batch, threads, rounds=3, device="cpu")
        for fmt, lat in timed.items():
            where = "cuda" if "CUDA" in records[fmt].runtime else "cpu"
            records[fmt] = ExportedArtifact(**{**records[fmt].as_dict(), "latency_ms": lat.ms, "latency_ms_batch": lat.ms_batch,
                                               "latency_device": where})
    references = [records[k] for k in ("pytorch", "pytorch_int8") if k in records]
    return [*references, *(records[fmt] for fmt, _, _, _ in jobs)]


class _FirstSamples:
    """The first ``limit`` samples of a loader's batches (the last batch cut), iterable again and again."""

    def __init__(self, loader: Iterable, limit: int) -> None:
        self.loader, self.limit = loader, limit

    def __iter__(self) -> Any:
        left = self.limit
        for x, y, *rest in self.loader:
            yield (x[:left], y[:left], *(r[:left] if isinstance(r, torch.Tensor) else r for r in rest))
            left -= len(y)
            if left <= 0:  # stop before the loader reads another batch
                return


def _fail(why: str) -> Any:
    def write(path: Path) -> None:
        raise RuntimeError(why)

    return write


def _half_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).half()
