"""Turn a finished head flow into an ``AttentionBlock``, or explain why not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..block import AttentionBlock, HeadTensor, Projection, Site
from . import shape_expr
from .headmap import SHAPE_READERS, FlowFail
from .headdim import broadcast_chains, fused_kv_chains, head_dim_axes, head_size_readers
from .qknorm import below_norms, fused_rms, rms_means
from .rotary import dim_positions
from .headflow import Flow
from ..model.graph import is_const


def _ancestors(flow: Flow, t) -> list:
    seen, stack, out = set(), [t.inputs[0]] if t.inputs else [], []
    while stack:
        node = stack.pop()
        if id(node) in seen or id(node) not in flow.nodes:
            continue
        seen.add(id(node))
        out.append(node)
        for inp in node.inputs:
            if inp is not None and inp.name in flow.maps and inp.inputs and not is_const(inp):
                stack.append(inp.inputs[0])
    return out


def _is_projection(flow: Flow, node) -> bool:
    return node.op in ("MatMul", "Gemm") and any(
        i is not None and is_const(i) and i.name in flow.maps for i in node.inputs)


_WEIGHT_MOVERS = {"Split", "Slice", "Transpose", "Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"}


def _reaches_weight_slot(flow: Flow, node, depth: int = 0) -> bool:
    """A constant read by ``node`` ends up, only moved or cut, as the weight of a MatMul or Gemm in the
    block: ``nn.MultiheadAttention``'s packed in_proj weight, Split into q and kv parts and transposed."""
    if node.op not in _WEIGHT_MOVERS or depth > 4 or id(node) not in flow.nodes:
        return False
    for y in node.outputs:
        for reader in y.outputs:
            if reader.op in ("MatMul", "Gemm") and len(reader.inputs) > 1 and reader.inputs[1] is y:
                return True
            if _reaches_weight_slot(flow, reader, depth + 1):
                return True
    return False


def _cut_shared(flow: Flow) -> set[str]:
    """Tensors reached upward that other nodes also read: keep them whole, select heads before use."""
    cuts = set()
    for name, t in list(flow.tensors.items()):
        if name in flow.io:
            readers = [c for c in t.outputs if id(c) not in flow.nodes and c.op not in SHAPE_READERS]
            if readers:   # e.g. an exporter that counts the past length from one head's cache values
                raise FlowFail(readers[0], f"KV cache {name!r} is also read by {readers[0].op} node "
                                           f"{readers[0].name!r} outside the block, which may depend on the "
                                           "values of heads that pruning removes")
            continue
        if flow.direction.get(name) != "up" or is_const(t) or name not in flow.maps:
            continue
        external = [c for c in t.outputs if id(c) not in flow.nodes and c.op not in SHAPE_READERS]
        if not external:
            continue
        above = _ancestors(flow, t)
        if any(_is_projection(flow, n) for n in above) or not t.inputs:
            raise FlowFail(external[0], f"tensor {name!r} carries the head axis and is also read by "
                                        f"{external[0].op} node {external[0].name!r} outside the block")
        for node in above:
            flow.nodes.pop(id(node), None)
            for tensor in list(node.inputs) + list(node.outputs):
                if tensor is not None and tensor.name != name and tensor.name in flow.maps:
                    if all(id(c) not in flow.nodes for c in tensor.outputs):
                        flow.maps.pop(tensor.name)
        flow.sites = [(k, n) for k, n in flow.sites if id(n) in flow.nodes]
        cuts.add(name)
    return cuts


def _check_shape_sites(flow: Flow):
    for kind, node in flow.sites:
        if kind not in ("reshape", "expand"):
            continue
        out = node.outputs[0]
        hm = flow.maps.get(out.name)
        if hm is None:
            continue
        vec = node.inputs[1]
        out_rank = len(flow.shape(out))
        length = flow.shape(vec)[0]
        for j in range(length):      # elements off the head axes must not follow a size that shrinks
            ax = j + (out_rank - length) if kind == "expand" else j
            if ax in hm.axes:
                continue
            src, ops = shape_expr.leaf(shape_expr.locate(vec, j, flow.shapes))
            if isinstance(src, shape_expr.Dim) and src.tensor in flow.maps and \
                    src.axis in flow.maps[src.tensor].axes and "Div" not in ops:
                raise FlowFail(node, f"{node.op} shape element {j} of {vec.name!r} is derived from the head-carrying "
                                     f"size of {src.tensor!r} (axis {src.axis}) but is not a head axis itself")
        for ax in hm.axes:
            j = ax - (out_rank - length) if kind == "expand" else ax
            if j < 0:
                raise FlowFail(node, f"Expand adds the head axis {ax}")
            src = shape_expr.locate(vec, j, flow.shapes)
            ok = isinstance(src, shape_expr.Const)
            if isinstance(src, shape_expr.Dim):
                ok = (src.tensor in flow.maps and src.axis in flow.maps[src.tensor].axes) or \
                    shape_expr.is_fixed(src, flow.shapes, flow.graph_tensors())   # a fixed model width read
                # at run time: rewritten as a constant
            if isinstance(src, shape_expr.Arith):
                ok = not isinstance(shape_expr.leaf(src)[0], shape_expr.Unknown)
            if not ok:
                raise FlowFail(node, f"{node.op} shape element {j} of {vec.name!r} is {shape_expr.describe(src)}")


def build_block(flow: Flow, family: str, core, index: int, num_heads: int) -> AttentionBlock:
    flow.run()
    flow.adopt_outputs()
    flow.adopt_readers()
    for check in flow.checks:
        check()
    cuts = _cut_shared(flow)
    if len(flow.contractions) != 1:
        raise FlowFail(core, f"expected one output projection after the attention, found "
                             f"{len(flow.contractions)}")
    _check_shape_sites(flow)
    units = tuple(flow.units)
    head0 = flow.unit({0})
    o_node, o_name = flow.contractions[0]
    o_map = flow.maps[o_name]
    head_dim = int(np.count_nonzero(o_map.owner == head0))
    projections = [Projection("o", o_name, None, o_map.axes[0])]
    for name, uses in flow.const_uses.items():
        if name not in flow.maps:
            continue
        for node, i in uses:
            if id(node) not in flow.nodes:
                continue
            for role in sorted(flow.roles.get(name, set()) & {"q", "k", "v"}):
                if (node.op in ("MatMul", "Gemm") and i == 1) or (id(node), i) in flow.weight_inputs or \
                        _reaches_weight_slot(flow, node):
                    projections.append(Projection(role, name, None, flow.maps[name].axes[0]))
    for name, uses in flow.const_uses.items():       # biases: 1-D constants added to a projection output
        if name not in flow.maps or len(flow.shape(flow.tensors[name])) != 1:
            continue
        for node, _ in uses:
            if node.op == "Add" and id(node) in flow.nodes:
                for role in flow.roles.get(name, set()) & {"q", "k", "v"}:
                    projections = [Projection(p.role, p.weight, name if p.role == role else p.bias, p.head_axis)
                                   for p in projections]
    for node in flow.node_order:      # Gemm and ORT's Attention add their bias themselves (input 2), no Add node
        if node.op in ("Attention", "Gemm") and id(node) in flow.nodes and len(node.inputs) > 2 and node.inputs[2].name \
                and node.inputs[2].name in flow.maps:
            projections = [Projection(p.role, p.weight, node.inputs[2].name, p.head_axis)
                           if p.weight == node.inputs[1].name and p.bias is None else p for p in projections]
    if not any(p.role == "q" for p in projections):
        raise FlowFail(core, "no query projection weight found above the attention")
    kv_units = {int(u) for name, hm in flow.maps.items()
                if flow.roles.get(name, set()) & {"k", "v"} and is_const(flow.tensors[name])
                for u in np.unique(hm.owner) if u >= 0 and units[u] & set(range(num_heads))} | flow.broadcast_kv
    # a packed QKV weight also holds query units: keep the KV ones only (the largest sets per head)
    kv_units = {u for u in kv_units if not any(units[u] < units[w] for w in kv_units)}
    groups = sorted({tuple(sorted(units[u])) for u in kv_units}) or [(h,) for h in range(num_heads)]
    covered = sorted(h for g in groups for h in g)
    if covered != list(range(num_heads)):
        groups = [(h,) for h in range(num_heads)] if len(covered) == num_heads else groups
        if sorted(h for g in groups for h in g) != list(range(num_heads)):
            raise FlowFail(core, f"KV heads serve overlapping or missing query heads: {groups}")
    positions: dict = {}
    dims = head_dim_axes(flow, head_dim, positions)
    pairs, tables = dim_positions(flow, dims, positions, head_dim)
    above, cut_points = below_norms(flow, dims, head_dim) or (frozenset(), ())
    means = rms_means(flow, dims) if cut_points else {}
    if "q" in means and ("k" in means or not any(set(flow.roles.get(n, ())) & {"k"} for n in above)):
        # the RMS norms let the cut pass: it starts above them (the one K head of a multi-query block, whose norm
        # lies above its broadcast, outside the flow, is still cut at the broadcast)
        norm_means = tuple(sorted(set(means["q"]) | set(means.get("k", ()))))
        cut_points = tuple(p for p in cut_points if "q" not in flow.roles.get(_output_of(flow, p[0]), ())
                           and "k" not in means)
        above = frozenset()
    else:
        norm_means = ()
    norm_means += fused_rms(flow, dims, head_dim)
    tensors = tuple(HeadTensor(name, hm.axes, hm.owner, is_const(flow.tensors[name]), name in cuts,
                               tuple(a for a in flow.copy_axes.get(name, ()) if a in hm.axes), name in flow.io,
                               frozenset(flow.roles.get(name, ())), dims.get(name), name in above,
                               positions.get(name))
                    for name, hm in flow.maps.items())
    nodes = tuple(n.name for n in flow.node_order if id(n) in flow.nodes)
    sites = [Site(k, n.name, f"{n.domain}.{n.op}" if n.domain and n.domain != "ai.onnx" else n.op)
             for k, n in flow.sites]
    sites += [Site("head_size", n.name, n.op) for n in head_size_readers(flow, dims)]
    if len(groups) == 1 and num_heads > 1:      # one KV head for all: its head size up to its projection
        extra = _multi_query(flow, dims, head_dim, units.index(frozenset(groups[0])), {t.name for t in tensors})
        tensors += extra[0]
        projections += extra[1]
        nodes += extra[2]
        sites += extra[3]
        tensors, projections, nodes, sites, norm_means = _fused_kv_head(
            flow, head_dim, units.index(frozenset(groups[0])), tensors, projections, nodes, sites, norm_means)
    name = _block_name(o_name, core, index)
    return AttentionBlock(
        index=index, name=name, family=family, core=core.name, num_heads=num_heads,
        num_kv_heads=len(groups), head_dim=head_dim, kv_groups=tuple(groups), units=units,
        projections=tuple(projections), tensors=tensors,
        sites=tuple(sites), nodes=nodes, tables=tables, pairs=pairs, cut_points=cut_points, norm_means=norm_means)


def _output_of(flow: Flow, node_name: str) -> str:
    """The first output of the flow's node named ``node_name``."""
    return next(n.outputs[0].name for n in flow.node_order if n.name == node_name)


def _multi_query(flow: Flow, dims: dict, head_dim: int, unit: int, known: set) -> tuple:
    """The K and V tensors of a multi-query block above the broadcast (``headdim.broadcast_chains``), as head
    tensors of its one KV head (its D positions a merged axis of one unit), with their projections, nodes and
    Reshape sites: what a cut inside the heads needs, while keeping heads leaves them as they are."""
    tensors, projections, nodes, sites = [], [], [], []
    for role, chain, chain_nodes, weight, bias in broadcast_chains(flow, dims, head_dim):
        names = [t.name for t, _ in chain]
        if any(n in known for n in names):
            continue
        known.update(names)
        for t, axis in chain:
            tensors.append(HeadTensor(t.name, (axis,), np.full(head_dim, unit), is_const(t), roles=frozenset({role}),
                                      dim_axis=axis))
        projections.append(Projection(role, weight.name, bias.name if bias is not None else None,
                                      next(a for t, a in chain if t is weight)))
        nodes += [n.name for n in chain_nodes]
        sites += [Site("reshape", n.name) for n in chain_nodes if n.op == "Reshape"]
    return tuple(tensors), tuple(projections), tuple(nodes), sites


def _fused_kv_head(flow: Flow, head_dim: int, unit: int, tensors, projections, nodes, sites, norm_means):
    """The one K/V head of ``GroupQueryAttention(kv_num_heads=1)`` up to its projection (``headdim.fused_kv_chains``):
    its tensors as head tensors of the one unit (D positions on a merged axis); in a packed QKV projection (and
    its output) the K and V runs become that unit's, beside the query heads'; its KV caches; its fused k norm."""
    by_name = {t.name: t for t in tensors}
    projections, nodes, sites = list(projections), list(nodes), list(sites)
    norms = list(norm_means)
    for role, chain, chain_nodes, weight, bias, chain_norms, offsets in fused_kv_chains(flow, head_dim):
        for t, axis in chain:
            old = by_name.get(t.name)
            if t.name not in offsets:
                if old is None:
                    by_name[t.name] = HeadTensor(t.name, (axis,), np.full(head_dim, unit), is_const(t),
                                                 io=t.name in flow.io, roles=frozenset({role}), dim_axis=axis)
                continue
            start = offsets[t.name]
            if old is None or old.axes != (axis,) or np.any(old.owner[start:start + head_dim] != -1):
                raise FlowFail(t.inputs[0] if t.inputs else flow.graph.nodes[0],
                               f"the K/V run of {t.name!r} overlaps the query heads' or lies on another axis")
            owner = np.array(old.owner, copy=True)
            owner[start:start + head_dim] = unit
            by_name[t.name] = replace(old, owner=owner, roles=old.roles | {role}, dim_axis=axis)
        if weight is not None and not any(p.role == role for p in projections):
            projections.append(Projection(role, weight.name, bias.name if bias is not None else None,
                                          next(a for t, a in chain if t is weight)))
        for n in chain_nodes:
            if n.name not in nodes:
                nodes.append(n.name)
                if n.op == "Reshape":
                    sites.append(Site("reshape", n.name, "Reshape"))
        norms += [n.name for n in chain_norms if n.name not in norms]
    return tuple(by_name.values()), tuple(projections), tuple(nodes), sites, tuple(norms)


def _block_name(o_weight: str, core, index: int) -> str:
    name = o_weight
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if "." in name and not name.startswith(("onnx::", "val_")):
        return name
    path = core.name.rsplit("/", 1)[0].strip("/")
    return path or f"block{index}"
