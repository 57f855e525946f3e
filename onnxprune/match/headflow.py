"""Head-axis flow: find every tensor of an attention block that carries the head axis, and how.

What a head map is, and the shape key of the comments, are in ``headmap.py``.

The flow starts at an attention core (Softmax between two MatMuls, or an ``Attention`` op) and runs
op by op, upward to the weights and downward to the output projection, with one rule per op type. A rule
that meets something it does not understand raises ``FlowFail`` with the node and the reason, which
becomes the explained miss that ``onnxprune inspect`` prints.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_graphsurgeon as gs

from ..model.graph import const_value, is_const
from . import shape_expr
from .headmap import MOVERS, SELECTORS, SHAPE_READERS, STACKERS, FlowFail, HeadMap, broadcast_owner, norm_axis



def _as_set(role) -> set:
    if not role:
        return set()
    return {role} if isinstance(role, str) else set(role)


class Flow:
    """One attention block's head flow: the walk from a core along the head axis, op by op, with the rule
    of each op taken from ``rules``. Call ``start_*`` once, then ``run()``."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple], values: dict[str, np.ndarray], rules: dict):
        self.graph = graph
        self.rules = rules                              # op type -> rule (``rules.RULES``)
        self.shapes = shapes
        self.values = values
        self.maps: dict[str, HeadMap] = {}
        self.direction: dict[str, str] = {}
        self.roles: dict[str, set] = {}
        self.tensors: dict[str, object] = {}
        self._graph_tensors = None                      # every tensor of the graph by name, when asked
        self.checks: list = []      # rules' checks that need the final maps: run (and may fail) after run()
        self.units: list[frozenset] = []
        self._unit_ids: dict[frozenset, int] = {}
        self.nodes: dict[int, object] = {}
        self.node_order: list = []
        self.queue: deque = deque()
        self.sites: list[tuple[str, object]] = []      # (kind, node): reshape, expand, split, slice, gather, attr
        self.contractions: list[tuple[object, str]] = []   # (node, weight tensor name)
        self.const_uses: dict[str, list] = {}          # const name -> [(node, input index)]
        self.copy_axes: dict[str, tuple[int, ...]] = {}   # Expand outputs: axes broadcast from size 1
        self.broadcast_kv: set[int] = set()            # units of K/V heads broadcast to several query heads
        self.weight_inputs: set[tuple[int, int]] = set()   # (id(node), input index) of fused-op weights
        self.io: set[str] = set()                      # graph inputs/outputs allowed to carry heads (KV cache)

    # ------------------------------------------------------------------ basics
    def unit(self, heads) -> int:
        key = frozenset(heads)
        if key not in self._unit_ids:
            self._unit_ids[key] = len(self.units)
            self.units.append(key)
        return self._unit_ids[key]

    def shape(self, t) -> tuple:
        if t.name not in self.shapes:
            raise FlowFail(None, f"no shape known for tensor {t.name!r}")
        return self.shapes[t.name]

    def add_node(self, node):
        if id(node) not in self.nodes:
            self.nodes[id(node)] = node
            self.node_order.append(node)

    def _merge(self, t, a: HeadMap, b: HeadMap, node) -> HeadMap:
        shape = self.shape(t)
        axes = tuple(sorted(set(a.axes) | set(b.axes)))
        oa, ob = broadcast_owner(a, shape, axes), broadcast_owner(b, shape, axes)
        clash = (oa != -1) & (ob != -1) & (oa != ob)
        if clash.any():
            raise FlowFail(node, f"tensor {t.name!r} is reached with two different head layouts")
        return HeadMap(axes, np.where(oa == -1, ob, oa))

    def _compress(self, t, hm: HeadMap) -> HeadMap | None:
        """Drop axes along which the owner does not vary; None when nothing is left or all is -1."""
        owner, axes = hm.owner, list(hm.axes)
        for pos in reversed(range(len(axes))):
            first = np.take(owner, [0], axis=pos)
            if owner.shape[pos] == 1 or np.array_equal(np.broadcast_to(first, owner.shape), owner):
                if len(axes) == 1 and self._part_of_heads(first):
                    break       # the whole tensor is some heads' only: StableLM's per-head part [B, 1, S, D]
                owner = np.squeeze(first, axis=pos)
                del axes[pos]
        if not axes or np.all(owner == -1):
            return None
        return HeadMap(tuple(axes), owner)

    def _part_of_heads(self, owner) -> bool:
        """``owner`` is one unit that leaves some head out (a tensor of every head is not on the flow)."""
        units = set(np.unique(owner).tolist())
        if len(units) != 1 or -1 in units:
            return False
        everyone = set().union(*self.units) if self.units else set()
        return self.units[units.pop()] != everyone

    def assign(self, t, hm: HeadMap | None, direction: str, node=None, role=None):
        if t is None or hm is None or not t.name:
            return
        hm = self._compress(t, hm)
        if hm is None:
            return
        roles = self.roles.setdefault(t.name, set())
        grew = bool(set(_as_set(role)) - roles)
        roles |= _as_set(role)
        old = self.maps.get(t.name)
        new = hm if old is None else (self._compress(t, self._merge(t, old, hm, node)) or old)
        if old is not None and old.axes == new.axes and np.array_equal(old.owner, new.owner) and not grew:
            return
        self.maps[t.name] = new
        self.tensors[t.name] = t
        self.direction.setdefault(t.name, direction)
        self.queue.append((t, direction))

    def role_of(self, t) -> frozenset:
        return frozenset(self.roles.get(t.name, ()))

    def merge_axis(self, hm: HeadMap, ax: int) -> HeadMap:
        """Collapse axis ``ax`` (broadcast there): each remaining index serves the union of the heads."""
        pos = hm.axes.index(ax)
        owner = np.moveaxis(hm.owner, pos, -1)
        flat = owner.reshape(-1, owner.shape[-1])
        merged = np.empty(flat.shape[0], dtype=np.int64)
        for i, row in enumerate(flat):
            heads = set()
            for u in row:
                if u != -1:
                    heads |= self.units[u]
            merged[i] = self.unit(heads) if heads else -1
        return HeadMap(hm.axes[:pos] + hm.axes[pos + 1:], merged.reshape(owner.shape[:-1]))

    # ------------------------------------------------------------------ starting points
    def begin(self, node):
        """Make ``node`` the first node of the block, with its constant inputs recorded."""
        self.add_node(node)
        for i, inp in enumerate(node.inputs):
            if inp is not None and inp.name and is_const(inp):
                self.const_uses.setdefault(inp.name, []).append((node, i))

    # ------------------------------------------------------------------ main loop
    def run(self):
        while self.queue:
            t, direction = self.queue.popleft()
            if any(o is t for o in self.graph.outputs):   # present KV (also when reached upward), probabilities
                self.io.add(t.name)
            if direction == "up":
                if is_const(t):
                    continue
                if not t.inputs:         # a graph input with heads (a KV cache): re-declared
                    self.io.add(t.name)
                    continue
                self._visit(t.inputs[0], "up", t)
            else:
                for consumer in list(t.outputs):
                    if consumer.op in SHAPE_READERS:
                        continue
                    self._visit(consumer, "down", t)

    def adopt_outputs(self):
        """Follow block tensors reached upward into readers that only stack them into graph outputs.

        A decoder with a KV cache concatenates the past with the new keys and values, and hands the result
        both to the attention and, stacked or as it is, to a ``present`` output. That output carries the
        head axis too, so it is re-declared with the kept heads like the past input it continues.
        """
        grew = True
        while grew:
            grew = False
            for name in list(self.maps):
                t = self.tensors[name]
                if self.direction.get(name) != "up" or is_const(t):
                    continue
                for reader in list(t.outputs):
                    if id(reader) in self.nodes or reader.op in SHAPE_READERS or not self._feeds_outputs(reader):
                        continue
                    self._visit(reader, "down", t)
                    self.run()
                    grew = True

    def _feeds_outputs(self, node, depth: int = 0) -> bool:
        """True when everything ``node`` computes only moves data into graph outputs."""
        if depth > 6 or node.op not in STACKERS:
            return False
        for y in node.outputs:
            if any(o is y for o in self.graph.outputs):
                continue
            readers = [r for r in y.outputs if r.op not in SHAPE_READERS]
            if not readers or not all(id(r) in self.nodes or self._feeds_outputs(r, depth + 1) for r in readers):
                return False
        return True

    def adopt_readers(self):
        """Take in outside readers of block tensors that only pick positions owned by no head.

        Falcon's multi-query attention reshapes the fused QKV output to [B, S, H + 2, D]; the query heads are
        one slice of it and the single K and V heads are Gathers of the last two positions. Those Gathers
        read a block tensor but carry no head of the block: they stay valid once their indices follow the
        new positions, so they become sites of the block rather than a reason to give up.
        """
        for name in list(self.maps):
            t = self.tensors[name]
            if self.direction.get(name) != "up" or is_const(t):
                continue
            for reader in list(t.outputs):
                if id(reader) in self.nodes or reader.op in SHAPE_READERS:
                    continue
                chain = self._headless_reader(reader, t, self.maps[name])
                if chain is None:
                    continue
                for node, site, out, hm in chain:
                    self.add_node(node)
                    if site and (site, node) not in self.sites:
                        self.sites.append((site, node))
                    if out is not None:
                        self.maps[out.name], self.tensors[out.name] = hm, out
                        self.direction.setdefault(out.name, "down")

    def _headless_reader(self, node, x, hm: HeadMap, depth: int = 0):
        """[(node, site kind, output, output map)] when everything ``node`` computes from ``x`` (which
        carries ``hm``) holds no head of the block; else None."""
        if depth > 4 or len(node.outputs) != 1 or node.inputs[0] is not x:
            return None
        y = node.outputs[0]
        if node.op in MOVERS:
            if node.op == "Transpose":
                perm = list(node.attrs.get("perm", list(range(len(self.shape(x))))[::-1]))
                out = HeadMap(tuple(perm.index(a) for a in hm.axes), hm.owner)
            else:
                out = hm
            if any(o is y for o in self.graph.outputs) or not y.outputs:
                return None
            chain = [(node, None, y, out)]
            for reader in y.outputs:
                if reader.op in SHAPE_READERS:
                    continue
                sub = self._headless_reader(reader, y, out, depth + 1)
                if sub is None:
                    return None
                chain += sub
            return chain
        if node.op not in SELECTORS or len(hm.axes) != 1:
            return None
        ax, rank = hm.axes[0], len(self.shape(x))
        if node.op == "Gather":
            idx = const_value(node.inputs[1])
            if idx is None or norm_axis(node.attrs.get("axis", 0), rank) != ax:
                return None
            picked = np.asarray(idx).reshape(-1)
        elif node.op == "GatherND":
            idx = const_value(node.inputs[1])
            if idx is None or node.attrs.get("batch_dims", 0) != 0 or np.asarray(idx).shape[-1] <= ax:
                return None
            picked = np.asarray(idx)[..., ax].reshape(-1)
        else:
            try:
                pos = self.slice_positions(node, {ax})
            except FlowFail:
                return None
            if ax not in pos:
                return None
            picked = pos[ax]
        size = self.shape(x)[ax]
        if ((picked < -size) | (picked >= size)).any() or (hm.owner[picked % size] != -1).any():
            return None
        return [(node, node.op.lower(), None, None)]

    def _visit(self, node, direction, trigger):
        self.add_node(node)
        for i, inp in enumerate(node.inputs):
            if inp is not None and is_const(inp):
                uses = self.const_uses.setdefault(inp.name, [])
                if (node, i) not in uses:
                    uses.append((node, i))
        rule = self.rules.get(node.op)
        if rule is None:
            raise FlowFail(node, f"{node.op} node {node.name!r} touches a tensor with the head axis "
                                 f"({trigger.name!r}); no rule for {node.op}")
        rule(self, node, direction, trigger)

    # ------------------------------------------------------------------ rules
    def side_input(self, node, t, out_map: HeadMap, out_shape, role):
        """Right-aligned broadcast of an input against an output that carries ``out_map``."""
        if t is None or not t.name:
            return
        in_shape = self.shape(t)
        offset = len(out_shape) - len(in_shape)
        hm = out_map
        for ax in reversed(out_map.axes):
            ia = ax - offset
            if ia < 0 or in_shape[ia] != out_shape[ax]:
                if ia >= 0 and in_shape[ia] != 1:
                    raise FlowFail(node, f"input {t.name!r} of {node.op} does not broadcast along the head axis")
                hm = self.merge_axis(hm, ax)
        if not hm.axes:
            return
        hm = HeadMap(tuple(a - offset for a in hm.axes), hm.owner)
        self.assign(t, hm, "up", node, role)

    def data_io(self, node):
        if node.op == "Dropout":
            return node.inputs[:1], node.outputs[:1]
        if node.op == "Clip":
            return node.inputs[:1], node.outputs[:1]
        return [t for t in node.inputs if t is not None and t.name], node.outputs[:1]

    def axes_arg(self, node, rank):
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
            val = const_value(node.inputs[1])
            if val is None:
                raise FlowFail(node, f"{node.op} axes are computed at run time")
            return [norm_axis(int(a), rank) for a in np.atleast_1d(val)]
        if "axes" in node.attrs:
            return [norm_axis(int(a), rank) for a in node.attrs["axes"]]
        return None

    def graph_tensors(self) -> dict:
        if self._graph_tensors is None:
            self._graph_tensors = self.graph.tensors()
        return self._graph_tensors

    def bound_value(self, t):
        """A Slice bound: constant, or computed from fixed sizes only (see ``shape_expr.bound_value``)."""
        return shape_expr.bound_value(t, self.shapes, self.values, self.graph_tensors())

    def slice_positions(self, node, relevant=None) -> dict[int, np.ndarray]:
        """Input index of every output index, per sliced axis. Bounds computed at run time are only an
        error on an axis in ``relevant`` (the head axes); elsewhere the axis is left out."""
        x = node.inputs[0]
        in_shape = self.shape(x)
        args = [const_value(t) if t is not None and t.name else None for t in node.inputs[1:5]]
        args += [None] * (4 - len(args))
        if any(t is not None and t.name and v is None for t, v in zip(node.inputs[1:5], args)):
            axes = args[2]
            if axes is None and len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
                raise FlowFail(node, "Slice axes are computed at run time")
            axes = range(len(self.shape(node.inputs[1]))) if axes is None else axes
            if relevant is not None and not any(norm_axis(int(a), len(in_shape)) in relevant for a in axes):
                return {}       # runtime bounds off the head axes: the slice leaves the heads as they are
            # on a head axis, bounds computed from fixed sizes only are as good as constants
            args = [self.bound_value(t) if t is not None and t.name else None for t in node.inputs[1:5]]
            args += [None] * (4 - len(args))
            if any(t is not None and t.name and v is None for t, v in zip(node.inputs[1:5], args)):
                raise FlowFail(node, "Slice bounds on the head axis are computed at run time")
        starts, ends, axes, steps = args
        axes = np.arange(len(starts)) if axes is None else axes
        steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
        out = {}
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = norm_axis(int(a), len(in_shape))
            out[a] = np.arange(in_shape[a])[slice(int(s), int(e), int(st))]
        return out

    def matmul_side(self, node, t, hm: HeadMap, sy, fixed: dict[int, int], role):
        """Map ``hm`` (on MatMul output) into operand ``t``: batch axes broadcast, ``fixed`` maps M/N axes."""
        st = self.shape(t)
        rt, ry = len(st), len(sy)
        cur = hm
        for ax in reversed(hm.axes):
            if ax in fixed:
                continue
            if ax >= ry - 2:      # the other operand's M or N axis: this operand is shared along it
                cur = self.merge_axis(cur, ax)
                continue
            it = ax - (ry - rt)
            if it < 0 or st[it] != sy[ax]:
                cur = self.merge_axis(cur, ax)
                if role in ("k", "v"):       # one K/V head broadcast to several query heads (multi-query)
                    self.broadcast_kv.update(int(u) for u in np.unique(cur.owner) if u >= 0)
        if not cur.axes:
            return
        axes = tuple(fixed[ax] if ax in fixed else ax - (ry - rt) for ax in cur.axes)
        self.assign(t, HeadMap(axes, cur.owner), "up", node, role)

