"""Who produces and who reads each value of an ONNX graph: the lookups the int8 file's rewrites
(:mod:`distill.compress.quant.channels`, :mod:`distill.compress.quant.bias`) walk the graph with."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GraphIndex:
    """A snapshot of ``graph``'s edges: a rewrite that adds nodes or initializers does not update it."""

    producer: dict[str, Any]  # value name -> the node that outputs it
    consumers: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))  # value name -> the nodes reading it
    initializers: dict[str, Any] = field(default_factory=dict)  # name -> TensorProto

    @classmethod
    def of(cls, graph: Any) -> GraphIndex:
        index = cls({out: node for node in graph.node for out in node.output})
        for node in graph.node:
            for name in node.input:
                index.consumers[name].append(node)
        index.initializers.update({i.name: i for i in graph.initializer})
        return index
