"""One planner per kind of rewrite site (``block.Site.kind``, recorded by the op rules): a node whose attribute
or shape-like input encodes a head count. Each ``plan_<kind>(rewriter, node, block, layouts, kept_heads)``
checks and queues its edits on the rewriter (``rewriter.edits``) and changes nothing itself. A new kind is a
function here with ``@site(kind)``; a kind registered twice fails at import."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import RewriteError
from ..match import head_attrs, shape_expr
from ..cut import packed_runs
from ..match.headmap import norm_axis
from ..model.graph import const_value
from .layouts import fresh, new_positions

SITE_PLANNERS: dict = {}


def site(kind: str):
    """Register the planner of site kind ``kind``."""
    def register(fn):
        if kind in SITE_PLANNERS:
            raise ValueError(f"rewrite site kind {kind!r} is registered twice")
        SITE_PLANNERS[kind] = fn
        return fn
    return register


@site("reshape")
def plan_reshape(rw, node, block, layouts, kept_heads, expand=False, index=1):
    out = node.outputs[0]
    if out.name not in layouts:
        return
    vec = node.inputs[index]
    new_shape, old_shape = layouts[out.name].new_shape, rw.shapes[out.name]
    length = rw.shapes[vec.name][0]
    offset = len(old_shape) - length if expand else 0
    changes = {}
    for j in range(length):
        ax = j + offset
        src = shape_expr.locate(vec, j, rw.shapes)
        base, ops = shape_expr.leaf(src)
        moved = rw.dim_change(layouts, base) if isinstance(base, shape_expr.Dim) else None
        if new_shape[ax] == old_shape[ax]:
            if moved is None:
                continue
            if "Div" not in ops:        # matched only when a Div can absorb the change
                raise RewriteError(f"{node.op} {node.name!r}: element {j} follows a size that shrinks "
                                   "with the heads but must not change")
            changes[j] = shape_expr.Keep(Fraction(moved[1], moved[0]))
            continue
        if isinstance(src, shape_expr.Const):
            if src.value == 0 or (expand and src.value == 1):
                continue
            if src.value == -1 and (expand or ax not in layouts[out.name].fixed):
                continue
            # an inferred -1 head count becomes explicit: ONNX Runtime's attention fusion reads the head
            # count from this constant, and blocks may now differ in it
            changes[j] = new_shape[ax]
        elif moved is not None:
            if shape_expr.evaluate(src, moved[1]) != new_shape[ax]:
                raise RewriteError(f"{node.op} {node.name!r}: element {j} follows {base.tensor} axis "
                                   f"{base.axis}, which does not shrink to {new_shape[ax]}")
        elif isinstance(src, shape_expr.Arith):
            changes[j] = new_shape[ax]
        elif isinstance(src, shape_expr.Dim) and shape_expr.is_fixed(src, rw.shapes, rw.tensors):
            changes[j] = shape_expr.Fixed(new_shape[ax])    # e.g. view(-1, x.size(-1)): a fixed width
        elif isinstance(src, shape_expr.Dim):
            raise RewriteError(f"{node.op} {node.name!r}: element {j} follows {src.tensor} axis "
                               f"{src.axis}, which does not shrink with the heads")
        else:
            raise RewriteError(f"{node.op} {node.name!r}: element {j} is {shape_expr.describe(src)}")
    rw.swap_vector(node, index, changes)


@site("expand")
def plan_expand(rw, node, block, layouts, kept_heads):
    plan_reshape(rw, node, block, layouts, kept_heads, expand=True)


@site("constant_of_shape")
def plan_constant_of_shape(rw, node, block, layouts, kept_heads):
    """The shape vector of a ConstantOfShape (its input 0), the output's shape itself."""
    plan_reshape(rw, node, block, layouts, kept_heads, index=0)


@site("tile")
def plan_tile(rw, node, block, layouts, kept_heads):
    """Tile repeats keep their values; one computed from a size that shrinks with the heads, as
    DeBERTa-v2's (B*H)/H, gets its divisor scaled (``Keep``)."""
    vec = node.inputs[1]
    changes = {}
    for j in range(rw.shapes[vec.name][0]):
        src = shape_expr.locate(vec, j, rw.shapes)
        base, ops = shape_expr.leaf(src)
        moved = rw.dim_change(layouts, base) if isinstance(base, shape_expr.Dim) else None
        if moved is None:
            continue
        if "Div" not in ops:
            raise RewriteError(f"Tile {node.name!r}: repeat {j} follows a size that shrinks with the heads")
        changes[j] = shape_expr.Keep(Fraction(moved[1], moved[0]))
    rw.swap_vector(node, 1, changes)


@site("split")
def plan_split(rw, node, block, layouts, kept_heads):
    x = node.inputs[0]
    lay = layouts.get(x.name)
    rank = len(rw.shapes[x.name])
    axis = norm_axis(node.attrs.get("axis", 0), rank)
    if lay is not None and axis in lay.projected:
        # a packed projection's output cut inside its heads (GPT-2's c_attn): each part as wide as its layout
        if not all(o.name in layouts for o in node.outputs):
            raise RewriteError(f"Split {node.name!r}: a part of a packed projection cut inside its heads is not "
                               "a head tensor of the block")
        new_sizes = np.array([layouts[o.name].new_shape[axis] for o in node.outputs], dtype=np.int64)
        if int(new_sizes.sum()) != lay.new_shape[axis]:
            raise RewriteError(f"Split {node.name!r}: its parts ({list(new_sizes)}) do not add up to the cut "
                               f"width {lay.new_shape[axis]}")
        empty = ()
    elif lay is None or axis not in lay.keep:
        return
    else:
        new_sizes, empty = _split_kept(rw, node, block, layouts, lay, axis)

    def apply(n=node, s=new_sizes, gone=tuple(empty)):
        for out in gone:
            n.outputs.remove(out)
        n.attrs.pop("num_outputs", None)
        if "split" in n.attrs:
            n.attrs["split"] = [int(v) for v in s]
        elif len(n.inputs) > 1:
            n.inputs[1] = gs.Constant(f"{n.name}__split{next(fresh)}", s)
        else:
            n.inputs.append(gs.Constant(f"{n.name}__split{next(fresh)}", s))
    rw.edits.append(apply)


def _split_kept(rw, node, block, layouts, lay, axis):
    """The sizes of a Split's parts that keep whole heads, and the parts that keep none."""
    sizes = [rw.shapes[o.name][axis] for o in node.outputs]
    kept = set(lay.keep[axis].tolist())
    bounds = np.cumsum([0] + sizes)
    new_sizes = np.array([sum(1 for i in range(bounds[k], bounds[k + 1]) if i in kept)
                          for k in range(len(sizes))], dtype=np.int64)
    empty = [node.outputs[k] for k in np.flatnonzero(new_sizes == 0)]
    block_nodes = set(block.nodes)
    for out in empty:       # a part of dropped heads only (StableLM splits q per head): it goes
        outside = [c for c in out.outputs if c.name not in block_nodes]
        if outside or out.name not in layouts:
            raise RewriteError(f"Split {node.name!r}: part {out.name!r} would be empty but is read outside "
                               "the block")
    if len(empty) == len(sizes):
        raise RewriteError(f"Split {node.name!r}: every part would be empty")
    return new_sizes[new_sizes > 0], empty


@site("slice")
def plan_slice(rw, node, block, layouts, kept_heads):
    x = node.inputs[0]
    lay = layouts.get(x.name)
    if lay is None:
        return
    in_shape = rw.shapes[x.name]
    def bound(t):
        return shape_expr.bound_value(t, rw.shapes, rw.values, rw.tensors)
    starts, ends = bound(node.inputs[1]), bound(node.inputs[2])
    if starts is None or ends is None:     # runtime bounds: only allowed off the head axes (matcher)
        return
    if lay.projected:
        _slice_projected(rw, node, lay, starts, ends, bound)
        return
    axes = bound(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else \
        np.arange(len(starts))
    steps = bound(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else \
        np.ones(len(starts), dtype=np.int64)
    new_starts, new_ends, touched = np.array(starts).copy(), np.array(ends).copy(), False
    for k, (s, e, a, st) in enumerate(zip(starts, ends, axes, steps)):
        a = norm_axis(int(a), len(in_shape))
        if a not in lay.keep:
            continue
        old = np.arange(in_shape[a])[slice(int(s), int(e), int(st))]
        if len(old) == 0:           # an empty part (a full rotary's pass-through, x[..., D:]) stays empty
            new_starts[k] = new_ends[k] = len(lay.keep[a])
            touched = True
            continue
        newpos = new_positions(lay.keep[a], in_shape[a])[old]
        newpos = newpos[newpos >= 0]
        # a step of 2 picks one of each interleaved rotary pair (GPT-J): the kept ones are still every other
        if len(newpos) == 0 or int(st) < 1 or \
                not np.array_equal(newpos, np.arange(newpos[0], newpos[-1] + 1, int(st))):
            raise RewriteError(f"Slice {node.name!r}: the kept part is not one contiguous range")
        new_starts[k], new_ends[k], touched = newpos[0], newpos[-1] + 1, True
    if touched:
        _swap_bounds(rw, node, new_starts.astype(np.asarray(starts).dtype), new_ends.astype(np.asarray(ends).dtype))


def _swap_bounds(rw, node, starts, ends):
    """Queue new constant starts and ends for a Slice."""
    cs = gs.Constant(f"{node.name}__starts{next(fresh)}", starts)
    ce = gs.Constant(f"{node.name}__ends{next(fresh)}", ends)

    def apply(n=node, cs=cs, ce=ce):
        n.inputs[1] = cs
        n.inputs[2] = ce
    rw.edits.append(apply)


def _slice_projected(rw, node, lay, starts, ends, bound):
    """A Slice of a packed projection's output that a cut inside the heads maps (Phi-3's qkv_proj cut into q, k
    and v): its bounds on that axis become those of the same pieces, now of their new widths."""
    x = node.inputs[0]
    shape = rw.shapes[x.name]
    axes = bound(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else np.arange(len(starts))
    steps = bound(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else np.ones(len(starts), np.int64)
    new_starts, new_ends = np.array(starts).copy(), np.array(ends).copy()
    for k, (s, e, a, st) in enumerate(zip(starts, ends, axes, steps)):
        a = norm_axis(int(a), len(shape))
        if a not in lay.projected:
            continue
        picked = set(np.arange(shape[a])[slice(int(s), int(e), int(st))].tolist())
        at, span = 0, []
        for pos, m in lay.maps[a].pieces:
            width = len(pos) if m is None else m.shape[1]
            inside = {int(p) for p in pos} & picked
            if inside and (int(st) != 1 or len(inside) != len(pos)):
                raise RewriteError(f"Slice {node.name!r}: it cuts across a head that a cut inside the heads maps")
            if inside:
                span.append((at, at + width))
            at += width
        if not span or any(b[0] != a_[1] for a_, b in zip(span, span[1:])):
            raise RewriteError(f"Slice {node.name!r}: the kept part is not one contiguous range")
        new_starts[k], new_ends[k] = span[0][0], span[-1][1]
    _swap_bounds(rw, node, new_starts.astype(np.asarray(starts).dtype), new_ends.astype(np.asarray(ends).dtype))


@site("gather")
def plan_gather(rw, node, block, layouts, kept_heads):
    data, idx = node.inputs[:2]
    lay = layouts.get(data.name)
    axis = norm_axis(node.attrs.get("axis", 0), len(rw.shapes[data.name]))
    if lay is None or axis not in lay.keep:
        return
    old = const_value(idx)
    if old is None:
        raise RewriteError(f"Gather {node.name!r}: runtime indices along the head axis")
    size = rw.shapes[data.name][axis]
    new = new_positions(lay.keep[axis], size)[np.asarray(old) % size]
    if (new < 0).any():
        raise RewriteError(f"Gather {node.name!r} reads a pruned head")
    c = gs.Constant(f"{node.name}__indices{next(fresh)}", np.asarray(new, dtype=np.asarray(old).dtype))
    rw.edits.append(lambda n=node, c=c: n.inputs.__setitem__(1, c))


@site("gathernd")
def plan_gathernd(rw, node, block, layouts, kept_heads):
    data, idx = node.inputs[:2]
    lay = layouts.get(data.name)
    if lay is None:
        return
    old = const_value(idx)
    if old is None:
        raise RewriteError(f"GatherND {node.name!r}: runtime indices along the head axis")
    new = np.array(old, dtype=np.int64)
    for ax, keep in lay.keep.items():
        if ax >= new.shape[-1]:
            raise RewriteError(f"GatherND {node.name!r} does not index the head axis {ax}")
        size = rw.shapes[data.name][ax]
        new[..., ax] = new_positions(keep, size)[new[..., ax] % size]
    if (new < 0).any():
        raise RewriteError(f"GatherND {node.name!r} reads a pruned head")
    c = gs.Constant(f"{node.name}__indices{next(fresh)}", new.astype(np.asarray(old).dtype))
    rw.edits.append(lambda n=node, c=c: n.inputs.__setitem__(1, c))


@site("concat")
def plan_concat(rw, node, block, layouts, kept_heads):
    """A Concat along the head axis (a mask repeated once per head): inputs that only hold dropped
    heads go; an input cut across is sliced by its own layout."""
    y = node.outputs[0]
    lay = layouts.get(y.name)
    axis = norm_axis(node.attrs["axis"], len(rw.shapes[y.name]))
    if lay is None or axis not in lay.keep:
        return
    kept = set(lay.keep[axis].tolist())
    inputs, offset = [], 0
    for t in node.inputs:
        size = rw.shapes[t.name][axis]
        here = kept & set(range(offset, offset + size))
        offset += size
        if len(here) == size:
            inputs.append(t)
        elif here:
            if t.name not in layouts or axis not in layouts[t.name].keep:
                raise RewriteError(f"Concat {node.name!r}: input {t.name!r} is cut across its heads")
            inputs.append(t)
    def apply(n=node, ins=tuple(inputs)):
        n.inputs.clear()
        n.inputs.extend(ins)
    rw.edits.append(apply)


@site("attr")
def plan_attr(rw, node, block, layouts, kept_heads):
    x = node.inputs[0]
    width = (rw.shapes[x.name][-1], layouts[x.name].new_shape[-1] if x.name in layouts
             else rw.shapes[x.name][-1])
    new = head_attrs(node, block, kept_heads, width)
    if new is None:
        raise RewriteError(f"{node.op} node {node.name!r}: no family knows its head-count attributes")
    w = node.inputs[1] if node.op == "Attention" and node.domain == "com.microsoft" and len(node.inputs) > 1 \
        else None
    widths = section_widths(block, w.name, layouts[w.name], kept_heads) if w is not None and w.name in layouts \
        and block.tensor(w.name).dim_axis is not None else None
    if widths is not None:
        sizes = node.attrs.get("qkv_hidden_sizes") or [rw.shapes[w.name][1] // 3] * 3
        if widths == [s // node.attrs["num_heads"] * len(kept_heads) for s in sizes]:
            widths = None                   # whole heads only: head_attrs has said it all
    if widths is not None:
        # a cut inside the heads: Q/K and V sections of their own widths, the scale of the original head size
        new["qkv_hidden_sizes"] = widths
        new.setdefault("scale", float(node.attrs.get("scale") or 1.0 / np.sqrt(sizes[0] // node.attrs["num_heads"])))
    if node.op == "GroupQueryAttention" and node.domain == "com.microsoft":
        new.update(_gqa_scale(rw, node, block, layouts, kept_heads))
    if _reads_own_qkv(node) and not node.attrs.get("scale") and \
            width[1] != (block.head_dim if len(rw.shapes[x.name]) == 4 else len(kept_heads) * block.head_dim):
        # its query narrowed inside the heads: the scale of the original head size (its default takes the new)
        new["scale"] = original_scale(block)
    rw.edits.append(lambda n=node, new=new: n.attrs.update(new))


def _gqa_scale(rw, node, block, layouts, kept_heads) -> dict:
    """GroupQueryAttention cut inside its heads: Q, K and V must come out at one head size (the op has one),
    and the scale stays that of the original head size (its default would take the new one)."""
    n, n_kv = len(kept_heads), len(block.kept_kv_heads(kept_heads))
    widths = []
    for i, heads in ((0, n), (1, n_kv), (2, n_kv)):
        t = node.inputs[i] if i < len(node.inputs) else None
        if t is None or not t.name:
            continue
        width = layouts[t.name].new_shape[-1] if t.name in layouts else rw.shapes[t.name][-1]
        widths.append(width / (n + 2 * n_kv) if i == 0 and len(widths) == 0 and not (
            len(node.inputs) > 1 and node.inputs[1].name) else width / heads)
    if len(set(widths)) != 1:
        raise RewriteError(f"GroupQueryAttention {node.name!r}: Q, K and V would come out at head sizes "
                           f"{sorted(set(widths))}; it has one: cut QK and OV to the same rank")
    if widths[0] == block.head_dim:
        return {}
    return {} if node.attrs.get("scale") else {"scale": original_scale(block)}


def _reads_own_qkv(node) -> bool:
    """ORT's MultiHeadAttention and ONNX's Attention (opset 23): Q, K and V as inputs of their own, V's head size
    free, the default scale read from Q's head size."""
    return (node.op == "MultiHeadAttention" and node.domain == "com.microsoft") or \
        (node.op == "Attention" and node.domain in (None, "", "ai.onnx"))


def original_scale(block) -> float:
    """The attention scale of ``block``'s original head size, ``1/sqrt(D)``: what a fused op whose default
    scale reads its inputs' head size is given when a cut inside the heads narrows them."""
    return float(1.0 / np.sqrt(block.head_dim))


def section_widths(block, name: str, lay, kept_heads) -> list[int]:
    """The new widths of the q, k and v sections of a packed weight: one piece of its map per kept run."""
    kept = {u for u, hs in enumerate(block.units) if hs & set(kept_heads)}
    t = block.tensor(name)
    runs_kept = [(u, pos, r) for u, pos, r in packed_runs(block, t) if u == -1 or u in kept]
    axis_map = lay.maps.get(t.dim_axis)
    widths = {"q": 0, "k": 0, "v": 0, None: 0}
    if axis_map is None or axis_map.is_selection:         # positions kept: count them run by run
        keep = set(axis_map.keep.tolist()) if axis_map is not None else None
        for _, pos, role in runs_kept:
            widths[role] += len(pos) if keep is None else len(keep & set(pos.tolist()))
    else:                                   # one piece per kept run (``layouts._inside_packed``)
        for (pos, m), (_, _, role) in zip(axis_map.pieces, runs_kept):
            widths[role] += len(pos) if m is None else m.shape[1]
    return [widths["q"], widths["k"], widths["v"]]


@site("resize")
def plan_resize(rw, node, block, layouts, kept_heads):
    plan_reshape(rw, node, block, layouts, kept_heads, index=3)     # Resize(X, roi, scales, sizes)


@site("head_size")
def plan_head_size(rw, node, block, layouts, kept_heads):
    """A runtime head size turned into a float (``match.headdim.head_size_readers``: the attention scale
    ``1/sqrt(Shape(q)[-1])``): where a cut inside the heads changes that size, the Cast reads the original
    size as a constant, so that the scale stays that of the original head size (the projected reference's)."""
    vec = node.inputs[0]
    src = shape_expr.locate(vec, None, rw.shapes)
    change = rw.dim_change(layouts, src) if isinstance(src, shape_expr.Dim) else None
    if change is None:
        return
    size = gs.Constant(f"{vec.name}__head_size{next(fresh)}",
                       np.full(rw.shapes[vec.name], change[0], dtype=vec.dtype or np.int64))
    rw.edits.append(lambda n=node, c=size: n.inputs.__setitem__(0, c))

