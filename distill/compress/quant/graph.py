"""PT2E's integer model as a module, importable without either quantization flow.

``convert_pt2e`` gives an exported graph of ``quantized_decomposed`` quantize / dequantize ops around
float conv / linear with int8 weight constants; :class:`IntegerGraph` wraps it so that it behaves as
a module (an exported graph refuses ``train()`` / ``eval()``). The packed artifact loads into it
with ``torch.export.load`` alone (distill/compress/quant/artifact.py), so nothing here imports
``prepare`` / ``convert`` of torch.ao's FX flow or torchao's PT2E flow.
"""

from __future__ import annotations

import torch

# The quantize / dequantize ops' definitions (torch.ops.quantized_decomposed) live, in torch 2.14, in
# torch.ao's FX package; torchao's PT2E flow imports them from there too. A loaded program needs them.
import torch.ao.quantization.fx._decomposed  # noqa: F401
from torch import fx, nn


class IntegerGraph(nn.Module):
    """An integer model as a quantize / dequantize graph (``graph_module``): PT2E's ``convert_pt2e``
    graph, or an FX student's QDQ form (distill/compress/quant/qdq.py), converted in eval form, so
    ``train()`` / ``eval()`` only set the flags (an exported graph refuses them)."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)

    def train(self, mode: bool = True) -> IntegerGraph:
        for m in self.modules():
            m.training = mode
        return self
