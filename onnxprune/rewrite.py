"""Apply a plan (kept heads per block) to the graph: check everything first, then commit all edits at once.

Nothing that other nodes still read is changed in place: a constant that is shared is copied, a shape
expression is rebuilt beside the original, and a per-head tensor shared between blocks (T5's position
bias) is narrowed by a Gather in front of each block. Every initializer not sliced keeps its bytes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .block import AttentionBlock
from .errors import PlanError, RewriteError
from .model import dtypes
from .model.proto import copy_without_initializers, large_weights
from .match import shape_expr
from .match.headmap import norm_axis
from .model.graph import const_value, identity_source, set_values

_fresh = itertools.count()


@dataclass
class _Layout:
    """Per tensor: the kept indices along each head axis, and the new shape."""

    keep: dict[int, np.ndarray]
    new_shape: tuple
    fixed: frozenset = frozenset()   # head axes whose size is the same at any batch size (no B*H merge)


def _kept_units(block: AttentionBlock, kept_heads) -> set[int]:
    kept = set(kept_heads)
    return {u for u, heads in enumerate(block.units) if heads & kept}


def _layouts(block: AttentionBlock, kept_heads, shapes) -> dict[str, _Layout]:
    units = _kept_units(block, kept_heads)
    out = {}
    for t in block.tensors:
        mask = (t.owner == -1) | np.isin(t.owner, list(units))
        keep, ok = {}, True
        for pos, ax in enumerate(t.axes):
            if ax in t.copies and mask.ndim > 1:
                # entries along a broadcast axis are copies: keep as many as each row needs. Rows that keep
                # nothing (a whole KV group dropped) go along the other axes, so only kept rows must agree
                sums = mask.sum(axis=pos)
                counts = np.unique(sums[sums > 0])
                ok &= len(counts) == 1
                keep[ax] = np.arange(int(counts[0]) if len(counts) else 0)
                continue
            # a single head axis keeps its heads' own positions, copies or not: on a B*H axis they repeat
            # with period H, which lets a Gather outside the block hold at every batch size (DeBERTa-v2's
            # relative-position indices, expanded to B*H and shared by the blocks)
            other = tuple(i for i in range(mask.ndim) if i != pos)
            keep[ax] = np.flatnonzero(mask.any(axis=other) if other else mask)
        proj = mask
        for pos in sorted((t.axes.index(a) for a in t.copies), reverse=True):
            proj = proj.any(axis=pos)
        plain = [ax for ax in t.axes if ax not in t.copies]
        grid = np.zeros(proj.shape, dtype=bool)
        if plain:
            grid[np.ix_(*[keep[ax] for ax in plain])] = True
        if not ok or (plain and not np.array_equal(grid, proj)):
            if 1 < block.num_kv_heads < block.num_heads:
                hint = "in grouped-query attention keep the same number of query heads in every KV group"
            else:
                hint = (f"it holds the heads in a {' x '.join(str(n) for n in np.shape(t.owner))} grid (CodeGen "
                        "packs them so): keep the same heads in every row of it")
            raise PlanError(f"block {block.index} ({block.name}): the kept heads {list(kept_heads)} cannot be "
                            f"cut out of {t.name!r} as a rectangle; {hint}")
        shape = list(shapes[t.name])
        for ax, idx in keep.items():
            shape[ax] = len(idx)
        fixed = frozenset(t.axes) if len(t.axes) == 1 and _one_run_per_unit(t.owner) else frozenset()
        out[t.name] = _Layout(keep, tuple(shape), fixed)
    return out


def _one_run_per_unit(owner: np.ndarray) -> bool:
    """Every unit's entries sit in one contiguous run: [0,0,1,1,2,2] yes; B*H's [0,1,0,1] no."""
    starts = np.flatnonzero(np.diff(owner, prepend=owner[0] - 1))
    units = owner[starts]
    units = units[units != -1]
    return len(units) == len(np.unique(units))


def _take(arr: np.ndarray, keep: dict[int, np.ndarray]) -> np.ndarray:
    for ax, idx in keep.items():
        arr = np.take(arr, idx, axis=ax)
    return np.ascontiguousarray(arr)


def _reroute(old, new, node_names):
    """Make the named consumers of ``old`` read ``new`` instead."""
    for consumer in list(old.outputs):
        if consumer.name in node_names:
            for i, inp in enumerate(consumer.inputs):
                if inp is old:
                    consumer.inputs[i] = new


def _period(keep: np.ndarray, size: int) -> int | None:
    """The shortest period P < size with which the kept positions repeat along the axis, else None."""
    mask = np.zeros(size, dtype=bool)
    mask[keep] = True
    for p in range(1, size):
        if size % p == 0 and mask[:p].any() and np.array_equal(np.tile(mask[:p], size // p), mask):
            return p
    return None


def _declare_shape(tensor, new_shape):
    """A graph input/output keeps its symbolic sizes; only the fixed sizes that changed are rewritten."""
    if tensor.shape is None:
        return
    tensor.shape = [new if isinstance(old, int) and old != new else old
                    for old, new in zip(tensor.shape, new_shape)]


def _new_positions(keep: np.ndarray, size: int) -> np.ndarray:
    """old index -> new index after keeping ``keep`` (-1 where dropped)."""
    pos = np.full(size, -1, dtype=np.int64)
    pos[keep] = np.arange(len(keep))
    return pos


class Rewriter:
    def __init__(self, graph: gs.Graph, shapes: dict, values: dict):
        self.graph = graph
        self.shapes = shapes
        self.values = values
        self.nodes = {n.name: n for n in graph.nodes}
        self.tensors = graph.tensors()
        self.edits: list[Callable[[], None]] = []
        self.changed_initializers: set[str] = set()
        self.io_keep: dict[str, dict[int, np.ndarray]] = {}   # graph inputs/outputs that lose heads
        self._slices: dict[tuple, gs.Constant] = {}    # (shared weight, kept positions) -> its one slice
        self.cuts: dict[str, dict[int, np.ndarray]] = {}   # constant -> {axis that shrinks: kept positions}

    # ------------------------------------------------------------------ planning (no mutation)
    def plan(self, block: AttentionBlock, kept_heads):
        kept_heads = tuple(sorted(kept_heads))
        if not kept_heads:
            raise PlanError(f"block {block.index} ({block.name}): no head left")
        if any(h < 0 or h >= block.num_heads for h in kept_heads):
            raise PlanError(f"block {block.index} ({block.name}) has {block.num_heads} heads; "
                            f"cannot keep {list(kept_heads)}")
        if kept_heads == tuple(range(block.num_heads)):
            return
        layouts = _layouts(block, kept_heads, self.shapes)
        block_nodes = {self.nodes[n].name for n in block.nodes}
        for t in block.tensors:
            lay = layouts[t.name]
            tensor = self.tensors[t.name]
            if t.constant:
                self._plan_constant(tensor, lay, block_nodes)
                self.cuts[t.name] = {ax: idx for ax, idx in lay.keep.items()
                                     if len(idx) != self.shapes[t.name][ax]}
            elif t.cut:
                self._plan_cut(tensor, lay, block_nodes)
            elif t.io:
                self.io_keep[t.name] = dict(lay.keep)
                self.edits.append(lambda v=tensor, shape=lay.new_shape: _declare_shape(v, shape))
        for site in block.sites:
            node = self.nodes[site.node]
            SITE_PLANNERS[site.kind](self, node, block, layouts, kept_heads)

    def _plan_constant(self, tensor, lay: _Layout, block_nodes):
        consumers = list(tensor.outputs)
        shared = any(c.name not in block_nodes for c in consumers) or tensor in self.graph.outputs
        if isinstance(tensor, gs.Constant) and not shared:
            self.changed_initializers.add(tensor.name)
            self.edits.append(lambda t=tensor, v=_take(const_value(tensor), lay.keep): set_values(t, v))
            return
        # a weight that several blocks share (ALBERT's one layer, TorchScript's Identity of equal weights):
        # blocks that keep the same heads of it share one slice, so the model shrinks as much as it should
        key = (identity_source(tensor).name, tuple((ax, tuple(map(int, idx))) for ax, idx in sorted(lay.keep.items())))
        replacement = self._slices.get(key)
        if replacement is None:
            replacement = gs.Constant(f"{tensor.name}__pruned{next(_fresh)}", _take(const_value(tensor), lay.keep))
            self._slices[key] = replacement
        self.edits.append(lambda t=tensor, r=replacement: _reroute(t, r, block_nodes))

    def _plan_cut(self, tensor, lay: _Layout, block_nodes):
        size = self.shapes[tensor.name]
        plan = [(ax, idx, _period(idx, size[ax])) for ax, idx in lay.keep.items()]
        self.edits.append(lambda t=tensor, plan=plan: _reroute(t, self._narrow(t, plan), block_nodes))

    def _narrow(self, t, plan):
        """Gather the kept heads of ``t`` along each head axis.

        An axis whose kept positions repeat with a period P shorter than the axis (the ``B*H`` axis of
        Bloom's ALiBi tensor) is viewed as [N/P, P] and gathered along P, so that the result is right for
        any batch size, not only the probed one.
        """
        def add(op, inputs, attrs=None):
            dtype = np.int64 if op in ("Shape", "Concat") else t.dtype
            out = gs.Variable(f"{t.name}__{op.lower()}{next(_fresh)}", dtype=dtype)
            self.graph.nodes.append(gs.Node(op, name=f"{t.name}__{op.lower()}{next(_fresh)}", attrs=attrs or {},
                                            inputs=inputs, outputs=[out]))
            return out

        def const(values):
            return gs.Constant(f"{t.name}__c{next(_fresh)}", np.asarray(values, dtype=np.int64))

        cur, rank = t, len(self.shapes[t.name])
        for ax, idx, period in plan:
            if period is None:
                cur = add("Gather", [cur, const(idx)], {"axis": int(ax)})
                continue
            parts = [const([-1, period])]
            if ax:
                parts.insert(0, add("Shape", [cur], {"start": 0, "end": int(ax)}))
            if ax + 1 < rank:
                parts.append(add("Shape", [cur], {"start": int(ax) + 1}))
            split = add("Reshape", [cur, add("Concat", parts, {"axis": 0})])
            picked = add("Gather", [split, const(idx[idx < period])], {"axis": int(ax) + 1})
            back = ([parts[0]] if ax else []) + [const([-1])] + ([parts[-1]] if ax + 1 < rank else [])
            cur = add("Reshape", [picked, add("Concat", back, {"axis": 0})])
        return cur

    def _dim_change(self, layouts, dim) -> tuple[int, int] | None:
        """(old, new) size of a runtime size Shape(t)[axis] that shrinks with the heads, else None."""
        lay = layouts.get(dim.tensor)
        if lay is None:
            return None
        old, new = self.shapes[dim.tensor][dim.axis], lay.new_shape[dim.axis]
        return None if old == new else (old, new)

    def _plan_reshape(self, node, block, layouts, kept_heads, expand=False, index=1):
        out = node.outputs[0]
        if out.name not in layouts:
            return
        vec = node.inputs[index]
        new_shape, old_shape = layouts[out.name].new_shape, self.shapes[out.name]
        length = self.shapes[vec.name][0]
        offset = len(old_shape) - length if expand else 0
        changes = {}
        for j in range(length):
            ax = j + offset
            src = shape_expr.locate(vec, j, self.shapes)
            base, ops = shape_expr.leaf(src)
            moved = self._dim_change(layouts, base) if isinstance(base, shape_expr.Dim) else None
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
            elif isinstance(src, shape_expr.Dim) and shape_expr.is_fixed(src, self.shapes, self.tensors):
                changes[j] = shape_expr.Fixed(new_shape[ax])    # e.g. view(-1, x.size(-1)): a fixed width
            elif isinstance(src, shape_expr.Dim):
                raise RewriteError(f"{node.op} {node.name!r}: element {j} follows {src.tensor} axis "
                                   f"{src.axis}, which does not shrink with the heads")
            else:
                raise RewriteError(f"{node.op} {node.name!r}: element {j} is {shape_expr.describe(src)}")
        self._swap_vector(node, index, changes)

    def _plan_expand(self, node, block, layouts, kept_heads):
        self._plan_reshape(node, block, layouts, kept_heads, expand=True)

    def _plan_resize(self, node, block, layouts, kept_heads):
        self._plan_reshape(node, block, layouts, kept_heads, index=3)     # Resize(X, roi, scales, sizes)

    def _plan_tile(self, node, block, layouts, kept_heads):
        """Tile repeats keep their values; one computed from a size that shrinks with the heads, as
        DeBERTa-v2's (B*H)/H, gets its divisor scaled (``Keep``)."""
        vec = node.inputs[1]
        changes = {}
        for j in range(self.shapes[vec.name][0]):
            src = shape_expr.locate(vec, j, self.shapes)
            base, ops = shape_expr.leaf(src)
            moved = self._dim_change(layouts, base) if isinstance(base, shape_expr.Dim) else None
            if moved is None:
                continue
            if "Div" not in ops:
                raise RewriteError(f"Tile {node.name!r}: repeat {j} follows a size that shrinks with the heads")
            changes[j] = shape_expr.Keep(Fraction(moved[1], moved[0]))
        self._swap_vector(node, 1, changes)

    def _swap_vector(self, node, index: int, changes: dict):
        """Rebuild ``node``'s shape-like input ``index`` with ``changes`` now (new nodes only); swap it in
        at commit."""
        if not changes:
            return
        try:
            new_vec = shape_expr.rebuild(self.graph, node.inputs[index], changes, self.shapes, self.values)
        except ValueError as exc:
            raise RewriteError(f"{node.op} {node.name!r}: {exc}") from None
        self.edits.append(lambda n=node, v=new_vec, i=index: n.inputs.__setitem__(i, v))

    def _plan_split(self, node, block, layouts, kept_heads):
        x = node.inputs[0]
        lay = layouts.get(x.name)
        rank = len(self.shapes[x.name])
        axis = norm_axis(node.attrs.get("axis", 0), rank)
        if lay is None or axis not in lay.keep:
            return
        sizes = [self.shapes[o.name][axis] for o in node.outputs]
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
        new_sizes = new_sizes[new_sizes > 0]

        def apply(n=node, s=new_sizes, gone=tuple(empty)):
            for out in gone:
                n.outputs.remove(out)
            n.attrs.pop("num_outputs", None)
            if "split" in n.attrs:
                n.attrs["split"] = [int(v) for v in s]
            elif len(n.inputs) > 1:
                n.inputs[1] = gs.Constant(f"{n.name}__split{next(_fresh)}", s)
            else:
                n.inputs.append(gs.Constant(f"{n.name}__split{next(_fresh)}", s))
        self.edits.append(apply)

    def _plan_slice(self, node, block, layouts, kept_heads):
        x = node.inputs[0]
        lay = layouts.get(x.name)
        if lay is None:
            return
        in_shape = self.shapes[x.name]
        def bound(t):
            return shape_expr.bound_value(t, self.shapes, self.values, self.tensors)
        starts, ends = bound(node.inputs[1]), bound(node.inputs[2])
        if starts is None or ends is None:     # runtime bounds: only allowed off the head axes (matcher)
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
            newpos = _new_positions(lay.keep[a], in_shape[a])[old]
            newpos = newpos[newpos >= 0]
            if len(newpos) == 0 or int(st) != 1 or not np.array_equal(newpos, np.arange(newpos[0], newpos[-1] + 1)):
                raise RewriteError(f"Slice {node.name!r}: the kept part is not one contiguous range")
            new_starts[k], new_ends[k], touched = newpos[0], newpos[-1] + 1, True
        if touched:
            cs = gs.Constant(f"{node.name}__starts{next(_fresh)}", new_starts.astype(np.asarray(starts).dtype))
            ce = gs.Constant(f"{node.name}__ends{next(_fresh)}", new_ends.astype(np.asarray(ends).dtype))

            def apply(n=node, cs=cs, ce=ce):
                n.inputs[1] = cs
                n.inputs[2] = ce
            self.edits.append(apply)

    def _plan_gather(self, node, block, layouts, kept_heads):
        data, idx = node.inputs[:2]
        lay = layouts.get(data.name)
        axis = norm_axis(node.attrs.get("axis", 0), len(self.shapes[data.name]))
        if lay is None or axis not in lay.keep:
            return
        old = const_value(idx)
        if old is None:
            raise RewriteError(f"Gather {node.name!r}: runtime indices along the head axis")
        size = self.shapes[data.name][axis]
        new = _new_positions(lay.keep[axis], size)[np.asarray(old) % size]
        if (new < 0).any():
            raise RewriteError(f"Gather {node.name!r} reads a pruned head")
        c = gs.Constant(f"{node.name}__indices{next(_fresh)}", np.asarray(new, dtype=np.asarray(old).dtype))
        self.edits.append(lambda n=node, c=c: n.inputs.__setitem__(1, c))

    def _plan_gathernd(self, node, block, layouts, kept_heads):
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
            size = self.shapes[data.name][ax]
            new[..., ax] = _new_positions(keep, size)[new[..., ax] % size]
        if (new < 0).any():
            raise RewriteError(f"GatherND {node.name!r} reads a pruned head")
        c = gs.Constant(f"{node.name}__indices{next(_fresh)}", new.astype(np.asarray(old).dtype))
        self.edits.append(lambda n=node, c=c: n.inputs.__setitem__(1, c))

    def _plan_concat(self, node, block, layouts, kept_heads):
        """A Concat along the head axis (a mask repeated once per head): inputs that only hold dropped
        heads go; an input cut across is sliced by its own layout."""
        y = node.outputs[0]
        lay = layouts.get(y.name)
        axis = norm_axis(node.attrs["axis"], len(self.shapes[y.name]))
        if lay is None or axis not in lay.keep:
            return
        kept = set(lay.keep[axis].tolist())
        inputs, offset = [], 0
        for t in node.inputs:
            size = self.shapes[t.name][axis]
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
        self.edits.append(apply)

    def _plan_attr(self, node, block, layouts, kept_heads):
        from .match import head_attrs
        x = node.inputs[0]
        width = (self.shapes[x.name][-1], layouts[x.name].new_shape[-1] if x.name in layouts
                 else self.shapes[x.name][-1])
        new = head_attrs(node, block, kept_heads, width)
        if new is None:
            raise RewriteError(f"{node.op} node {node.name!r}: no family knows its head-count attributes")
        self.edits.append(lambda n=node, new=new: n.attrs.update(new))

    # ------------------------------------------------------------------ commit
    def commit(self):
        for edit in self.edits:
            edit()
        self.edits.clear()


# what each kind of site (``block.Site.kind``, recorded by the op rules) needs rewritten
SITE_PLANNERS = {
    "reshape": Rewriter._plan_reshape, "expand": Rewriter._plan_expand, "tile": Rewriter._plan_tile, "split": Rewriter._plan_split,
    "slice": Rewriter._plan_slice, "gather": Rewriter._plan_gather, "gathernd": Rewriter._plan_gathernd,
    "concat": Rewriter._plan_concat, "attr": Rewriter._plan_attr, "resize": Rewriter._plan_resize,
}


def dead_nodes(graph: gs.Graph) -> list:
    """Nodes that no graph output depends on. Call before editing: they are the original's, and stay."""
    live, stack = set(), [t for t in graph.outputs]
    while stack:
        t = stack.pop()
        for node in t.inputs:
            if id(node) not in live:
                live.add(id(node))
                stack.extend(i for i in node.inputs if i is not None)
    return [n for n in graph.nodes if id(n) not in live]


def export(graph: gs.Graph, original: onnx.ModelProto, keep: list | tuple = ()) -> onnx.ModelProto:
    """gs graph -> ModelProto with the original's model-level fields, fresh shape information, checked.

    The nodes that the edits left unused are removed; ``keep`` (the original's own dead nodes) stay.
    """
    graph.cleanup(remove_unused_graph_inputs=False)
    present = {id(n) for n in graph.nodes}
    graph.nodes.extend(n for n in keep if id(n) not in present)
    graph.toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = original.ir_version
    model.producer_name, model.producer_version = original.producer_name, original.producer_version
    model.domain, model.model_version, model.doc_string = original.domain, original.model_version, \
        original.doc_string
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    if not model.functions and original.functions:
        model.functions.extend(original.functions)
    del model.graph.value_info[:]
    _keep_output_ranks(model, original)
    if original.graph.value_info:
        _refresh_value_info(model, original)
    return model


def _refresh_value_info(model: onnx.ModelProto, original: onnx.ModelProto):
    """The original's intermediate shape annotations (value_info), recomputed for the pruned graph.

    Exporters and converters (ORT's float16 converter, for one) store them, and ONNX Runtime's fusions read
    them; a stale one would be wrong, and none at all can cost a fusion. So every tensor the original
    annotated gets the shape that onnx's inference finds for it in the pruned model, or no annotation
    where inference cannot tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), data_prop=True).graph
    except Exception:         # contrib ops onnx cannot infer: no annotation is safer than a stale one
        return
    fresh = {v.name: v for v in inferred.value_info}
    produced = {o for n in model.graph.node for o in n.output}
    model.graph.value_info.extend(fresh[v.name] for v in original.graph.value_info
                                  if v.name in fresh and v.name in produced)


def _keep_output_ranks(model: onnx.ModelProto, original: onnx.ModelProto):
    """A graph output that lost its shape gets the one the original's output or value_info had: after
    contrib ops, onnx's inference cannot rebuild it, and the full checker wants one."""
    known = {v.name: v for v in list(original.graph.value_info) + list(original.graph.output)
             if v.type.tensor_type.HasField("shape")}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.HasField("shape") or out.name not in known:
            continue
        tt.shape.CopyFrom(known[out.name].type.tensor_type.shape)   # graph outputs never carry heads


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every floating-point initializer of 1 MiB or more turned into a graph input of the same
    type and shape. The checks read types and shapes, not weight values: checking this copy costs the
    memory of the graph, not of the weights (and works for models above 2 GB)."""
    light = copy_without_initializers(model)
    light.graph.node.extend(model.graph.node)
    weights = large_weights(model, dtypes.STAND_IN_BYTES)
    for init in model.graph.initializer:
        if init.name in weights:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            light.graph.initializer.append(init)
    return light


def _strict_check(model: onnx.ModelProto) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(_weightless(model), check_type=True, strict_mode=True,
                                                 data_prop=True)
    onnx.checker.check_model(inferred, full_check=True)
    return model


def _plain_check(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(_weightless(model))
    return model


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def check_model(model: onnx.ModelProto, original: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Strict shape inference and the full checker (on a copy without the large weights); returns ``model``.

    No check can ask more of the output than of the input: when the original fails the strict checks
    (ONNX Runtime's contrib ops that the GenAI builder puts in the default domain, unknown to onnx), the
    output must pass the strongest check the original passes, or, when the original passes none, fail it
    for the same reason and no other. ONNX Runtime then judges both (verification).
    """
    try:
        return _strict_check(model)
    except Exception as exc:
        reason = _first_line(exc)
    if original is not None:
        for level in (_strict_check, _plain_check):
            try:
                level(original)
            except Exception as exc:
                original_reason = _first_line(exc)
                continue
            try:
                return level(model)
            except Exception as exc:
                reason = _first_line(exc)
                break
        else:
            try:
                _plain_check(model)
                return model
            except Exception as exc:
                if _first_line(exc) == original_reason:
                    return model
                reason = _first_line(exc)
    raise RewriteError(f"the pruned model fails the ONNX checks: {reason}")
