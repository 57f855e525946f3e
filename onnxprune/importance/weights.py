"""``weights``: data-free, ||W_v,h|| * ||W_o,h|| for each head (the default without data)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..block import AttentionBlock
from ..model.graph import const_value
from .source import Source


def _norms(block: AttentionBlock, graph_tensors, weight: str, heads_of_unit) -> np.ndarray:
    t = block.tensor(weight)
    value = np.asarray(const_value(graph_tensors[weight]), dtype=np.float64)
    axis = t.axes[0]
    out = np.zeros(block.num_heads)
    for h in range(block.num_heads):
        idx = np.flatnonzero([u >= 0 and h in heads_of_unit[u] for u in t.owner])
        out[h] = np.linalg.norm(np.take(value, idx, axis=axis)) if len(idx) else 0.0
    return out


def weight_importance(block: AttentionBlock, graph: gs.Graph) -> np.ndarray:
    tensors = graph.tensors()
    units = block.units
    score = _norms(block, tensors, block.o_proj.weight, units)
    v = block.projection("v")
    if v is not None:
        score = score * _norms(block, tensors, v.weight, units)
    return score


def _score(ctx):
    return {b.index: weight_importance(b, ctx.graph) for b in ctx.blocks}


SOURCE = Source("weights", "data-free: ||W_v|| * ||W_o|| per head (the default without data)", _score, order=0)
