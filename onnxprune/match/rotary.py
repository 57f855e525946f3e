"""Rotary embeddings seen along the head size: the positions that a block's nodes tie together (a rotary
embedding's pairs) and the cos/sin tables that they read, from the head-size axes and positions that
``headdim`` found. A cut that keeps positions must keep each pair whole and take the same positions of
every table.

    q * cos + rotate_half(q) * sin, D = 8     -> pairs (0, 4) (1, 5) (2, 6) (3, 7); tables cos, sin
    GroupQueryAttention(do_rotary=1), caches [T, 8] of a head of 16 -> pairs (i, i + 8); tables: its cos/sin
      caches, one entry per pair
"""

from __future__ import annotations

import numpy as np

from ..block import Table
from .headdim import topological
from .headmap import ELEMENTWISE


# the cos/sin cache inputs of the rotary ops that turn Q and K inside one node
ROTARY_CACHES = {("com.microsoft", "RotaryEmbedding"): (2, 3), ("", "RotaryEmbedding"): (1, 2),
                 ("com.microsoft", "GroupQueryAttention"): (7, 8)}


def _rotary_caches(flow, node):
    """("half" or "interleaved", the cos/sin inputs, pairs: their last size) of a node that turns the head size
    by rotary caches of its own inputs, else None."""
    inputs = ROTARY_CACHES.get((node.domain if node.domain not in (None, "ai.onnx") else "", node.op))
    if inputs is None or (node.op == "GroupQueryAttention" and not node.attrs.get("do_rotary", 0)):
        return None
    if len(node.inputs) <= max(inputs) or any(not node.inputs[i].name for i in inputs):
        return None
    shape = flow.shapes.get(node.inputs[inputs[0]].name)
    if not shape:
        return None
    interleaved = node.attrs.get("rotary_interleaved" if node.op == "GroupQueryAttention" else "interleaved", 0)
    return ("interleaved" if interleaved else "half"), inputs, int(shape[-1])


def dim_positions(flow, found: dict, positions: dict, head_dim: int) -> tuple[tuple, tuple]:
    """(the groups of head-size positions that the block's nodes tie together, the tables they read): see the
    module docstring. A group of one position is left out; no group and no table is the plain case."""
    parent = list(range(head_dim))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def tie(p, q):
        for i, j in zip(p, q):
            parent[root(int(i))] = root(int(j))

    def at(t):
        return positions.get(t.name, np.arange(flow.shape(t)[found[t.name]])).reshape(-1)

    def own(t):         # the head size on an axis of its own (a merged F axis is the heads' map's business)
        return t is not None and t.name in found and found[t.name] not in flow.maps[t.name].axes

    tables = []
    for node in topological(flow):       # rotary ops: ONNX Runtime's (and GQA's own), ONNX's (opset 23)
        table = _rotary_caches(flow, node)
        if table is not None:
            kind, inputs, half = table
            if 2 * half > head_dim:
                continue
            for i in range(half):
                if kind == "half":
                    tie([i], [i + half])
                else:
                    tie([2 * i], [2 * i + 1])
            tables += [Table(node.name, i, len(flow.shape(node.inputs[i])) - 1, kind) for i in inputs]
    for node in topological(flow):
        if not node.outputs or not own(node.outputs[0]):
            continue
        y = node.outputs[0]
        ry = len(flow.shape(y))
        if node.op == "MatMul" and len(node.inputs) == 2:          # Q x Kᵀ: the contracted positions meet
            a, b = node.inputs
            if own(a) and own(b) and found[a.name] == len(flow.shape(a)) - 1 \
                    and found[b.name] == len(flow.shape(b)) - 2:
                tie(at(a), at(b))
            continue
        if node.op not in ELEMENTWISE:
            continue
        size = flow.shape(y)[found[y.name]]
        mine = [x for x in node.inputs if own(x)]
        for x in mine[1:]:
            tie(at(mine[0]), at(x))
        for i, x in enumerate(node.inputs):
            if x is None or x.name in flow.maps or flow.shape(x) is None or np.ndim(positions.get(y.name)) == 2:
                continue
            axis = found[y.name] - (ry - len(flow.shape(x)))
            if axis >= 0 and flow.shape(x)[axis] == size and size > 1:
                tables.append(Table(node.name, i, axis))
    groups = {}
    for i in range(head_dim):
        groups.setdefault(root(i), []).append(i)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1), tuple(tables)
