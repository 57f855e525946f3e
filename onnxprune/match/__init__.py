"""Find the attention blocks of a graph. One module per family of patterns, found by itself (``FAMILIES``);
each declares ``FAMILY`` and offers ``cores(graph)`` (the nodes where a block is anchored), ``start(flow,
node)`` (seed the head flow there) and ``head_attrs(node, block, kept_heads, width)`` (its head-count
attributes after pruning)."""

from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs

from ..block import MatchResult, Miss
from . import rules
from .build import build_block
from .headflow import Flow
from .headmap import FlowFail


def _families() -> tuple:
    """Every module of this package that declares a ``FAMILY``: a new family is one new module."""
    import importlib
    import pkgutil
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "FAMILY", None), str):
            found.append(module)
    return tuple(found)


FAMILIES = _families()


NO_ATTENTION = "no Softmax or attention op: the graph has no attention"


def has_attention(graph: gs.Graph) -> bool:
    """Whether any family finds a core in ``graph``: a question of op types alone, asked before anything runs."""
    return any(True for fam in FAMILIES for _ in fam.cores(graph))


def match_graph(graph: gs.Graph, shapes: dict, values: dict, model=None) -> MatchResult:
    """Every attention block in ``graph`` in graph order, and an explained miss for every core that failed.
    ``model``: the ModelProto of ``graph`` (its nodes named alike), for the exporter's module paths."""
    found, misses, claimed = [], [], {}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    anchors = sorted(((order[id(n)], fam, n) for fam in FAMILIES for n in fam.cores(graph)), key=lambda x: x[0])
    for _, fam, node in anchors:
        flow = Flow(graph, shapes, values, rules.RULES)
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
        misses.append(Miss("", "", NO_ATTENTION))
    return MatchResult(readable_names(tuple(found), model), tuple(misses))


def head_attrs(node, block, kept_heads, width: tuple[int, int]) -> dict | None:
    """The new head-count attributes of ``node`` (a family's core, or an op rule's site) when ``block``
    keeps ``kept_heads``; ``width``: its input's last axis before and after. None when no one knows."""
    for owner in FAMILIES + (rules,):
        new = owner.head_attrs(node, block, kept_heads, width)
        if new is not None:
            return new
    return None


SCOPES_KEY = "pkg.torch.onnx.name_scopes"      # torch.onnx (dynamo) writes each node's module path here


def readable_names(blocks: tuple, model) -> tuple:
    """Blocks named after a node (``node_Softmax_1715``, as dynamo exports name them, whose weights are
    ``val_N`` too) are named after the module that holds their core instead, from the exporter's metadata:
    ``model.layers.0.self_attn``. Names stay as they were where that is missing or not unique."""
    import ast
    if model is None:
        return blocks
    wanted = {b.core for b in blocks if b.name == b.core}
    scopes = {}
    for node in model.graph.node:
        if node.name in wanted:
            value = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None)
            try:
                path = ast.literal_eval(value) if value else None
            except (ValueError, SyntaxError):
                path = None
            if isinstance(path, list) and len(path) >= 2 and isinstance(path[-2], str) and path[-2]:
                scopes[node.name] = path[-2]
    names = [scopes.get(b.core, b.name) if b.name == b.core else b.name for b in blocks]
    if len(set(names)) != len(names):
        return blocks
    return tuple(replace(b, name=n) for b, n in zip(blocks, names))
