"""Plain attention as the torch.onnx exporters write it: ``Softmax(Q @ K^T * scale + bias) @ V``.

Covers the TorchScript exporter and the dynamo exporter (opset 18 decomposes scaled-dot-product attention
into exactly this). The core is a Softmax over the last axis of a [B, H, S, T] score tensor; the head flow
does the rest, whatever the projections look like (separate, packed, interleaved, grouped).
"""

from __future__ import annotations

import numpy as np

from .headflow import FlowFail, HeadMap, _norm_axis

FAMILY = "torch-export"


def cores(graph):
    return [n for n in graph.nodes if n.op == "Softmax"]


def start(flow, node):
    """Softmax over the last axis of scores_BHST: axis 1 carries the H heads."""
    x, y = node.inputs[0], node.outputs[0]
    shape = flow.shape(x)
    if len(shape) != 4:
        raise FlowFail(node, f"attention scores are {len(shape)}-D {list(shape)}; expected [B, H, S, T]")
    if _norm_axis(node.attrs.get("axis", -1), 4) != 3:
        raise FlowFail(node, "Softmax is not over the last axis")
    hm = HeadMap((1,), np.array([flow.unit({h}) for h in range(shape[1])]))
    flow.add_node(node)
    flow.assign(x, hm, "up", node, "s")
    flow.assign(y, hm, "down", node, "s")
    return shape[1]



def head_attrs(node, block, kept_heads, width) -> dict | None:
    return None         # a Softmax holds no head count
