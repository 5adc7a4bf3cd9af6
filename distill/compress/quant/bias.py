"""The int8 ONNX file's float-output Gemms given int32 biases, so that ONNX Runtime runs them in integers.

ONNX Runtime's CPU provider fuses ``DQ(x), DQ(w) -> Gemm -> Q`` into its integer ``QGemm`` and
quantizes the float bias itself on the way (``round(b / (s_x * s_w))``, int32). A Gemm whose output
is not quantized again, the classifier whose logits stay float (PT2E's X86 quantizer leaves a
linear's output unquantized), is fused into a float-output ``QGemm`` only when its bias already is
int32 codes behind a DequantizeLinear (onnxruntime 1.32, ``GemmNodeGroupSelector``: every input of
the Gemm must come from a DequantizeLinear); with a float bias it stays a float Gemm that
dequantizes the whole int8 weight on every call. Measured (``python bench/gemm_bias.py``; an AVX2
AMD EPYC, 2 threads; a 512 -> 1000 classifier alone, the shape of ResNet-18's; six runs):
0.21-0.59 ms -> 0.027-0.034 ms at batch 1, 2.7-3.3 -> 1.6-2.1 ms at batch 256.

:func:`quantize_gemm_biases` writes such a Gemm's bias as ONNX Runtime would for the Gemms it fuses:
``codes = round(b / s)`` with ``s = s_x * s_w`` (per output channel with per-channel weights), computed
in float32 and rounded half to even, as int32 behind a DequantizeLinear of scale ``s``. Its output
then differs from the float Gemm's by the bias's rounding (at most half of ``s`` per logit) and the
order of the float additions, for activation codes up to 127 (a QAT student's x86 range, inside its
learned ranges). Beyond them the classifier becomes like every other fused int8 layer: on an x86 CPU
without VNNI (AVX2), MLAS's u8 x s8 kernels add pairs of products in int16 (``vpmaddubsw``), which
saturates for codes above 127 against weights near +-127, where the float Gemm was exact. The run's
``acc_drop`` (the file against the integer model on the test split) measures it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.compress.quant.onnx_index import GraphIndex

_INT32 = 2**31 - 1


def quantize_gemm_biases(proto: Any) -> list[str]:
    """Give (in place) each Gemm of two dequantized inputs whose output stays float an int32 bias behind
    a DequantizeLinear; returns one line per Gemm (``"<node>: bias as int32 codes"``)."""
    import onnx  # deferred: only runs that export ONNX need it
    from onnx import helper, numpy_helper  # deferred

    graph = proto.graph
    index = GraphIndex.of(graph)
    producer, consumers, initializers = index.producer, index.consumers, index.initializers
    interface = {v.name for v in (*graph.input, *graph.output)}  # names a user feeds or reads: never removed
    done: list[str] = []
    for gemm in list(graph.node):
        if gemm.op_type != "Gemm" or len(gemm.input) < 3 or not gemm.input[2] or _requantized(gemm, consumers):
            continue  # no bias, or DQ -> Gemm -> Q: ONNX Runtime fuses that and quantizes its bias itself
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue  # QGemm's bias enters at beta 1, and the scales below assume an unscaled product
        x_dq, w_dq = producer.get(gemm.input[0]), producer.get(gemm.input[1])
        bias = initializers.get(gemm.input[2])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if bias is None or bias.data_type != onnx.TensorProto.FLOAT or len(consumers[bias.name]) != 1 or bias.name in interface:
            continue  # a computed bias, another dtype, or a bias another node (or the graph's interface) reads too
        x_scale, w_scale, weight = (initializers.get(name) for name in (x_dq.input[1], w_dq.input[1], w_dq.input[0]))
        if x_scale is None or w_scale is None or weight is None or len(weight.dims) != 2:
            continue
        if weight.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        sx, sw, b = (numpy_helper.to_array(t) for t in (x_scale, w_scale, bias))
        outputs = int(weight.dims[0] if attrs.get("transB", 0) else weight.dims[1])
        w_axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1) % 2  # ONNX allows -1 for the last axis
        per_channel = sw.size != 1
        if sx.size != 1 or sx.dtype != np.float32 or sw.dtype != np.float32 or b.shape != (outputs,):
            continue
        if per_channel and (sw.shape != (outputs,) or w_axis != (0 if attrs.get("transB", 0) else 1)):
            continue  # weight scales along the input axis: no single scale per output for the bias
        codes, scale = bias_codes(b, sx, sw)
        if codes is None:
            continue  # a zero scale or a bias beyond int32 codes: left float
        stem = f"{gemm.name or gemm.output[0]}_bias"
        graph.initializer.extend([numpy_helper.from_array(codes, f"{stem}_codes"), numpy_helper.from_array(scale, f"{stem}_scale")])
        dq = helper.make_node("DequantizeLinear", [f"{stem}_codes", f"{stem}_scale"], [f"{stem}_dq"], name=f"{stem}_dq",
                              **({"axis": 0} if per_channel else {}))
        graph.node.insert(list(graph.node).index(gemm), dq)
        gemm.input[2] = dq.output[0]
        graph.initializer.remove(bias)
        for info in [v for v in graph.value_info if v.name == bias.name]:
            graph.value_info.remove(info)  # the exporter records initializers' shapes too
        done.append(f"{gemm.name or gemm.output[0]}: bias as int32 codes")
    return done


def bias_codes(bias: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """A Gemm's float ``bias`` as int32 codes of scale ``x_scale * w_scale`` (``w_scale`` per tensor or one
    per output), as ONNX Runtime quantizes the bias of a Gemm it fuses: the scales multiplied and the
    bias divided in float32, rounded half to even. ``(None, scale)`` if a code is not finite or beyond int32."""
    w_scale = w_scale.reshape(()) if w_scale.size == 1 else w_scale  # a per-tensor scale: one scalar for the bias
    scale = (np.float32(x_scale.reshape(())) * w_scale.astype(np.float32)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.round(bias.astype(np.float32) / scale)
    if not np.all(np.isfinite(codes)) or np.abs(codes).max(initial=0) > _INT32:
        return None, scale
    return codes.astype(np.int32), scale


def _requantized(node: Any, consumers: dict[str, list[Any]]) -> bool:
    """``node``'s output read only by a QuantizeLinear, directly or through one Relu / Clip."""
    readers = consumers[node.output[0]]
    if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip"):
        readers = consumers[readers[0].output[0]]
    return len(readers) == 1 and readers[0].op_type == "QuantizeLinear"
