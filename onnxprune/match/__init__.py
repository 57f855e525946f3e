"""Find the attention blocks of a graph. One module per family of patterns; each offers ``cores(graph)``
(the nodes where a block is anchored) and ``start(flow, node)`` (seed the head flow there)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..block import MatchResult, Miss
from . import onnx_attention, ort_fused, torch_export
from .build import build_block
from .headflow import Flow, FlowFail

FAMILIES = (torch_export, onnx_attention, ort_fused)


def match_graph(graph: gs.Graph, shapes: dict, values: dict) -> MatchResult:
    """Every attention block in ``graph`` in graph order, and an explained miss for every core that failed."""
    found, misses, claimed = [], [], {}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    anchors = sorted(((order[id(n)], fam, n) for fam in FAMILIES for n in fam.cores(graph)), key=lambda x: x[0])
    for _, fam, node in anchors:
        flow = Flow(graph, shapes, values)
        try:
            num_heads = fam.start(flow, node)
            block = build_block(flow, fam.FAMILY, node, len(found), num_heads)
        except FlowFail as fail:
            where = fail.node if fail.node is not None else node
            misses.append(Miss(node.name, node.op, f"{fail.reason} (at {where.op} {where.name!r})"))
            continue
        clash = [n for n in block.nodes if n in claimed]
        if clash:
            misses.append(Miss(node.name, node.op, f"node {clash[0]!r} already belongs to block "
                                                   f"{claimed[clash[0]]}"))
            continue
        for n in block.nodes:
            claimed[n] = block.index
        found.append(block)
    if not anchors:
        misses.append(Miss("", "", "no Softmax or attention op: the graph has no attention"))
    return MatchResult(tuple(found), tuple(misses))
