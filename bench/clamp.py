"""What clamping the int8 file's activation codes at 127 (the x86 7-bit range PyTorch's integer model
keeps) would cost in ONNX Runtime: a run's student_int8.onnx against the same graph with a ``Clip`` to
0..127 after each QuantizeLinear (distill/compress/quant/clamp.py; the file is not written that way,
README), timed interleaved.

    python bench/clamp.py RUN_DIR [RUN_DIR ...]     # a quant.bits=8 run's directory each

Prints ms per call at batch 1 and 1024, median of 7 interleaved rounds, 2 threads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx_timing import interleaved_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.compress.quant.clamp import clamp_activation_codes  # noqa: E402  (after the path)

THREADS = 2


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        path = run / "student_int8.onnx"
        clamped = onnx.load(str(path))
        clamp_activation_codes(clamped)
        sessions = {"as written": ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                    "clamped at 127": ort.InferenceSession(clamped.SerializeToString(), options, providers=["CPUExecutionProvider"])}
        shape = [d.dim_value for d in clamped.graph.input[0].type.tensor_type.shape.dim[1:]]
        for batch, calls in ((1, 2000), (1024, 20)):
            x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
            ms = interleaved_ms(sessions, x, calls)
            print(f"{run}: batch {batch}: " + ", ".join(f"{name} {v:.4f} ms" for name, v in ms.items())
                  + f" (clamping costs {100 * (ms['clamped at 127'] / ms['as written'] - 1):+.0f} %)")


if __name__ == "__main__":
    main()
