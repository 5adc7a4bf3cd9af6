"""The int8 ONNX file's first convolutions given a multiple of 4 input channels, for ONNX Runtime's int8 kernels.

ONNX Runtime runs an int8 convolution (``DQ -> Conv -> Q``, int8 weights of zero point 0) with its
fast kernels (MLAS's symmetric "indirect" convolution, VNNI / AVX2 / NEON dot products over groups
of 4 input channels) only when the input channels are a multiple of 4 and the output channels at
least 16 and a multiple of 8 (``MlasConvSymPackWSize`` in onnxruntime/core/mlas/lib/convsym.cpp);
any other conv falls back to im2col and a general integer GEMM. A model's first conv reads the
image: 1 channel (grayscale) or 3 (RGB), never a multiple of 4. The digits cnn's first conv (1 -> 32
channels) took 2.1-3.5 ms of the int8 file's 6.5-8.7 ms at batch 1024, no faster than in fp32;
with 4 input channels it takes 0.7-0.9 ms (ONNX Runtime's profiler, this machine, 2 threads).

:func:`align_input_channels` pads such a conv: its int8 weight gains zero input channels up to the
next multiple of 4 (the per-output-channel scales are unchanged), and its float input is widened
before its QuantizeLinear by ``Transpose`` (to channels-last) -> ``MatMul`` with ``[I | 0]`` ->
``Transpose`` (back). The added channels meet zero weights, so for finite inputs every output is
the same bit for bit (tested; an inf or NaN in one of several real channels spreads through the
``MatMul`` to the others, where the exporter's graph kept it in its own channel). On an x86 CPU
without VNNI (AVX2) that holds for input codes up to 127 (a QAT student's x86 range) or weights
within +-64: MLAS's u8 x s8 kernels, the fast conv and the generic GEMM alike, add pairs of products
in int16 (``vpmaddubsw``), which saturates for codes above 127 against weights near +-127. The two
paths pair different products (the generic one neighbouring taps, the padded one channels, a real
one with a zero when there is one real channel), so they saturate in different places.

A ``MatMul`` rather than a ``Pad``: ONNX Runtime runs its int8 convs channels-last and cancels the
closing Transpose against its own, while a ``Pad`` of the channel axis leaves a transpose of the
widened tensor (0.9-2 ms here) and one of the last axis is slow (1.7 ms).

Only convs whose input is a graph input (through Q -> DQ) are padded: a conv deeper in the network
reads another layer's output, whose own output channels would have to grow instead (not done);
:func:`generic_int8_convs` names the convs left on the generic path. The rewrite is measured for
ONNX Runtime's CPU provider at its default optimization level (ORT_ENABLE_ALL, whose channels-last
pass cancels the transposes); other runtimes and providers get an equivalent graph, not timed here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.compress.quant.onnx_index import GraphIndex

MULTIPLE = 4  # MLAS's int8 conv kernels take input channels in groups of 4


def align_input_channels(proto: Any, multiple: int = MULTIPLE) -> list[str]:
    """Pad (in place) the input channels of each int8 conv that reads a graph input to a multiple of
    ``multiple``; returns one line per padded conv (``"<node>: input channels 1 -> 4"``)."""
    import onnx  # deferred: only runs that export ONNX need it
    from onnx import helper, numpy_helper  # deferred

    graph = proto.graph
    index = GraphIndex.of(graph)
    producer, consumers, initializers = index.producer, index.consumers, index.initializers
    inputs = {i.name: i for i in graph.input}
    done: list[str] = []
    for conv in list(graph.node):
        if conv.op_type != "Conv" or any(a.name == "group" and a.i != 1 for a in conv.attribute):
            continue
        x_dq, w_dq = producer.get(conv.input[0]), producer.get(conv.input[1])
        x_q = producer.get(x_dq.input[0]) if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
        if x_q is None or x_q.op_type != "QuantizeLinear" or x_q.input[0] not in inputs:
            continue
        if consumers[x_q.output[0]] != [x_dq] or consumers[x_dq.output[0]] != [conv]:
            continue  # the quantized input is read elsewhere too: widening it would change that reader
        scale = initializers.get(x_q.input[1])
        if scale is None or numpy_helper.to_array(scale).size != 1:
            continue  # a per-channel activation scale would need widening too
        weight = _int8_weight(conv, producer, initializers)
        if weight is None or len(consumers[weight.name]) != 1 or consumers[w_dq.output[0]] != [conv]:
            continue  # no symmetric int8 weight of its own: not the kernels this is for, or a tied weight
        source = inputs[x_q.input[0]]
        if source.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(source.type.tensor_type.shape.dim) != 4:
            continue
        w = numpy_helper.to_array(weight)
        cout, cin = int(w.shape[0]), int(w.shape[1])
        wide = -(-cin // multiple) * multiple
        if wide == cin or not _fast_outputs(cout):
            continue  # already aligned, or too few output channels for those kernels to apply
        padded = np.zeros((cout, wide, *w.shape[2:]), dtype=w.dtype)
        padded[:, :cin] = w
        weight.CopyFrom(numpy_helper.from_array(padded, weight.name))
        spread = np.zeros((cin, wide), dtype=np.float32)
        spread[np.arange(cin), np.arange(cin)] = 1.0
        stem = f"{conv.name or conv.output[0]}_align"
        graph.initializer.append(numpy_helper.from_array(spread, f"{stem}_spread"))
        nodes = [
            helper.make_node("Transpose", [source.name], [f"{stem}_nhwc"], name=f"{stem}_nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("MatMul", [f"{stem}_nhwc", f"{stem}_spread"], [f"{stem}_wide_nhwc"], name=f"{stem}_widen"),
            helper.make_node("Transpose", [f"{stem}_wide_nhwc"], [f"{stem}_wide"], name=f"{stem}_nchw", perm=[0, 3, 1, 2]),
        ]
        x_q.input[0] = f"{stem}_wide"
        at = list(graph.node).index(x_q)
        for offset, node in enumerate(nodes):
            graph.node.insert(at + offset, node)
        stale = {weight.name, x_q.output[0], x_dq.output[0], w_dq.output[0]}  # their channel count changed
        for info in [v for v in graph.value_info if v.name in stale]:
            graph.value_info.remove(info)
        done.append(f"{conv.name or conv.output[0]}: input channels {cin} -> {wide}")
    return done


def generic_int8_convs(proto: Any, multiple: int = MULTIPLE) -> list[str]:
    """The int8 convs (symmetric int8 weights, ungrouped) ONNX Runtime cannot run on its fast kernels:
    ``"<node> (<in> -> <out> channels)"`` each (e.g. after structured pruning left 45 channels)."""
    from onnx import numpy_helper  # deferred

    graph = proto.graph
    index = GraphIndex.of(graph)
    producer, initializers = index.producer, index.initializers
    slow = []
    for conv in graph.node:
        if conv.op_type != "Conv" or any(a.name == "group" and a.i != 1 for a in conv.attribute):
            continue
        weight = _int8_weight(conv, producer, initializers)
        if weight is not None:
            cout, cin = numpy_helper.to_array(weight).shape[:2]
            if cin % multiple or not _fast_outputs(int(cout)):
                slow.append(f"{conv.name or conv.output[0]} ({cin} -> {cout} channels)")
    return slow


def _fast_outputs(cout: int) -> bool:
    return cout >= 16 and cout % 8 == 0


def _int8_weight(conv: Any, producer: dict[str, Any], initializers: dict[str, Any]) -> Any:
    """The int8 initializer behind ``conv``'s weight DequantizeLinear when its zero points are 0 and
    its scales per tensor or per output channel (axis 0); None otherwise."""
    import onnx  # deferred
    from onnx import numpy_helper  # deferred

    w_dq = producer.get(conv.input[1])
    if w_dq is None or w_dq.op_type != "DequantizeLinear":
        return None
    weight = initializers.get(w_dq.input[0])
    scale = initializers.get(w_dq.input[1])
    if weight is None or scale is None or weight.data_type != onnx.TensorProto.INT8:
        return None
    axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
    size = numpy_helper.to_array(scale).size
    if size != 1 and not (axis == 0 and size == weight.dims[0]):
        return None  # scales along another axis would have to grow with the padding
    zero_point = initializers.get(w_dq.input[2]) if len(w_dq.input) > 2 else None
    if zero_point is not None and np.any(numpy_helper.to_array(zero_point)):
        return None  # asymmetric weights: not the symmetric kernels
    return weight
