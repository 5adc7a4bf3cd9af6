"""An int8 ONNX file's activation codes clamped to the range its integer model keeps (not done on export).

A QAT student on x86 quantizes its 8-bit activations to 0..127 (:func:`backend.activation_range`);
the exporter writes a QuantizeLinear that saturates at 255, so an activation beyond the learned
range gets a code PyTorch's integer model would have clamped at 127. The shipped file keeps that
(see :func:`distill.compress.quant.qdq._clamp_activations` for why: the clamp costs ONNX Runtime its
channels-last layout). :func:`clamp_activation_codes` adds the clamp, a ``Clip`` on the codes after
each QuantizeLinear, for what needs the integer model's exact semantics: ``bench/clamp.py`` times
it, and the slow tier checks with it that a multi-process run's int8 file is the tested model.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def clamp_activation_codes(proto: Any, high: int = 127) -> list[str]:
    """Clip (in place) the uint8 codes of every QuantizeLinear to 0..``high``; one line per clamp."""
    import onnx  # deferred: only ONNX files need it
    from onnx import helper, numpy_helper  # deferred

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    low_name, high_name = "distill_clamp_low", f"distill_clamp_high_{high}"
    quantizes = [node for node in graph.node if node.op_type == "QuantizeLinear" and len(node.input) > 2
                 and node.input[2] in inits and inits[node.input[2]].data_type == onnx.TensorProto.UINT8]
    if quantizes:  # not a signed or computed zero point: uint8 activation codes
        graph.initializer.extend([numpy_helper.from_array(np.array(0, np.uint8), low_name),
                                  numpy_helper.from_array(np.array(high, np.uint8), high_name)])
    done = []
    for node in quantizes:
        codes = node.output[0]
        node.output[0] = f"{codes}_unclamped"
        clip = helper.make_node("Clip", [node.output[0], low_name, high_name], [codes], name=f"{codes}_clamp")
        graph.node.insert(list(graph.node).index(node) + 1, clip)
        done.append(f"{node.name or codes}: codes clamped to 0..{high}")
    return done
