"""Plain attention as the torch.onnx exporters write it: ``Softmax(Q @ K^T * scale + bias) @ V``.

Covers the TorchScript exporter and the dynamo exporter (opset 18 decomposes scaled-dot-product attention
into exactly this). The core is a Softmax over the last axis of a [B, H, S, T] score tensor; the head flow
does the rest, whatever the projections look like (separate, packed, interleaved, grouped). Scores may
also be 3-D with batch and heads merged, [B*H, S, T] (``nn.MultiheadAttention`` returning its weights).
"""

from __future__ import annotations

import numpy as np

from .headmap import FlowFail, HeadMap, norm_axis

FAMILY = "torch-export"


def cores(graph):
    return [n for n in graph.nodes if n.op == "Softmax"]


def start(flow, node):
    """Softmax over the last axis of scores_BHST: axis 1 carries the H heads. Scores [B*H, S, T], as
    ``nn.MultiheadAttention`` computes them when it returns its weights, carry them batch-major on axis 0:
    H is that size over the probe's batch (the first axis of the first graph input)."""
    x, y = node.inputs[0], node.outputs[0]
    shape = flow.shape(x)
    rank = len(shape)
    if rank not in (3, 4):
        raise FlowFail(node, f"attention scores are {rank}-D {list(shape)}; expected [B, H, S, T] or [B*H, S, T]")
    if norm_axis(node.attrs.get("axis", -1), rank) != rank - 1:
        raise FlowFail(node, "Softmax is not over the last axis")
    if rank == 4:
        hm = HeadMap((1,), np.array([flow.unit({h}) for h in range(shape[1])]))
        num_heads = shape[1]
    else:
        inputs = [t for t in flow.graph.inputs if flow.shapes.get(t.name)]
        batch = flow.shape(inputs[0])[0] if inputs else 0
        if not batch or shape[0] % batch:
            raise FlowFail(node, f"attention scores are 3-D {list(shape)}, and the batch size is unknown")
        num_heads = shape[0] // batch
        hm = HeadMap((0,), np.tile([flow.unit({h}) for h in range(num_heads)], batch))
    flow.add_node(node)
    flow.assign(x, hm, "up", node, "s")
    flow.assign(y, hm, "down", node, "s")
    return num_heads



def head_attrs(node, block, kept_heads, width) -> dict | None:
    return None         # a Softmax holds no head count
