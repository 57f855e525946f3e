"""Head-axis flow: find every tensor of an attention block that carries the head axis, and how.

Shape key used in comments: B batch, S query length, T key length, H query heads, Hkv KV heads,
G = H / Hkv query heads per KV head, D head size, F = H * D.

A *head map* says, for a tensor, which of its axes carry heads and which head owns each index there::

    q_BHSD   axes (1,)   owner [0, 1, 2, 3]                      # H = 4
    q_BSF    axes (2,)   owner [0]*D + [1]*D + [2]*D + [3]*D       # after the Reshape, merged
    qkv_BS3F axes (2,)   owner q-part, k-part, v-part side by side # packed projection before Split

Owner values index a table of *units*: a unit is the set of attention heads that one index serves. For
plain multi-head attention unit u = {u}. Where K/V are broadcast to the query heads (repeat_kv's
Expand, or GQA inside the Attention op), a KV head serves a whole group: unit = {g*G, ..., g*G + G-1}.
An index is kept after pruning when its unit meets the kept heads. -1 marks an index that belongs to no
head of this block (it is always kept).

The flow starts at an attention core (Softmax between two MatMuls, or an ``Attention`` op) and runs
op by op, upward to the weights and downward to the output projection, with one rule per op type. A rule
that meets something it does not understand raises ``FlowFail`` with the node and the reason, which
becomes the explained miss that ``onnxprune inspect`` prints.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


class FlowFail(Exception):
    def __init__(self, node, reason: str):
        super().__init__(reason)
        self.node = node
        self.reason = reason


@dataclass(frozen=True)
class HeadMap:
    axes: tuple[int, ...]
    owner: np.ndarray = field(compare=False)

    def __post_init__(self):
        assert self.owner.ndim == len(self.axes), (self.axes, self.owner.shape)


ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Cast", "CastLike", "Neg", "Sqrt", "Reciprocal", "Exp",
    "Log", "Tanh", "Erf", "Relu", "Sigmoid", "Identity", "Abs", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Not", "And", "Or", "IsNaN", "IsInf", "Max", "Min", "Mod", "Sign", "Floor", "Ceil",
    "Round", "Sin", "Cos", "Softmax", "LogSoftmax", "Dropout", "Clip", "Gelu", "FastGelu", "BiasGelu",
}
NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}
SHAPE_READERS = {"Shape", "Size"}
# ops that move the head axis without mixing heads, and ops that pick positions out of it; used to follow a
# reader of a block tensor that sits outside the flow (Falcon's K/V columns of the fused QKV view)
MOVERS = {"Transpose", "Identity", "Cast"}
SELECTORS = {"Gather", "GatherND", "Slice"}
# ops that carry a KV cache, unchanged, from the attention to a ``present`` graph output
STACKERS = MOVERS | {"Unsqueeze", "Concat"}


def const_value(t) -> np.ndarray | None:
    """The value of a constant tensor: an initializer or the output of a Constant node. Data in an external
    file (``io.attach_external``) is read from disk each time, never kept."""
    if isinstance(t, gs.Constant):
        lazy = getattr(t, "_values", None)
        if getattr(lazy, "base_dir", None):
            from ..io import read_external
            return read_external(lazy.tensor, lazy.base_dir)
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Identity" and t.inputs[0].inputs:
        return const_value(t.inputs[0].inputs[0])    # TorchScript shares equal weights through Identity
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        if "value" in attrs:
            return np.asarray(attrs["value"].values)
        for key in ("value_ints", "value_floats", "value_int", "value_float"):
            if key in attrs:
                return np.asarray(attrs[key])
    return None


def is_const(t) -> bool:
    if len(t.inputs) == 1 and t.inputs[0].op == "Identity" and t.inputs[0].inputs:
        return is_const(t.inputs[0].inputs[0])
    return isinstance(t, gs.Constant) or (len(t.inputs) == 1 and t.inputs[0].op == "Constant")


def _as_set(role) -> set:
    if not role:
        return set()
    return {role} if isinstance(role, str) else set(role)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _full(hm: HeadMap, shape, axes) -> np.ndarray:
    """Owner over ``axes`` (a superset of hm.axes), broadcast along the axes hm does not hold."""
    owner = hm.owner
    cur = list(hm.axes)
    for ax in axes:
        if ax not in cur:
            pos = sum(1 for c in cur if c < ax)
            owner = np.repeat(np.expand_dims(owner, pos), shape[ax], axis=pos)
            cur.insert(pos, ax)
    order = [cur.index(a) for a in axes]
    return np.transpose(owner, order)


def reshape_groups(in_shape, out_shape):
    """Pair up runs of axes with equal products: [B,S,F] -> [B,S,H,D] gives (0)(0), (1)(1), (2)(2,3)."""
    groups, i, j = [], 0, 0
    n, m = len(in_shape), len(out_shape)
    while i < n or j < m:
        gi, gj, pi, pj = [], [], 1, 1
        if i < n:
            gi.append(i); pi *= in_shape[i]; i += 1
        if j < m:
            gj.append(j); pj *= out_shape[j]; j += 1
        while pi != pj:
            if pi < pj and i < n:
                gi.append(i); pi *= in_shape[i]; i += 1
            elif pj < pi and j < m:
                gj.append(j); pj *= out_shape[j]; j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


class Flow:
    """One attention block's head flow. Call ``start_*`` once, then ``run()``."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple], values: dict[str, np.ndarray]):
        self.graph = graph
        self.shapes = shapes
        self.values = values
        self.maps: dict[str, HeadMap] = {}
        self.direction: dict[str, str] = {}
        self.roles: dict[str, set] = {}
        self.tensors: dict[str, object] = {}
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

    def _add_node(self, node):
        if id(node) not in self.nodes:
            self.nodes[id(node)] = node
            self.node_order.append(node)

    def _merge(self, t, a: HeadMap, b: HeadMap, node) -> HeadMap:
        shape = self.shape(t)
        axes = tuple(sorted(set(a.axes) | set(b.axes)))
        oa, ob = _full(a, shape, axes), _full(b, shape, axes)
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
                owner = np.squeeze(first, axis=pos)
                del axes[pos]
        if not axes or np.all(owner == -1):
            return None
        return HeadMap(tuple(axes), owner)

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
        new = hm if old is None else self._merge(t, old, hm, node)
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
        self._add_node(node)
        for i, inp in enumerate(node.inputs):
            if inp is not None and inp.name and is_const(inp):
                self.const_uses.setdefault(inp.name, []).append((node, i))

    def start_softmax(self, node):
        """Softmax over the last axis of scores_BHST: axis 1 carries the H heads."""
        x, y = node.inputs[0], node.outputs[0]
        shape = self.shape(x)
        if len(shape) != 4:
            raise FlowFail(node, f"attention scores are {len(shape)}-D {list(shape)}; expected [B, H, S, T]")
        if _norm_axis(node.attrs.get("axis", -1), 4) != 3:
            raise FlowFail(node, "Softmax is not over the last axis")
        hm = HeadMap((1,), np.array([self.unit({h}) for h in range(shape[1])]))
        self._add_node(node)
        self.assign(x, hm, "up", node, "s")
        self.assign(y, hm, "down", node, "s")
        return shape[1]

    def start_attention_op(self, node):
        """ONNX Attention (opset 23+): Q [B,H,S,D] or [B,S,H*D]; K/V with Hkv heads; Y like Q."""
        q, k, v = node.inputs[:3]
        if len(node.inputs) > 4 and any(t is not None and t.name for t in node.inputs[4:6]):
            raise FlowFail(node, "Attention with past_key/past_value inputs (KV cache) is not supported yet")
        qs, ks = self.shape(q), self.shape(k)
        if len(qs) == 4:
            num_heads, num_kv = qs[1], ks[1]
        else:
            if "q_num_heads" not in node.attrs or "kv_num_heads" not in node.attrs:
                raise FlowFail(node, "3-D Attention without q_num_heads/kv_num_heads attributes")
            num_heads, num_kv = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
            self.sites.append(("attr", node))
        if num_kv < 1 or num_heads % num_kv:
            raise FlowFail(node, f"{num_heads} query heads do not split into {num_kv} KV heads")
        group = num_heads // num_kv
        q_units = np.array([self.unit({h}) for h in range(num_heads)])
        kv_units = np.array([self.unit(range(g * group, (g + 1) * group)) for g in range(num_kv)])

        def head_map(units, shape):
            if len(shape) == 4:
                return HeadMap((1,), units)
            d = shape[2] // len(units)
            return HeadMap((2,), np.repeat(units, d))

        self._add_node(node)
        self.assign(q, head_map(q_units, qs), "up", node, "q")
        self.assign(k, head_map(kv_units, ks), "up", node, "k")
        self.assign(v, head_map(kv_units, self.shape(v)), "up", node, "v")
        y = node.outputs[0]
        self.assign(y, head_map(q_units, self.shape(y)), "down", node, "o")
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        if mask is not None and mask.name:
            scores = (qs[0], num_heads, self.shape(q)[-2] if len(qs) == 4 else qs[1], ks[-2] if len(ks) == 4
                      else ks[1])
            self._side_input(node, mask, HeadMap((1,), q_units), scores, role="s")
        for extra in node.outputs[1:]:
            if extra.name and extra.outputs:
                raise FlowFail(node, f"Attention output {extra.name!r} (present KV or qk output) is used; "
                                     "not supported yet")
        return num_heads

    # ------------------------------------------------------------------ main loop
    def run(self):
        while self.queue:
            t, direction = self.queue.popleft()
            if direction == "up":
                if is_const(t):
                    continue
                if not t.inputs:         # a graph input with heads (a KV cache): re-declared
                    self.io.add(t.name)
                    continue
                self._visit(t.inputs[0], "up", t)
            else:
                if any(o is t for o in self.graph.outputs):   # present KV, attention probabilities
                    self.io.add(t.name)
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
                    self._add_node(node)
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
            if idx is None or _norm_axis(node.attrs.get("axis", 0), rank) != ax:
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
        self._add_node(node)
        for i, inp in enumerate(node.inputs):
            if inp is not None and is_const(inp):
                uses = self.const_uses.setdefault(inp.name, [])
                if (node, i) not in uses:
                    uses.append((node, i))
        handler = getattr(self, f"_op_{node.op}", None)
        if handler is None:
            if node.op in ELEMENTWISE:
                handler = self._elementwise
            elif node.op in NORMS:
                handler = self._norm
            else:
                raise FlowFail(node, f"{node.op} node {node.name!r} touches a tensor with the head axis "
                                     f"({trigger.name!r}); no rule for {node.op}")
        handler(node, direction, trigger)

    # ------------------------------------------------------------------ rules
    def _side_input(self, node, t, out_map: HeadMap, out_shape, role):
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

    def _data_io(self, node):
        if node.op == "Dropout":
            return node.inputs[:1], node.outputs[:1]
        if node.op == "Clip":
            return node.inputs[:1], node.outputs[:1]
        return [t for t in node.inputs if t is not None and t.name], node.outputs[:1]

    def _elementwise(self, node, direction, trigger):
        ins, outs = self._data_io(node)
        out = outs[0]
        out_shape = self.shape(out)
        if direction == "down":
            in_shape = self.shape(trigger)
            hm = self.maps[trigger.name]
            offset = len(out_shape) - len(in_shape)
            for ax in hm.axes:
                if in_shape[ax] != out_shape[ax + offset]:
                    raise FlowFail(node, f"{node.op} broadcasts {trigger.name!r} along its head axis")
            self.assign(out, HeadMap(tuple(a + offset for a in hm.axes), hm.owner), "down", node,
                        self.role_of(trigger))
        hm = self.maps.get(out.name)
        if hm is None:
            return
        if node.op in ("Softmax", "LogSoftmax"):
            axis = _norm_axis(node.attrs.get("axis", -1), len(out_shape))
            if axis in hm.axes:
                raise FlowFail(node, f"{node.op} normalises over the head axis")
        for t in ins:
            if t is not trigger:
                self._side_input(node, t, hm, out_shape, self.role_of(out))

    def _norm(self, node, direction, trigger):
        x = node.inputs[0]
        rank = len(self.shape(x))
        axis = _norm_axis(node.attrs.get("axis", -1), rank)
        known = self.maps.get(trigger.name)
        if known and any(a >= axis for a in known.axes):
            raise FlowFail(node, f"{node.op} normalises over the head axis")
        if trigger is not x and direction == "down":
            raise FlowFail(node, f"{node.op} scale or bias carries the head axis")
        if direction == "down":
            self.assign(node.outputs[0], known, "down", node, self.role_of(x))
        else:
            self.assign(x, self.maps[node.outputs[0].name], "up", node, self.role_of(node.outputs[0]))

    def _op_Transpose(self, node, direction, trigger):
        x, y = node.inputs[0], node.outputs[0]
        rank = len(self.shape(x))
        perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
        if direction == "up":
            hm = self.maps[y.name]
            self.assign(x, HeadMap(tuple(perm[a] for a in hm.axes), hm.owner), "up", node, self.role_of(y))
        else:
            hm = self.maps[x.name]
            self.assign(y, HeadMap(tuple(perm.index(a) for a in hm.axes), hm.owner), "down", node,
                        self.role_of(x))

    def _regroup(self, node, src, dst, hm: HeadMap) -> HeadMap:
        src_shape, dst_shape = self.shape(src), self.shape(dst)
        groups = reshape_groups(src_shape, dst_shape)
        if groups is None:
            raise FlowFail(node, f"cannot pair the axes of {list(src_shape)} and {list(dst_shape)}")
        owners, axes = [], []
        for gi, gj in groups:
            if not any(a in hm.axes for a in gi):
                continue
            if not gj:
                raise FlowFail(node, "head axis reshaped away")
            full = _full(hm, src_shape, tuple(sorted(set(hm.axes) | set(gi))))
            # take this group's slice: index 0 along hm axes outside the group (they stay where they are)
            outside = [a for a in sorted(set(hm.axes) | set(gi)) if a not in gi]
            if outside:
                raise FlowFail(node, "head axes fall in several reshape groups")
            owners.append(full.reshape([dst_shape[a] for a in gj]))
            axes.append(tuple(gj))
        if len(owners) != 1:
            raise FlowFail(node, "head axes fall in several reshape groups")
        return HeadMap(axes[0], owners[0])

    def _op_Reshape(self, node, direction, trigger):
        x, y = node.inputs[0], node.outputs[0]
        if trigger is not x and direction == "down":
            raise FlowFail(node, "Reshape shape input carries the head axis")
        if direction == "up":
            self.assign(x, self._regroup(node, y, x, self.maps[y.name]), "up", node, self.role_of(y))
        else:
            self.assign(y, self._regroup(node, x, y, self.maps[x.name]), "down", node, self.role_of(x))
        if ("reshape", node) not in self.sites:
            self.sites.append(("reshape", node))

    _op_Flatten = _op_Reshape

    def _axes_arg(self, node, rank):
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
            val = const_value(node.inputs[1])
            if val is None:
                raise FlowFail(node, f"{node.op} axes are computed at run time")
            return [_norm_axis(int(a), rank) for a in np.atleast_1d(val)]
        if "axes" in node.attrs:
            return [_norm_axis(int(a), rank) for a in node.attrs["axes"]]
        return None

    def _op_Unsqueeze(self, node, direction, trigger):
        x, y = node.inputs[0], node.outputs[0]
        out_rank = len(self.shape(y))
        added = self._axes_arg(node, out_rank)
        kept = [a for a in range(out_rank) if a not in added]     # kept[i] = output axis of input axis i
        if direction == "up":
            hm = self.maps[y.name]
            if any(a in added for a in hm.axes):
                raise FlowFail(node, "Unsqueeze adds the head axis")
            self.assign(x, HeadMap(tuple(kept.index(a) for a in hm.axes), hm.owner), "up", node, self.role_of(y))
        else:
            hm = self.maps[x.name]
            self.assign(y, HeadMap(tuple(kept[a] for a in hm.axes), hm.owner), "down", node, self.role_of(x))

    def _op_Squeeze(self, node, direction, trigger):
        x, y = node.inputs[0], node.outputs[0]
        in_shape = self.shape(x)
        removed = self._axes_arg(node, len(in_shape))
        if removed is None:
            removed = [a for a, d in enumerate(in_shape) if d == 1]
        kept = [a for a in range(len(in_shape)) if a not in removed]   # kept[j] = input axis of output axis j
        if direction == "up":
            hm = self.maps[y.name]
            self.assign(x, HeadMap(tuple(kept[a] for a in hm.axes), hm.owner), "up", node, self.role_of(y))
        else:
            hm = self.maps[x.name]
            if any(a in removed for a in hm.axes):
                raise FlowFail(node, "Squeeze removes the head axis")
            self.assign(y, HeadMap(tuple(kept.index(a) for a in hm.axes), hm.owner), "down", node,
                        self.role_of(x))

    def _op_Expand(self, node, direction, trigger):
        x, y = node.inputs[0], node.outputs[0]
        if direction == "up":
            sx, sy = self.shape(x), self.shape(y)
            off = len(sy) - len(sx)
            self.copy_axes[y.name] = tuple(a for a in self.maps[y.name].axes
                                           if a - off < 0 or (sx[a - off] == 1 and sy[a] > 1))
            self._side_input(node, x, self.maps[y.name], sy, self.role_of(y))
        else:
            if trigger is not x:
                raise FlowFail(node, "Expand shape input carries the head axis")
            hm = self.maps[x.name]
            offset = len(self.shape(y)) - len(self.shape(x))
            self.assign(y, HeadMap(tuple(a + offset for a in hm.axes), hm.owner), "down", node, self.role_of(x))
        if ("expand", node) not in self.sites:
            self.sites.append(("expand", node))

    def _embed(self, node, out_map: HeadMap, out_shape, in_shape, positions: dict[int, np.ndarray],
               dropped: dict[int, int] | None = None) -> HeadMap:
        """Input map of a selecting op (Split, Slice, Gather): out index i sits at positions[axis][i].

        ``dropped`` maps an input axis removed by a scalar Gather to its index.
        """
        dropped = dropped or {}
        in_rank = len(in_shape)
        out_axes_of_in = [a for a in range(in_rank) if a not in dropped]   # input axis of each output axis
        in_axes = sorted({out_axes_of_in[a] for a in out_map.axes} | set(positions) | set(dropped))
        out_axes_needed = [out_axes_of_in.index(a) for a in in_axes if a not in dropped]
        full = _full(out_map, out_shape, tuple(sorted(out_axes_needed)))
        owner = np.full([in_shape[a] for a in in_axes], -1, dtype=np.int64)
        index = []
        for a in in_axes:
            if a in dropped:
                index.append(np.array([dropped[a]]))
            elif a in positions:
                index.append(positions[a])
            else:
                index.append(np.arange(in_shape[a]))
        src = full
        for pos, a in enumerate(in_axes):
            if a in dropped:
                src = np.expand_dims(src, pos)
        owner[np.ix_(*index)] = src
        return HeadMap(tuple(in_axes), owner)

    def _op_Split(self, node, direction, trigger):
        x = node.inputs[0]
        in_shape = self.shape(x)
        axis = _norm_axis(node.attrs.get("axis", 0), len(in_shape))
        sizes = [self.shape(o)[axis] for o in node.outputs]
        if direction == "down":
            raise FlowFail(node, "Split of a tensor that already carries the head axis")
        offsets = np.cumsum([0] + sizes)
        for k, out in enumerate(node.outputs):
            if out.name in self.maps:
                pos = {axis: np.arange(offsets[k], offsets[k + 1])}
                self.assign(x, self._embed(node, self.maps[out.name], self.shape(out), in_shape, pos),
                            "up", node, self.role_of(out))
        if ("split", node) not in self.sites:
            self.sites.append(("split", node))

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
            if relevant is None or any(_norm_axis(int(a), len(in_shape)) in relevant for a in axes):
                raise FlowFail(node, "Slice bounds on the head axis are computed at run time")
            return {}
        starts, ends, axes, steps = args
        axes = np.arange(len(starts)) if axes is None else axes
        steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
        out = {}
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = _norm_axis(int(a), len(in_shape))
            out[a] = np.arange(in_shape[a])[slice(int(s), int(e), int(st))]
        return out

    def _op_Slice(self, node, direction, trigger):
        x, y = node.inputs[0], node.outputs[0]
        if trigger is not x and direction == "down":
            raise FlowFail(node, "Slice bounds carry the head axis")
        if direction == "up":
            out_map = self.maps[y.name]
            pos = self.slice_positions(node, set(out_map.axes))
            pos = {a: p for a, p in pos.items() if a in out_map.axes or len(p) != self.shape(x)[a]}
            self.assign(x, self._embed(node, out_map, self.shape(y), self.shape(x), pos), "up", node,
                        self.role_of(y))
        else:
            hm = self.maps[x.name]
            pos = self.slice_positions(node, set(hm.axes))
            for a in hm.axes:
                if a in pos and len(pos[a]) != self.shape(x)[a]:
                    raise FlowFail(node, "Slice of a tensor along its head axis")
            self.assign(y, hm, "down", node, self.role_of(x))
        if ("slice", node) not in self.sites:
            self.sites.append(("slice", node))

    def _op_Gather(self, node, direction, trigger):
        data, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
        in_shape, idx_shape = self.shape(data), self.shape(idx)
        axis = _norm_axis(node.attrs.get("axis", 0), len(in_shape))
        if trigger is idx:
            raise FlowFail(node, "Gather indices carry the head axis")
        k = len(idx_shape)
        # output axes: data[:axis] + idx axes + data[axis+1:]

        def out_to_in(a):
            if a < axis:
                return a
            if a >= axis + k:
                return a - k + 1
            return None

        if direction == "up":
            hm = self.maps[y.name]
            if any(out_to_in(a) is None for a in hm.axes):
                raise FlowFail(node, "Gather indices carry the head axis")
            val = const_value(idx)
            if val is not None and k == 0:
                dropped = {axis: int(val) % in_shape[axis]}
                self.assign(data, self._embed(node, hm, self.shape(y), in_shape, {}, dropped), "up", node,
                            self.role_of(y))
            else:
                self.assign(data, HeadMap(tuple(out_to_in(a) for a in hm.axes), hm.owner), "up", node,
                            self.role_of(y))
        else:
            hm = self.maps[data.name]
            if axis in hm.axes:
                raise FlowFail(node, "Gather along the head axis")
            in_to_out = {a: (a if a < axis else a + k - 1) for a in range(len(in_shape)) if a != axis}
            self.assign(y, HeadMap(tuple(in_to_out[a] for a in hm.axes), hm.owner), "down", node,
                        self.role_of(data))
        if ("gather", node) not in self.sites:
            self.sites.append(("gather", node))

    def _op_Concat(self, node, direction, trigger):
        y = node.outputs[0]
        out_shape = self.shape(y)
        axis = _norm_axis(node.attrs["axis"], len(out_shape))
        if direction == "down":
            hm = self.maps[trigger.name]
            if axis in hm.axes:
                raise FlowFail(node, "Concat along the head axis")
            self.assign(y, hm, "down", node, self.role_of(trigger))
        hm = self.maps.get(y.name)
        if hm is None:
            return
        offset = 0
        for t in node.inputs:
            size = self.shape(t)[axis]
            if axis in hm.axes:
                pos = hm.axes.index(axis)
                owner = np.take(hm.owner, np.arange(offset, offset + size), axis=pos)
                part = HeadMap(hm.axes, owner)
            else:
                part = hm
            offset += size
            if t is not trigger:
                self.assign(t, part, "up", node, self.role_of(y))
        if axis in hm.axes and ("concat", node) not in self.sites:
            self.sites.append(("concat", node))

    def _op_MatMul(self, node, direction, trigger):
        a, b = node.inputs[:2]
        y = node.outputs[0]
        sa, sb, sy = self.shape(a), self.shape(b), self.shape(y)
        ra, rb, ry = len(sa), len(sb), len(sy)
        if ra < 2 or rb < 2:
            raise FlowFail(node, "MatMul with a 1-D operand on the head path")
        core = not is_const(a) and not is_const(b)
        if direction == "up":
            hm = self.maps[y.name]
            role = self.role_of(y)
            ra_role, rb_role = ("q", "k") if core and "s" in role else (role, role)
            a_axes = {ax: ra - 2 for ax in hm.axes if ax == ry - 2}
            b_axes = {ax: rb - 1 for ax in hm.axes if ax == ry - 1}
            self._matmul_side(node, a, hm, sy, a_axes, ra_role)
            self._matmul_side(node, b, hm, sy, b_axes, rb_role)
            return
        hm = self.maps[trigger.name]
        if trigger is a:
            role = self.role_of(a)
            contracted = ra - 1 in hm.axes
            if contracted:
                if len(hm.axes) > 1:
                    raise FlowFail(node, "MatMul contracts a tensor with several head axes")
                self.assign(b, HeadMap((rb - 2,), hm.owner), "up", node, "o")
                self.contractions.append((node, b.name))
                return
            out_axes = {ax + (ry - ra): ax for ax in hm.axes}
            self.assign(y, HeadMap(tuple(out_axes), hm.owner), "down", node,
                        "o" if core and "s" in role else role)
            if core:
                self._matmul_side(node, b, self.maps[y.name], sy, {}, "v" if "s" in role else role)
        else:
            raise FlowFail(node, "MatMul whose right operand carries the head axis downstream")

    def _matmul_side(self, node, t, hm: HeadMap, sy, fixed: dict[int, int], role):
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

    def _op_Gemm(self, node, direction, trigger):
        a, b = node.inputs[:2]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        y = node.outputs[0]
        ta, tb = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
        if direction == "up":
            hm = self.maps[y.name]
            role = self.role_of(y)
            if 0 in hm.axes:
                raise FlowFail(node, "Gemm rows carry the head axis")
            self.assign(b, HeadMap((0 if tb else 1,), hm.owner), "up", node, role)
            if c is not None and c.name:
                self._side_input(node, c, hm, self.shape(y), role)
            return
        if trigger is not a:
            raise FlowFail(node, "Gemm weight carries the head axis downstream")
        hm = self.maps[a.name]
        if hm.axes != ((0,) if ta else (1,)):
            raise FlowFail(node, "Gemm input carries the head axis on its rows")
        self.assign(b, HeadMap((1 if tb else 0,), hm.owner), "up", node, "o")
        self.contractions.append((node, b.name))

    def _op_RotaryEmbedding(self, node, direction, trigger):
        """X [B,H,S,D] or [B,S,H*D] rotated per position; cos/sin caches and positions carry no heads."""
        x, y = node.inputs[0], node.outputs[0]
        if trigger is not x and direction == "down":
            raise FlowFail(node, "RotaryEmbedding cache carries the head axis")
        src, dst, d = (y, x, "up") if direction == "up" else (x, y, "down")
        hm = self.maps[src.name]
        if len(self.shape(x)) == 3:
            if node.attrs.get("num_heads"):
                if ("attr", node) not in self.sites:
                    self.sites.append(("attr", node))
            elif node.domain != "com.microsoft" or node.attrs.get("rotary_embedding_dim"):
                raise FlowFail(node, "3-D RotaryEmbedding without num_heads")
            # else ORT's op takes the head size from the cos cache and the head count from the width
        self.assign(dst, hm, d, node, self.role_of(src))

    def _op_Attention(self, node, direction, trigger):
        if node.domain not in (None, "", "ai.onnx"):
            raise FlowFail(node, f"{node.domain}.Attention is matched by the fused-op matcher")
        raise FlowFail(node, "a second Attention op inside one block")
