"""The head-size axis of every tensor of a block: where each head's D positions lie.

A head map records the head axis; a cut inside heads also needs the axis of the head size. On a merged
axis (F = H * D: the projections' columns, the output projection's rows, [B, S, F] activations) it is the
head axis itself, each head's D positions being the run that it owns. Where the export splits the heads
([B, S, H, D], [B, H, S, D], keys transposed to [B, H, D, T]) it is an axis of its own, found by following
the merged tensors through the block's nodes, both ways: a Reshape splits F into (H, D) or merges it back,
a Transpose moves D, elementwise ops keep it, and a MatMul keeps the D of its right operand's columns
(probabilities x V) and contracts that of its left operand's last axis (Q x Kᵀ). Scores, probabilities
and tensors no rule reaches have none (``None``).

    v_BSF    (2, 5, 32)    head axis 2, owner [0]*8 + [1]*8 ...   -> head-size axis 2 (merged)
    v_BSHD   (2, 5, 4, 8)  head axis 2                            -> 3
    v_BHSD   (2, 4, 5, 8)  Transpose perm (0, 2, 1, 3)            -> 3
    k_BHDT   (2, 4, 8, 5)  Transpose perm (0, 2, 3, 1)            -> 2
    ctx_BHSD (2, 4, 5, 8)  MatMul(probs, v_BHSD)                  -> 3
"""

from __future__ import annotations

import numpy as np

from .headmap import ELEMENTWISE, NORMS, reshape_groups

_KEEP_AXES = ELEMENTWISE | NORMS | {"RotaryEmbedding", "Identity", "Cast", "Dropout", "Expand"}   # Expand: broadcast
# aligns axes from the end, and a head-size axis (of size D, not 1) is never the one it broadcasts


def merged(owner: np.ndarray, head_dim: int) -> bool:
    """Every unit's positions along a 1-D owner come in runs of ``head_dim``."""
    owner = np.asarray(owner).reshape(-1)
    starts = np.flatnonzero(np.diff(owner, prepend=owner[0] - 1))
    lengths = np.diff(list(starts) + [len(owner)])
    units = owner[starts]
    return head_dim > 1 and bool(np.all(lengths[units >= 0] == head_dim))


def head_dim_axes(flow, head_dim: int) -> dict[str, int]:
    """{tensor name: its head-size axis} for the tensors of ``flow`` that have one (see the module
    docstring)."""
    found: dict[str, int] = {}
    for name, hm in flow.maps.items():
        if len(hm.axes) == 1 and hm.owner.ndim == 1 and merged(hm.owner, head_dim):
            found[name] = hm.axes[0]
    nodes = [n for n in flow.node_order if id(n) in flow.nodes]
    for _ in range(4):         # both ways until nothing changes (a block is a short chain)
        before = len(found)
        for node in nodes + nodes[::-1]:
            _step(flow, node, found, head_dim)
        if len(found) == before:
            break
    return found


def _shape(flow, t):
    return flow.shapes.get(t.name) if t is not None else None


def _step(flow, node, found: dict, head_dim: int):
    ins = [t for t in node.inputs if t is not None and t.name in flow.maps]
    outs = [t for t in node.outputs if t.name in flow.maps]
    if not ins or not outs:
        return
    y = outs[0]
    if node.op in ("Reshape", "Flatten"):
        x = node.inputs[0]
        if x.name not in flow.maps:
            return
        for src, dst in ((x, y), (y, x)):
            if src.name in found and dst.name not in found:
                axis = _through_reshape(flow, src, dst, found[src.name], head_dim)
                if axis is not None:
                    found[dst.name] = axis
        return
    if node.op == "Transpose":
        x = node.inputs[0]
        rank = len(_shape(flow, x) or ())
        perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
        if x.name in found and y.name not in found:
            found[y.name] = perm.index(found[x.name])
        elif y.name in found and x.name not in found:
            found[x.name] = perm[found[y.name]]
        return
    if node.op == "MatMul" and len(node.inputs) == 2:
        a, b = node.inputs
        ra, rb, ry = len(_shape(flow, a) or ()), len(_shape(flow, b) or ()), len(_shape(flow, y) or ())
        if b.name in found and found[b.name] == rb - 1 and y.name not in found and a.name not in found:
            found[y.name] = ry - 1                      # probabilities x V: V's columns are the output's
        elif y.name in found and found[y.name] == ry - 1 and b.name in flow.maps and b.name not in found \
                and a.name not in found:
            found[b.name] = rb - 1
        elif a.name in found and found[a.name] == ra - 2 and y.name not in found:
            found[y.name] = ry - 2
        return
    if node.op in ("Unsqueeze", "Squeeze"):       # an axis added or removed in front of the head size
        x = node.inputs[0]
        rx, ry = len(_shape(flow, x) or ()), len(_shape(flow, y) or ())
        if x.name in found and y.name not in found and found[x.name] == rx - 1:
            found[y.name] = ry - 1
        elif y.name in found and x.name not in found and found[y.name] == ry - 1:
            found[x.name] = rx - 1
        return
    if node.op in _KEEP_AXES:
        ry = len(_shape(flow, y) or ())
        for x in ins:
            rx = len(_shape(flow, x) or ())
            if x.name in found and y.name not in found and _shape(flow, x)[found[x.name]] == head_dim:
                found[y.name] = found[x.name] + (ry - rx)
            elif y.name in found and x.name not in found and rx == ry and _shape(flow, x)[found[y.name]] == \
                    _shape(flow, y)[found[y.name]]:
                found[x.name] = found[y.name]


def _through_reshape(flow, src, dst, axis: int, head_dim: int) -> int | None:
    """The head-size axis of ``dst`` from ``src``'s across a Reshape: F split into (H, D) gives the inner
    axis of size D; (H, D) merged into F gives the merged axis; an axis of its own that passes unchanged
    keeps its place in the group."""
    s_shape, d_shape = _shape(flow, src), _shape(flow, dst)
    groups = reshape_groups(s_shape, d_shape)
    if groups is None:
        return None
    d_heads = set(flow.maps[dst.name].axes)
    for gi, gj in groups:
        if axis not in gi:
            continue
        if len(gi) == 1 and len(gj) == 1:
            return gj[0]
        if len(gi) == 1:                 # split: D is the last axis of the group, after the head axis
            inner = [a for a in gj if a not in d_heads]
            return inner[-1] if inner and d_shape[inner[-1]] == head_dim else None
        if len(gj) == 1 and gj[0] in d_heads and merged(flow.maps[dst.name].owner, head_dim):
            return gj[0]                 # merged back into F
        return None
    return None
