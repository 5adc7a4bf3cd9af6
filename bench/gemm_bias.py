"""A float-output int8 classifier in ONNX Runtime, as the exporter writes it (float bias: ONNX Runtime
dequantizes the int8 weight on every call and runs a float Gemm) and with its bias as int32 codes
(``export.int32_biases``, distill/compress/quant/bias.py: ONNX Runtime fuses it into QGemm).

    python bench/gemm_bias.py        # ms per call at batch 1 and 256, interleaved over 7 rounds

A 512 -> 1000 Linear (ResNet-18's classifier), int8 per-channel weights, activation codes 0..127.
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
from distill.compress.quant.bias import quantize_gemm_biases  # noqa: E402  (after the path)

K, N, THREADS, ROUNDS = 512, 1000, 2, 7


def classifier() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (N, K)).astype(np.int8), "w"),
             numpy_helper.from_array((rng.random(N) * 0.01 + 0.001).astype(np.float32), "sw"),
             numpy_helper.from_array(np.zeros(N, np.int8), "zw"), numpy_helper.from_array(np.array(0.02, np.float32), "sx"),
             numpy_helper.from_array(np.array(0, np.uint8), "zx"), numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "sx", "zx"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Gemm", ["xd", "wd", "b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def main() -> None:
    plain = classifier()
    rewritten = copy.deepcopy(plain)
    assert quantize_gemm_biases(rewritten) == ["fc: bias as int32 codes"]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, m in (("float bias (as exported)", plain), ("int32 bias", rewritten))}
    for batch, calls in ((1, 2000), (256, 50)):
        x = np.random.default_rng(1).uniform(0, 2.5, (batch, K)).astype(np.float32)  # codes 0..125
        ms = interleaved_ms(sessions, x, calls, ROUNDS)
        print(f"batch {batch}: " + ", ".join(f"{name} {v:.4f} ms" for name, v in ms.items())
              + f": {ms['float bias (as exported)'] / ms['int32 bias']:.2f}x")

if __name__ == "__main__":
    main()
