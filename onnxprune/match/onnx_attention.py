"""The ONNX ``Attention`` op (opset 23+), which the dynamo exporter writes for scaled-dot-product attention.

4-D form: Q [B, H, S, D], K/V [B, Hkv, T, D]; 3-D form: Q [B, S, H*D] with ``q_num_heads`` and
``kv_num_heads`` attributes (rewritten after pruning).
"""

from __future__ import annotations

import numpy as np

from .headmap import FlowFail, HeadMap

FAMILY = "onnx-attention"


def cores(graph):
    return [n for n in graph.nodes if n.op == "Attention" and n.domain in (None, "", "ai.onnx")]


def start(flow, node):
    """ONNX Attention (opset 23+): Q [B,H,S,D] or [B,S,H*D]; K/V with Hkv heads; Y like Q."""
    q, k, v = node.inputs[:3]
    if len(node.inputs) > 4 and any(t is not None and t.name for t in node.inputs[4:6]):
        raise FlowFail(node, "Attention with past_key/past_value inputs (KV cache) is not supported yet")
    qs, ks = flow.shape(q), flow.shape(k)
    if len(qs) == 4:
        num_heads, num_kv = qs[1], ks[1]
    else:
        if "q_num_heads" not in node.attrs or "kv_num_heads" not in node.attrs:
            raise FlowFail(node, "3-D Attention without q_num_heads/kv_num_heads attributes")
        num_heads, num_kv = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
        flow.sites.append(("attr", node))
    if num_kv < 1 or num_heads % num_kv:
        raise FlowFail(node, f"{num_heads} query heads do not split into {num_kv} KV heads")
    group = num_heads // num_kv
    q_units = np.array([flow.unit({h}) for h in range(num_heads)])
    kv_units = np.array([flow.unit(range(g * group, (g + 1) * group)) for g in range(num_kv)])

    def head_map(units, shape):
        if len(shape) == 4:
            return HeadMap((1,), units)
        d = shape[2] // len(units)
        return HeadMap((2,), np.repeat(units, d))

    flow.add_node(node)
    flow.assign(q, head_map(q_units, qs), "up", node, "q")
    flow.assign(k, head_map(kv_units, ks), "up", node, "k")
    flow.assign(v, head_map(kv_units, flow.shape(v)), "up", node, "v")
    y = node.outputs[0]
    flow.assign(y, head_map(q_units, flow.shape(y)), "down", node, "o")
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is not None and mask.name:
        scores = (qs[0], num_heads, flow.shape(q)[-2] if len(qs) == 4 else qs[1], ks[-2] if len(ks) == 4
                  else ks[1])
        flow.side_input(node, mask, HeadMap((1,), q_units), scores, role="s")
    for extra in node.outputs[1:]:
        if extra.name and extra.outputs:
            raise FlowFail(node, f"Attention output {extra.name!r} (present KV or qk output) is used; "
                                 "not supported yet")
    return num_heads



def head_attrs(node, block, kept_heads, width) -> dict | None:
    """The 3-D form's ``q_num_heads`` and ``kv_num_heads`` after pruning."""
    if node.op != "Attention" or node.domain not in (None, "", "ai.onnx"):
        return None
    return {"q_num_heads": len(kept_heads), "kv_num_heads": len(block.kept_kv_heads(kept_heads))}
