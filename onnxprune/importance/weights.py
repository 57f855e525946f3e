"""``weights``: data-free, ||W_v,h|| * ||W_o,h|| for each head (the default without data)."""

from __future__ import annotations

from . import Source


def weight_scores(block, graph):
    from ..score import weight_importance
    return weight_importance(block, graph)


def _score(ctx):
    return {b.index: weight_scores(b, ctx.graph) for b in ctx.blocks}


SOURCE = Source("weights", "data-free: ||W_v|| * ||W_o|| per head (the default without data)", _score, order=0)
