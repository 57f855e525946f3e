"""The ONNX ``Attention`` op (opset 23+), which the dynamo exporter writes for scaled-dot-product attention.

4-D form: Q [B, H, S, D], K/V [B, Hkv, T, D]; 3-D form: Q [B, S, H*D] with ``q_num_heads`` and
``kv_num_heads`` attributes (rewritten after pruning).
"""

from __future__ import annotations

from .headflow import Flow

FAMILY = "onnx-attention"


def cores(graph):
    return [n for n in graph.nodes if n.op == "Attention" and n.domain in (None, "", "ai.onnx")]


def start(flow: Flow, node) -> int:
    return flow.start_attention_op(node)
