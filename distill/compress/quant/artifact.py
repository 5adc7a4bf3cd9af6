"""The quantized student on disk: integer weights packed at b bits, loadable back bit for bit.

PyTorch keeps quantized weights in int8 tensors whatever the bit width, so a 4-bit model saved
with ``torch.save`` is as large as an 8-bit one. This artifact stores each integer weight as a bit
stream of b-bit codes (``numpy.packbits``); the ``torch.save`` payload is then xz-compressed
(stdlib ``lzma``), which entropy-codes the codes (trained weights cluster near zero). Two formats:

- ``distill.quantized-program/1`` (:func:`save_quantized_program`; PT2E's integer model, or an FX
  student's QDQ form, distill/compress/quant/qdq.py, the same representation): the integer
  model as a ``torch.export`` program (quantize / dequantize ops, scales, zero points, float biases)
  whose int8 weight constants are stored zero (xz makes them nearly free) beside their packed codes.
  Loading is ``torch.export.load`` and the codes put back: no prepare / convert step of either flow
  (tested in a process where neither can be imported; the quantize ops' definitions are still
  torch.ao's, see distill/compress/quant/graph.py); the result equals the saved model exactly.
- ``distill.quantized-student/1`` (:func:`save_quantized`; an FX student with no QDQ form, and the
  files of earlier versions): the converted model's state dict, each quantized weight as codes plus float32 scales (and zero points when not all
  zero). Loading rebuilds the student from the config inside, prepares and converts it with FX
  the same way, and loads the unpacked state.

For bits = 8, and as a convenience for every b, :func:`save_torchscript` also writes a TorchScript
file that plain PyTorch runs without this package (``torch.jit.load``), at int8 storage size.
"""

from __future__ import annotations

import copy
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from distill.compress.packing import (
    pack_codes,
    read_xz_payload,
    torch_bytes,
    unpack_codes,
    xz_compress,
)
from distill.compress.quant.graph import IntegerGraph
from distill.errors import CheckpointError
from distill.models.registry import build_student
from distill.runtime.atomic import atomic_write

FORMAT = "distill.quantized-student/1"
PROGRAM_FORMAT = "distill.quantized-program/1"
FORMATS = (PROGRAM_FORMAT, FORMAT)


def _encode_qtensor(t: torch.Tensor, bits: int) -> dict[str, Any]:
    ints = t.int_repr()
    signed = t.dtype == torch.qint8
    narrow = -(2 ** (bits - 1)) + 1 if signed else 0  # the lowest code of the b-bit range
    low = min(int(ints.min()), narrow) if ints.numel() else narrow
    entry: dict[str, Any] = {
        "kind": "qtensor",
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "low": low,
        "packed": pack_codes(ints, bits, low),
    }
    if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales = t.q_per_channel_scales()
        zero_points = t.q_per_channel_zero_points()
        # Observers compute scales in float32, so storing them as float32 loses nothing (the
        # round-trip test checks it); symmetric weights have all-zero zero points: not stored.
        entry.update(
            qscheme="per_channel",
            axis=int(t.q_per_channel_axis()),
            scales=scales.float(),
            zero_points=None if not zero_points.any() else zero_points.to(torch.int32),
        )
    else:
        entry.update(qscheme="per_tensor", scale=float(t.q_scale()), zero_point=int(t.q_zero_point()))
    return entry


def _decode_qtensor(entry: dict[str, Any], bits: int) -> torch.Tensor:
    shape = entry["shape"]
    count = int(np.prod(shape)) if shape else 1
    dtype = getattr(torch, entry["dtype"])
    ints = unpack_codes(entry["packed"], bits, entry["low"], count).reshape(shape)
    ints = ints.to(torch.int8 if dtype == torch.qint8 else torch.uint8)
    # Rebuilt through the public quantize functions from the values the codes stand for (float32, as
    # they take): (code - zero point) * scale / scale is within 1e-7 relative of the code, so it
    # rounds back to it exactly (checked below).
    if entry["qscheme"] == "per_channel":
        scales = entry["scales"].double()
        zero_points = entry["zero_points"]
        zero_points = torch.zeros(scales.shape, dtype=torch.int64) if zero_points is None else zero_points.long()
        along = [-1 if d == entry["axis"] else 1 for d in range(ints.dim())]
        values = (ints.double() - zero_points.reshape(along)) * scales.reshape(along)
        tensor = torch.quantize_per_channel(values.float(), scales, zero_points, entry["axis"], dtype)
    else:
        values = (ints.double() - entry["zero_point"]) * entry["scale"]
        tensor = torch.quantize_per_tensor(values.float(), entry["scale"], entry["zero_point"], dtype)
    if not torch.equal(tensor.int_repr(), ints):
        raise CheckpointError("a quantized weight did not decode to its stored integer codes")
    return tensor


def _encode(value: Any, bits: int) -> Any:
    if isinstance(value, torch.Tensor) and value.is_quantized:
        return _encode_qtensor(value, bits)
    if isinstance(value, (tuple, list)):
        return {"kind": "sequence", "items": [_encode(v, bits) for v in value]}
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "name": str(value).removeprefix("torch.")}
    return value


def _decode(value: Any, bits: int) -> Any:
    if isinstance(value, dict) and value.get("kind") == "qtensor":
        return _decode_qtensor(value, bits)
    if isinstance(value, dict) and value.get("kind") == "sequence":
        return tuple(_decode(v, bits) for v in value["items"])
    if isinstance(value, dict) and value.get("kind") == "dtype":
        return getattr(torch, value["name"])
    return value


def _to_blob(obj: Any, parts: list[bytes], offset: list[int]) -> Any:
    """Replace every tensor in ``obj`` by a reference into one byte blob (``parts``).

    One blob instead of one ``torch.save`` record per tensor: the per-record framing would
    otherwise cost several KB, a tenth of a small quantized student."""
    if isinstance(obj, torch.Tensor):
        array = obj.detach().cpu().contiguous().numpy()
        data = array.tobytes()
        ref = {"kind": "array", "dtype": array.dtype.str, "shape": list(array.shape), "offset": offset[0], "nbytes": len(data)}
        parts.append(data)
        offset[0] += len(data)
        return ref
    if isinstance(obj, dict):
        return {k: _to_blob(v, parts, offset) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_blob(v, parts, offset) for v in obj]
    return obj


def _from_blob(obj: Any, blob: bytes) -> Any:
    if isinstance(obj, dict) and obj.get("kind") == "array":
        start = obj["offset"]
        array = np.frombuffer(blob[start : start + obj["nbytes"]], dtype=np.dtype(obj["dtype"]))
        return torch.from_numpy(array.copy()).reshape(obj["shape"])
    if isinstance(obj, dict):
        return {k: _from_blob(v, blob) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_blob(v, blob) for v in obj]
    return obj


def save_quantized(
    path: str | Path, model: nn.Module, *, bits: int, backend: str, per_channel: bool,
    student_cfg: dict[str, Any], shape: dict[str, int], data_cfg: dict[str, Any] | None = None,
) -> Path:
    """Write the converted ``model`` with its weights packed at ``bits`` bits (atomically)."""
    full_state = model.state_dict()
    state = {k: _encode(v, bits) for k, v in full_state.items()}
    # Quantized modules read their format version from the state dict's metadata when loading.
    metadata = {k: dict(v) for k, v in getattr(full_state, "_metadata", {}).items()}
    parts: list[bytes] = []
    state = _to_blob(state, parts, [0])
    payload = {
        "format": FORMAT, "bits": bits, "backend": backend, "per_channel": per_channel,
        "student": student_cfg, "shape": shape, "data": data_cfg, "state": state, "metadata": metadata,
        "blob": torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8),
    }
    # The integer codes are not uniformly distributed (trained weights cluster around zero), so an
    # entropy coder shrinks them further, as Deep Compression's Huffman stage does (Han et al. 2016).
    data = xz_compress(torch_bytes(payload))
    return atomic_write(path, lambda fh: fh.write(data))


def save_quantized_program(
    path: str | Path, model: IntegerGraph, example: torch.Tensor, *, bits: int, backend: str, per_channel: bool,
    student_cfg: dict[str, Any], shape: dict[str, int], data_cfg: dict[str, Any] | None = None,
) -> Path:
    """Write an integer ``model`` (a quantize / dequantize graph with int8 weights) as a program with
    its int8 weights packed at ``bits`` bits (atomically); ``example``: an input batch (of 2 or more: the batch axis stays dynamic)."""
    graph = copy.deepcopy(model.graph_module)
    codes: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, tensor in graph.named_buffers():
            if tensor.dtype != torch.int8:
                continue
            narrow = -(2 ** (bits - 1)) + 1  # the lowest code of the b-bit range
            low = min(int(tensor.min()), narrow) if tensor.numel() else narrow
            codes[name] = {"shape": list(tensor.shape), "low": low, "packed": pack_codes(tensor, bits, low)}
            tensor.zero_()  # the program keeps the constant's place; its codes are stored packed
    program = torch.export.export(graph, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    payload = {
        "format": PROGRAM_FORMAT, "bits": bits, "backend": backend, "per_channel": per_channel,
        "student": student_cfg, "shape": shape, "data": data_cfg, "codes": codes,
        "program": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8),
    }
    data = xz_compress(torch_bytes(payload))
    return atomic_write(path, lambda fh: fh.write(data))


def _load_program(path: str | Path, payload: dict[str, Any]) -> IntegerGraph:
    missing = [k for k in ("program", "codes", "bits") if k not in payload]
    if missing:
        raise CheckpointError(f"quantized student {path} is incomplete: no {', '.join(missing)}")
    try:
        graph = torch.export.load(io.BytesIO(payload["program"].numpy().tobytes())).module()
    except Exception as err:  # noqa: BLE001  (torch.export's deserialisation errors have no common type)
        raise CheckpointError(f"quantized student {path}: its program does not load ({type(err).__name__}: {err})") from err
    weights = {name for name, t in graph.named_buffers() if t.dtype == torch.int8}
    if weights != set(payload["codes"]):
        raise CheckpointError(f"quantized student {path}: its program's int8 weights {sorted(weights)[:4]} are not "
                              f"those it stores codes of {sorted(payload['codes'])[:4]}")
    with torch.no_grad():
        for name, entry in payload["codes"].items():
            try:
                target = graph.get_buffer(name)
            except AttributeError as err:
                raise CheckpointError(f"quantized student {path}: its program has no weight {name!r}") from err
            count = int(np.prod(entry["shape"])) if entry["shape"] else 1
            try:
                values = unpack_codes(entry["packed"], payload["bits"], entry["low"], count).reshape(entry["shape"])
            except (KeyError, ValueError) as err:  # a truncated or edited entry
                raise CheckpointError(f"quantized student {path}: the codes of {name!r} are damaged ({err})") from err
            if tuple(target.shape) != tuple(values.shape):
                raise CheckpointError(f"quantized student {path}: weight {name!r} is {list(target.shape)} in its program, "
                                      f"{entry['shape']} in its codes")
            target.copy_(values.to(torch.int8))
    return IntegerGraph(graph).eval()


def load_quantized(path: str | Path, payload: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the quantized student saved by :func:`save_quantized_program` or :func:`save_quantized`
    (``payload``: the file's contents, when already read); returns (model, metadata)."""
    payload = payload if payload is not None else read_xz_payload(path, what="quantized student")
    if payload.get("format") not in FORMATS:
        raise CheckpointError(f"{path} is not a distill quantized student (expected format {' or '.join(FORMATS)})")
    if payload["format"] == PROGRAM_FORMAT:
        meta = {k: v for k, v in payload.items() if k not in ("program", "codes")}
        return _load_program(path, payload), meta
    # deferred: only this format re-runs FX's prepare / convert (the program format needs neither)
    from distill.compress.quant.backend import convert, prepare_qat

    shape = payload["shape"]
    student = build_student(OmegaConf.create(payload["student"]), **shape)
    example = torch.zeros(1, shape["channels"], shape["image_size"], shape["image_size"])
    model = convert(prepare_qat(student, payload["bits"], payload["per_channel"], example, payload["backend"], "fx"), payload["backend"])
    blob = payload["blob"].numpy().tobytes()
    state = OrderedDict((k, _decode(_from_blob(v, blob), payload["bits"])) for k, v in payload["state"].items())
    state._metadata = OrderedDict(payload.get("metadata") or {})  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"quantized student {path} does not match its own config: {err}") from err
    meta = {k: v for k, v in payload.items() if k not in ("state", "metadata", "blob")}
    return model.eval(), meta
