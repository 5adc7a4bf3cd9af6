"""The first conv's input channels padded to 4 (export.align_int8_channels, distill/compress/quant/channels.py)
against the exporter's 1-channel int8 conv in ONNX Runtime: a hand-built QDQ conv of 1 -> 32 channels
on 8 x 8 images (the digits cnn's first layer), timed interleaved.

    python bench/padding.py          # ms per call at batch 1024, median of 7 rounds, 2 threads
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx_timing import interleaved_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.compress.quant.channels import align_input_channels  # noqa: E402  (after the path)

THREADS, COUT = 2, 32


def first_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (COUT, 1, 3, 3)).astype(np.int8), "w"),
             numpy_helper.from_array(rng.uniform(0.001, 0.01, COUT).astype(np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(COUT, np.int8), "w_zero"), numpy_helper.from_array(rng.normal(0, 0.1, COUT).astype(np.float32), "bias"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"), numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
             numpy_helper.from_array(np.array(0.05, np.float32), "y_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xdq"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wdq"], axis=0),
             helper.make_node("Conv", ["xdq", "wdq", "bias"], ["conv"], name="conv0", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("QuantizeLinear", ["relu", "y_scale", "x_zero"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_scale", "x_zero"], ["logits"])]
    graph = helper.make_graph(nodes, "first_conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", COUT, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def main() -> None:
    plain = first_conv()
    padded = copy.deepcopy(plain)
    assert align_input_channels(padded) == ["conv0: input channels 1 -> 4"]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, m in (("1 input channel (as exported)", plain), ("padded to 4", padded))}
    x = np.random.default_rng(1).random((1024, 1, 8, 8), dtype=np.float32) * 2  # codes 0..100
    ms = interleaved_ms(sessions, x, calls=20)
    print("batch 1024: " + ", ".join(f"{name} {v:.3f} ms" for name, v in ms.items())
          + f": {ms['1 input channel (as exported)'] / ms['padded to 4']:.2f}x")


if __name__ == "__main__":
    main()
