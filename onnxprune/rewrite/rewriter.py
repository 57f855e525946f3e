"""Apply a plan to the graph: check everything first, then commit all edits at once.

Nothing that other nodes still read is changed in place: a weight that blocks share is stored once, cut to
what any of them keeps, and read by a Gather where a block keeps less (the model never grows); a shape
expression is rebuilt beside the original, and a per-head tensor shared between blocks (T5's position
bias) is narrowed by a Gather in front of each block. Every initializer not cut keeps its bytes. The unit
of edit is a map on an axis of a tensor (``cut.AxisMap``): keeping heads selects positions, a cut inside the
heads multiplies each head's positions by its matrix.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..block import AttentionBlock
from ..cut import CIRCUITS, SIDES, HeadDims, HeadwiseMap
from ..errors import PlanError, RewriteError
from ..match import shape_expr
from ..match.headdim import FUSED_RMS
from ..model.graph import const_value, identity_source, set_values
from .layouts import ROTATION, Layout, apply_maps, declare_shape, fresh, layouts, period, reroute
from .sites import SITE_PLANNERS

ORT_ATTENTION = "com.microsoft.Attention"     # the fused op whose qkv_hidden_sizes lets Q/K and V widths differ
GQA = "com.microsoft.GroupQueryAttention"     # one head size for Q, K and V: both circuits at one rank
MHA = "com.microsoft.MultiHeadAttention"      # Q, K and V as inputs of their own: V's width may differ
ONNX_ATTENTION = "Attention"                  # ONNX's own (opset 23): the same
FUSED_DIMS = (ORT_ATTENTION, GQA, MHA, ONNX_ATTENTION)     # the fused ops that a cut inside the heads passes

# sites that rewrite a size only: they hold for an axis that a cut inside the heads projects
SIZE_SITES = {"reshape", "expand", "resize", "tile", "head_size"}


def _aliases(t) -> list:
    """``t`` and every tensor that an Identity chain makes of it."""
    found, todo = [], [t]
    while todo:
        cur = todo.pop()
        found.append(cur)
        todo.extend(o for c in cur.outputs if c.op == "Identity" for o in c.outputs)
    return found


class Rewriter:
    def __init__(self, graph: gs.Graph, shapes: dict, values: dict, quantized: bool = False):
        self.graph = graph
        self.quantized = quantized      # a quantized model's float view: a shared weight is cut once, for all
        self.shapes = shapes
        self.values = values
        self.nodes = {n.name: n for n in graph.nodes}
        self.tensors = graph.tensors()
        self.edits: list[Callable[[], None]] = []
        self.changed_initializers: set[str] = set()
        self.io_keep: dict[str, dict[int, np.ndarray]] = {}   # graph inputs/outputs that lose heads
        self._shared: dict[str, list] = {}     # a weight that blocks share -> [(its tensor, kept positions, nodes)]
        self.cuts: dict[str, dict[int, np.ndarray]] = {}   # constant -> {axis that shrinks: kept positions}
        self._gathers: dict[tuple, gs.Variable] = {}   # (tensor, axis, kept positions) -> its one Gather

    def plan(self, block: AttentionBlock, kept_heads, dims=()):
        """Queue every edit that keeping ``kept_heads`` of ``block`` needs, with ``dims`` (``cut.HeadDims``, one
        per circuit) mapped inside the kept heads; nothing is changed until ``commit``."""
        kept_heads = tuple(sorted(kept_heads))
        if not kept_heads:
            raise PlanError(f"block {block.index} ({block.name}): no head left")
        if any(h < 0 or h >= block.num_heads for h in kept_heads):
            raise PlanError(f"block {block.index} ({block.name}) has {block.num_heads} heads; "
                            f"cannot keep {list(kept_heads)}")
        dims = tuple(dims)
        if kept_heads == tuple(range(block.num_heads)) and not dims:
            return
        check_dims(block, dims)
        lays = layouts(block, kept_heads, dims, self.shapes)
        block_nodes = {self.nodes[n].name for n in block.nodes}
        for t in block.tensors:
            lay = lays[t.name]
            tensor = self.tensors[t.name]
            if t.constant and lay.projected and any(c.name not in block_nodes for c in tensor.outputs):
                raise RewriteError(f"block {block.index} ({block.name}): {t.name!r} is shared with other blocks "
                                   "(one layer's weights used by several, as ALBERT does); a cut inside its heads "
                                   "is not supported")
            if t.constant:
                self._plan_constant(tensor, lay, block_nodes)
                self.cuts[t.name] = {ax: idx for ax, idx in lay.keep.items()
                                     if len(idx) != self.shapes[t.name][ax]}
            elif t.cut:
                self._plan_cut(tensor, lay, block_nodes)
            elif t.io:
                self.io_keep[t.name] = dict(lay.keep)
                if t.dim_axis is not None and t.dim_axis not in lay.keep and \
                        lay.new_shape[t.dim_axis] != self.shapes[t.name][t.dim_axis]:
                    self.io_keep[t.name][t.dim_axis] = cache_map(block, t, kept_heads, dims)
                self.edits.append(lambda v=tensor, shape=lay.new_shape: declare_shape(v, shape))
        qk = next((d for d in dims if d.circuit == "qk"), None)
        for table in block.tables:
            self._plan_table(block, table, lays, qk)
        for node_name, i, _ in block.cut_points if qk is not None else ():
            self._plan_cut_point(block, self.nodes[node_name], i, qk)
        for node_name in block.norm_means if qk is not None else ():
            node = self.nodes[node_name]
            if node.op in FUSED_RMS:
                self._plan_fused_norm(block, node, lays, qk)
            else:
                self._plan_norm_mean(block, node, lays)
        for site in block.sites:
            node = self.nodes[site.node]
            if site.kind not in SIZE_SITES and not (site.kind == "attr" and site.op in FUSED_DIMS) \
                    and site.kind not in ("split", "slice") and any(lays[v.name].projected for v in list(node.inputs) + list(node.outputs)
                                                   if v is not None and v.name in lays):
                raise RewriteError(f"{node.op} {node.name!r} picks positions of an axis that a cut inside the "
                                   "heads projects; not supported")
            SITE_PLANNERS[site.kind](self, node, block, lays, kept_heads)

    def _plan_constant(self, tensor, lay: Layout, block_nodes):
        consumers = list(tensor.outputs)
        shared = any(c.name not in block_nodes for c in consumers) or tensor in self.graph.outputs
        if isinstance(tensor, gs.Constant) and not shared:
            self.changed_initializers.add(tensor.name)
            self.edits.append(lambda t=tensor, v=apply_maps(const_value(tensor), lay.maps): set_values(t, v))
            return
        if lay.projected:          # a graph output (shared weights refuse a projection in ``plan``)
            replacement = gs.Constant(f"{tensor.name}__pruned{next(fresh)}", apply_maps(const_value(tensor), lay.maps))
            self.edits.append(lambda t=tensor, r=replacement: reroute(t, r, block_nodes))
            return
        # a weight that several blocks share (ALBERT's one layer, TorchScript's Identity of equal weights): cut
        # once all blocks are planned (``_plan_shared``)
        self._shared.setdefault(identity_source(tensor).name, []).append((tensor, dict(lay.keep), block_nodes))

    def _plan_shared(self):
        """Each weight that blocks share is stored once, cut to the positions that any of its readers keeps:
        the model never grows. Its readers that keep all of those read it as it is (ALBERT's blocks tied by the
        planner: one slice for all), the others a Gather of their positions from it, which ONNX Runtime folds
        into a constant when the session is made. A reader outside the planned blocks (a block that keeps
        every head is not planned) keeps the weight whole."""
        for name, uses in self._shared.items():
            src = self.tensors[name]
            value = const_value(src)
            covered = {(t.name, n) for t, _, nodes in uses for n in nodes}
            whole = src in self.graph.outputs or any((t.name, c.name) not in covered
                                                     for t in _aliases(src) for c in t.outputs if c.op != "Identity")
            axes = sorted({ax for _, keep, _ in uses for ax in keep})
            union = {ax: np.arange(value.shape[ax]) if whole else
                     np.unique(np.concatenate([keep.get(ax, np.arange(value.shape[ax])) for _, keep, _ in uses]))
                     for ax in axes}
            alike = all(len(keep.get(ax, union[ax])) == len(union[ax]) for _, keep, _ in uses for ax in axes)
            if self.quantized and not alike:
                raise RewriteError(f"the quantized weight {name!r} is read by several blocks that keep different "
                                   "heads of it (or one keeps all); its integers are cut once for all its readers: "
                                   "give those blocks the same heads (--ratio ties them)")
            cut = {ax: idx for ax, idx in union.items() if len(idx) < value.shape[ax]}
            for ax, idx in cut.items():
                value = np.take(value, idx, axis=ax)
            if cut and alike and isinstance(src, gs.Constant):     # one cut for every reader: in place, by name
                self.changed_initializers.add(name)
                self.edits.append(lambda t=src, v=np.ascontiguousarray(value): set_values(t, v))
                for tensor, _, _ in uses:
                    self.cuts[tensor.name] = cut
                continue
            stored = gs.Constant(f"{name}__pruned{next(fresh)}", np.ascontiguousarray(value)) if cut else None
            for tensor, keep, nodes in uses:
                source = stored if stored is not None else tensor
                plan = [(ax, np.searchsorted(union[ax], keep[ax])) for ax in axes
                        if ax in keep and len(keep[ax]) < len(union[ax])]
                if not plan:
                    if stored is not None:
                        self.edits.append(lambda t=tensor, r=stored, nodes=nodes: reroute(t, r, nodes))
                    continue
                self.edits.append(lambda t=tensor, src=source, plan=plan, nodes=nodes:
                                  reroute(t, self._narrow(src, [(ax, idx, None) for ax, idx in plan]), nodes))

    def _plan_table(self, block: AttentionBlock, table, lays: dict, qk=None):
        """A cos/sin table that a node of the block multiplies along the head size: the same positions of it
        as the node's output keeps, by a Gather in front of the node (one per table and positions: blocks that
        keep the same positions share it). A rotary op's cache holds one entry per pair: the kept pairs'."""
        node = self.nodes[table.node]
        src = node.inputs[table.input]
        if table.pairs:
            if qk is None:
                return
            if qk.keep is None:
                raise RewriteError(f"block {block.index} ({block.name}): {node.op} {node.name!r} turns the queries "
                                   f"and keys by {src.name!r}; {ROTATION}")
            size = self.shapes[src.name][table.axis]
            keep = np.array([i for i in qk.keep if i < size] if table.pairs == "half" else
                            [i // 2 for i in qk.keep if i % 2 == 0 and i < 2 * size], dtype=np.int64)
            self._gather_input(node, table.input, table.axis, keep)
            return
        y = node.outputs[0]
        t, lay = block.tensor(y.name), lays.get(y.name)
        if lay is None or t.dim_axis is None or lay.new_shape[t.dim_axis] == self.shapes[y.name][t.dim_axis]:
            return
        if t.dim_axis not in lay.keep:
            raise RewriteError(f"block {block.index} ({block.name}): {node.op} {node.name!r} reads {src.name!r} "
                               f"over the head size (a rotary embedding's cos or sin); {ROTATION}")
        self._gather_input(node, table.input, table.axis, lay.keep[t.dim_axis])

    def _plan_cut_point(self, block: AttentionBlock, node, i: int, qk):
        """Where a QK cut starts below a q/k norm (or at the broadcast of one K head): ``node`` reads the kept
        positions of its input ``i`` (a Gather in front), which stays whole above."""
        if qk.keep is None:
            raise RewriteError(f"block {block.index} ({block.name}): the queries and keys pass a norm over the "
                               f"head size; {ROTATION}")
        x = node.inputs[i]
        t = next((t for t in block.tensors if t.name == x.name), None)
        axis = t.dim_axis if t is not None and t.dim_axis is not None else None
        if axis is None:        # the one K head above a broadcast: its head size is its last axis
            axis = len(self.shapes[x.name]) - 1
        pos = np.asarray(t.dim_pos).reshape(-1) if t is not None and t.dim_pos is not None else \
            np.arange(self.shapes[x.name][axis])
        self._gather_input(node, i, axis, np.flatnonzero(np.isin(pos, qk.keep)))

    def _plan_norm_mean(self, block: AttentionBlock, node, lays: dict):
        """An RMS norm's mean of squares over the head size that the QK cut passes: over the r positions kept it
        is D / r times the original's over D with the dropped positions zero, so a Mul by r / D follows it."""
        x, y = node.inputs[0], node.outputs[0]
        lay, axis = lays.get(x.name), block.tensor(x.name).dim_axis
        old = self.shapes[x.name]
        if lay is None or axis is None or lay.new_shape[axis] == old[axis]:
            return
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
        factor = gs.Constant(f"{y.name}__kept_share{next(fresh)}",
                             np.asarray(lay.new_shape[axis] / old[axis], dtype=dtype))

        def apply(n=node, y=y, c=factor):
            mean = gs.Variable(f"{y.name}__over_kept{next(fresh)}", dtype=y.dtype)
            n.outputs[0] = mean
            self.graph.nodes.append(gs.Node("Mul", name=f"{n.name}__kept_share", inputs=[mean, c], outputs=[y]))
        self.edits.append(apply)

    def _plan_fused_norm(self, block: AttentionBlock, node, lays: dict, qk):
        """A fused RMS norm op over the head size that the QK cut passes (GenAI's Gemma 3: SimplifiedLayerNormalization
        over [B, S*H, D]): over the r positions kept, ``x / sqrt(mean_r(x^2) + eps')`` with eps' = eps * D / r is
        sqrt(r / D) times the original's with the dropped positions zero, so its weight keeps the kept positions
        times sqrt(D / r)."""
        x = node.inputs[0]
        t, lay = block.tensor(x.name), lays.get(x.name)
        old = self.shapes[x.name][-1]
        if lay is None or t.dim_axis is None or lay.new_shape[t.dim_axis] == old:
            return
        if qk.keep is None or t.dim_pos is not None:
            raise RewriteError(f"block {block.index} ({block.name}): {node.op} {node.name!r} normalizes the head "
                               f"size; only whole positions in order can be kept through it")
        keep = np.asarray(qk.keep, dtype=np.int64)
        w_factor, eps_factor = norm_rescale(old / len(keep))
        w = const_value(node.inputs[1])
        weight = gs.Constant(f"{node.inputs[1].name}__kept{next(fresh)}",
                             np.ascontiguousarray((w[keep].astype(np.float64) * w_factor).astype(w.dtype)))
        eps = float(node.attrs.get("epsilon", 1e-5)) * eps_factor

        def apply(n=node, w=weight, eps=eps):
            n.inputs[1] = w
            n.attrs["epsilon"] = eps
        self.edits.append(apply)

    def _gather_input(self, node, i: int, axis: int, keep):
        """``node`` reads positions ``keep`` of its input ``i`` along ``axis``: one Gather per tensor, axis and
        positions (blocks that keep the same positions of a shared table share it)."""
        src = node.inputs[i]
        key = (src.name, axis, tuple(int(k) for k in keep))
        out = self._gathers.get(key)
        if out is None:
            out = gs.Variable(f"{src.name}__kept{next(fresh)}", dtype=src.dtype)
            self._gathers[key] = out
            gather = gs.Node("Gather", name=f"{src.name}__gather{next(fresh)}", attrs={"axis": int(axis)},
                             inputs=[src, gs.Constant(f"{src.name}__positions{next(fresh)}",
                                                      np.asarray(keep, dtype=np.int64))], outputs=[out])
            self.edits.append(lambda g=gather: self.graph.nodes.append(g))
        self.edits.append(lambda n=node, i=i, v=out: n.inputs.__setitem__(i, v))

    def _plan_cut(self, tensor, lay: Layout, block_nodes):
        size = self.shapes[tensor.name]
        plan = [(ax, idx, period(idx, size[ax])) for ax, idx in lay.keep.items()]
        self.edits.append(lambda t=tensor, plan=plan: reroute(t, self._narrow(t, plan), block_nodes))

    def _narrow(self, t, plan):
        """Gather the kept heads of ``t`` along each head axis.

        An axis whose kept positions repeat with a period P shorter than the axis (the ``B*H`` axis of
        Bloom's ALiBi tensor) is viewed as [N/P, P] and gathered along P, so that the result is right for
        any batch size, not only the probed one.
        """
        def add(op, inputs, attrs=None):
            dtype = np.int64 if op in ("Shape", "Concat") else t.dtype
            out = gs.Variable(f"{t.name}__{op.lower()}{next(fresh)}", dtype=dtype)
            self.graph.nodes.append(gs.Node(op, name=f"{t.name}__{op.lower()}{next(fresh)}", attrs=attrs or {},
                                            inputs=inputs, outputs=[out]))
            return out

        def const(values):
            return gs.Constant(f"{t.name}__c{next(fresh)}", np.asarray(values, dtype=np.int64))

        cur = t
        for ax, idx, every in plan:
            if every is None:
                cur = add("Gather", [cur, const(idx)], {"axis": int(ax)})
                continue
            rank = len(self.shapes[t.name])
            parts = [const([-1, every])]
            if ax:
                parts.insert(0, add("Shape", [cur], {"start": 0, "end": int(ax)}))
            if ax + 1 < rank:
                parts.append(add("Shape", [cur], {"start": int(ax) + 1}))
            split = add("Reshape", [cur, add("Concat", parts, {"axis": 0})])
            picked = add("Gather", [split, const(idx[idx < every])], {"axis": int(ax) + 1})
            back = ([parts[0]] if ax else []) + [const([-1])] + ([parts[-1]] if ax + 1 < rank else [])
            cur = add("Reshape", [picked, add("Concat", back, {"axis": 0})])
        return cur

    def dim_change(self, layouts, dim) -> tuple[int, int] | None:
        """(old, new) size of a runtime size Shape(t)[axis] that shrinks with the heads, else None."""
        lay = layouts.get(dim.tensor)
        if lay is None:
            return None
        old, new = self.shapes[dim.tensor][dim.axis], lay.new_shape[dim.axis]
        return None if old == new else (old, new)

    def swap_vector(self, node, index: int, changes: dict):
        """Rebuild ``node``'s shape-like input ``index`` with ``changes`` now (new nodes only); swap it in
        at commit."""
        if not changes:
            return
        try:
            new_vec = shape_expr.rebuild(self.graph, node.inputs[index], changes, self.shapes, self.values)
        except ValueError as exc:
            raise RewriteError(f"{node.op} {node.name!r}: {exc}") from None
        self.edits.append(lambda n=node, v=new_vec, i=index: n.inputs.__setitem__(i, v))

    def commit(self):
        self._plan_shared()
        self._shared.clear()
        for edit in self.edits:
            edit()
        self.edits.clear()


def norm_rescale(share: float) -> tuple[float, float]:
    """(weight factor, epsilon factor) of an RMS norm op that now sees r of its D positions, ``share`` = D / r."""
    return float(np.sqrt(share)), float(share)


def check_dims(block: AttentionBlock, dims: tuple):
    """What a cut inside the heads cannot be written into yet, refused with the reason (``dims``: ``cut.HeadDims``
    of the block, or the names of its circuits, before anything is fitted)."""
    for d in dims:
        circuit = getattr(d, "circuit", d)
        if circuit not in CIRCUITS:
            raise PlanError(f"block {block.index} ({block.name}): no cut inside the heads of circuit "
                            f"{circuit!r}; known: {', '.join(CIRCUITS)}")
        if block.one_head_size and {getattr(x, "circuit", x) for x in dims} != {"qk", "ov"}:
            raise RewriteError(f"block {block.index} ({block.name}): GroupQueryAttention has one head size for Q, K "
                               "and V (and its KV cache): cut both circuits to one rank (--qk-dims and --v-dims "
                               "alike)")
        fused = sorted({s.op.rsplit(".", 1)[-1] for s in block.sites
                        if s.kind == "attr" and s.op not in FUSED_DIMS})
        if fused:
            raise RewriteError(f"block {block.index} ({block.name}): a fused attention op ({', '.join(fused)}: one "
                               "head size for Q, K and V, its attributes and KV cache); a cut inside its heads is "
                               "not supported there yet (ONNX Runtime's Attention, with its qkv_hidden_sizes, its "
                               "MultiHeadAttention and ONNX's Attention are)")
        # a table shared with other blocks (T5's position bias) holds heads, not their sizes: it is narrowed
        # as before. A shared tensor with a head size would need its size cut outside the block; a KV cache
        # (a graph input or output) changes its declared size, and the proof maps it (``cache_map``)
        where = next((t.name for t in block.tensors if (t.cut and t.dim_axis is not None) or
                      (t.io and t.dim_axis is None and set(t.roles) & set().union(*SIDES[circuit]))), None)
        if where is not None:
            raise RewriteError(f"block {block.index} ({block.name}): {where!r} carries the heads out of the "
                               "block (a shared table, or a KV cache whose head size the matcher could not "
                               "follow); a cut inside its heads is not supported")
        for role in sorted(set().union(*SIDES[circuit])):
            if circuit == "qk" and block.qk_below(role):
                continue            # the cut starts below the q/k norms: the projections stay whole
            proj = block.projection(role)
            t = next((t for t in block.tensors if proj is not None and t.name == proj.weight), None)
            if t is None or t.dim_axis is None:
                why = ("one KV head serves every query head (multi-query attention), and its head size could "
                       "not be followed up to a projection of its own (one packed QKV projection, as Falcon's, or "
                       "a norm or rotary embedding on the way)" if block.num_kv_heads == 1 and role in ("k", "v")
                       else "its weight's head-size positions are not known")
                raise RewriteError(f"block {block.index} ({block.name}): a cut inside the heads of its "
                                   f"{circuit.upper()} circuit needs the {role} projection's head-size axis; "
                                   f"{why}")


def cache_map(block: AttentionBlock, t, kept_heads, dims) -> HeadwiseMap:
    """The map of a KV cache input or output of ``block`` (K or V of each kept KV head) under ``dims``: its
    circuit's first side, ``A`` of each KV head, as the cut's K and V are ``k A`` and ``v A``."""
    role = next(iter(t.roles & {"k", "v"}), None)
    d = next((d for d in dims if role in SIDES[d.circuit][0]), None)
    if d is None or len(t.axes) != 1:
        raise RewriteError(f"block {block.index} ({block.name}): the KV cache {t.name!r} changes its head size, "
                           "but no cut of K or V says how")
    kept = block.kept_kv_heads(kept_heads)
    # the one KV head of GroupQueryAttention(kv_num_heads=1) has its D on the merged axis of one unit: its head
    # axis is the cache's [B, 1, T, D] second
    axis = 1 if t.axes == (t.dim_axis,) else t.axes[0]
    return HeadwiseMap(axis, tuple(np.asarray(d.a[g], np.float64) for g in kept))


def check_cut(block: AttentionBlock, circuits, shapes: dict):
    """Refuse, before anything is fitted, a cut inside the heads of ``circuits`` that the rewrite of ``block``
    could not carry: ``check_dims`` and the tensors' layouts under placeholder maps (the first r = D - 1
    positions of every head)."""
    check_dims(block, circuits)
    placeholders = []
    for c in circuits:
        if c == "qk" and block.selects_dims:        # whole positions: all but the last rotary pair
            drop = set(block.pairs[-1]) if block.pairs else {block.head_dim - 1}
            placeholders.append(HeadDims.select(c, block.head_dim, [i for i in range(block.head_dim) if i not in drop],
                                                len(block.kv_groups), block.num_heads))
            continue
        rank = max(1, block.head_dim - 1)
        if block.one_head_size and placeholders:       # one head size: the QK one's
            rank = placeholders[0].rank
        eye = np.eye(block.head_dim, rank, dtype=np.float32) * 0.5       # a projection, not a selection
        placeholders.append(HeadDims(c, {g: eye for g in range(len(block.kv_groups))},
                                     {h: eye for h in range(block.num_heads)}))
    layouts(block, tuple(range(block.num_heads)), tuple(placeholders), shapes)
