"""Who produces and who reads each value of an ONNX graph: the lookups the int8 file's rewrites
(:mod:`distill.compress.quant.channels`, :mod:`distill.compress.quant.bias`) walk the graph with."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass
class GraphIndex:
    """A snapshot of ``graph``'s edges: a rewrite that adds nodes or initializers does not update it."""

    producer: dict[str, Any]  # value name -> the node that outputs it
    consumers: defaultdict[str, list[Any]]  # value name -> the nodes reading it ([] for none)
    initializers: dict[str, Any]  # name -> TensorProto

    @classmethod
    def of(cls, graph: Any) -> GraphIndex:
        consumers: defaultdict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)
        return cls({out: node for node in graph.node for out in node.output}, consumers, {i.name: i for i in graph.initializer})
