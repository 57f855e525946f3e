"""Plain attention as the torch.onnx exporters write it: ``Softmax(Q @ K^T * scale + bias) @ V``.

Covers the TorchScript exporter and the dynamo exporter (opset 18 decomposes scaled-dot-product attention
into exactly this). The core is a Softmax over the last axis of a [B, H, S, T] score tensor; the head flow
does the rest, whatever the projections look like (separate, packed, interleaved, grouped).
"""

from __future__ import annotations

from .headflow import Flow

FAMILY = "torch-export"


def cores(graph):
    return [n for n in graph.nodes if n.op == "Softmax"]


def start(flow: Flow, node) -> int:
    return flow.start_softmax(node)
