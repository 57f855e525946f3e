"""Head maps: which axes of a tensor carry heads, which head owns each index there, and the algebra of
moving a map across an op (broadcast, reshape, selection). The types and op sets that the flow, its rules
and the families share.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def broadcast_owner(hm: HeadMap, shape, axes) -> np.ndarray:
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


def regroup(node, src_shape, dst_shape, hm: HeadMap) -> HeadMap:
    """The map of a Reshape's output (``dst_shape``) from that of its input (``src_shape``), or the reverse."""
    groups = reshape_groups(src_shape, dst_shape)
    if groups is None:
        raise FlowFail(node, f"cannot pair the axes of {list(src_shape)} and {list(dst_shape)}")
    owners, axes = [], []
    for gi, gj in groups:
        if not any(a in hm.axes for a in gi):
            continue
        if not gj:
            raise FlowFail(node, "head axis reshaped away")
        full = broadcast_owner(hm, src_shape, tuple(sorted(set(hm.axes) | set(gi))))
        # take this group's slice: index 0 along hm axes outside the group (they stay where they are)
        outside = [a for a in sorted(set(hm.axes) | set(gi)) if a not in gi]
        if outside:
            raise FlowFail(node, "head axes fall in several reshape groups")
        owners.append(full.reshape([dst_shape[a] for a in gj]))
        axes.append(tuple(gj))
    if len(owners) != 1:
        raise FlowFail(node, "head axes fall in several reshape groups")
    return HeadMap(axes[0], owners[0])


def embed(node, out_map: HeadMap, out_shape, in_shape, positions: dict[int, np.ndarray],
           dropped: dict[int, int] | None = None) -> HeadMap:
    """Input map of a selecting op (Split, Slice, Gather): out index i sits at positions[axis][i].

    ``dropped`` maps an input axis removed by a scalar Gather to its index.
    """
    dropped = dropped or {}
    in_rank = len(in_shape)
    out_axes_of_in = [a for a in range(in_rank) if a not in dropped]   # input axis of each output axis
    in_axes = sorted({out_axes_of_in[a] for a in out_map.axes} | set(positions) | set(dropped))
    out_axes_needed = [out_axes_of_in.index(a) for a in in_axes if a not in dropped]
    full = broadcast_owner(out_map, out_shape, tuple(sorted(out_axes_needed)))
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
