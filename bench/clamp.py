"""What clamping the int8 file's activation codes at 127 (the x86 7-bit range PyTorch's integer model
keeps) would cost in ONNX Runtime: a run's student_int8.onnx against the same graph with a ``Clip`` to
0..127 after each QuantizeLinear, timed interleaved (the file is not written that way; README).

    python bench/clamp.py RUN_DIR [RUN_DIR ...]     # a quant.bits run's directory each

Prints ms per call at batch 1 and 1024, median of 7 interleaved rounds, 2 threads.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

THREADS, ROUNDS = 2, 7


def clamped(path: Path) -> onnx.ModelProto:
    proto = onnx.load(str(path))
    graph = proto.graph
    graph.initializer.extend([numpy_helper.from_array(np.array(0, np.uint8), "clamp_low"),
                              numpy_helper.from_array(np.array(127, np.uint8), "clamp_high")])
    for node in list(graph.node):
        if node.op_type == "QuantizeLinear":
            codes = node.output[0]
            node.output[0] = f"{codes}_unclamped"
            clip = helper.make_node("Clip", [node.output[0], "clamp_low", "clamp_high"], [codes], name=f"{codes}_clamp")
            graph.node.insert(list(graph.node).index(node) + 1, clip)
    return proto


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        path = run / "student_int8.onnx"
        sessions = {"as written": ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                    "clamped at 127": ort.InferenceSession(clamped(path).SerializeToString(), options, providers=["CPUExecutionProvider"])}
        shape = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1:]]
        for batch, calls in ((1, 2000), (1024, 20)):
            x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(ROUNDS):
                for name, session in sessions.items():
                    session.run(None, {"input": x})
                    start = time.perf_counter()
                    for _ in range(calls):
                        session.run(None, {"input": x})
                    times[name].append((time.perf_counter() - start) / calls * 1e3)
            ms = {name: statistics.median(t) for name, t in times.items()}
            print(f"{run}: batch {batch}: " + ", ".join(f"{name} {v:.4f} ms" for name, v in ms.items())
                  + f" (clamping costs {100 * (ms['clamped at 127'] / ms['as written'] - 1):+.0f} %)")


if __name__ == "__main__":
    main()
