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

A rotary embedding slices the head size and puts it back together (Llama's rotate-half: ``x[..., :D/2]``,
``x[..., D/2:]``, ``Concat(-x2, x1)``): a Slice or Concat along the axis keeps it, and each such tensor records
which head-size positions its indices hold. ``rotary.dim_positions`` reads from those the rotary pairs and the
cos/sin tables; ``qknorm.below_norms`` where a QK cut starts below q/k norms.

    q_half  (2, 4, 5, 4)   Slice 4..8 of q_BHSD              -> 3, positions 4..7
    rot     (2, 4, 5, 8)   Concat(Neg(q_half), q[..., :4])   -> 3, positions 4..7, 0..3
    q * cos + rot * sin                                      -> pairs (0, 4), (1, 5), (2, 6), (3, 7); tables cos, sin
"""

from __future__ import annotations

import numpy as np

from ..model.graph import const_value, is_const
from .headmap import ELEMENTWISE, NORMS, norm_axis, reshape_groups

_KEEP_AXES = ELEMENTWISE | NORMS | {"RotaryEmbedding", "Identity", "Cast", "Dropout", "Expand"}   # Expand: broadcast
# aligns axes from the end, and a head-size axis (of size D, not 1) is never the one it broadcasts


def merged(owner: np.ndarray, head_dim: int) -> bool:
    """Every unit's positions along a 1-D owner come in runs of ``head_dim``."""
    owner = np.asarray(owner).reshape(-1)
    starts = np.flatnonzero(np.diff(owner, prepend=owner[0] - 1))
    lengths = np.diff(list(starts) + [len(owner)])
    units = owner[starts]
    return head_dim > 1 and bool(np.all(lengths[units >= 0] == head_dim))


def head_dim_axes(flow, head_dim: int, positions: dict | None = None) -> dict[str, int]:
    """{tensor name: its head-size axis} for the tensors of ``flow`` that have one (see the module
    docstring); ``positions``, when given, gets {name: head-size positions} of those whose indices are not
    0..D-1 in order."""
    found: dict[str, int] = {}
    pos = {} if positions is None else positions
    for name, hm in flow.maps.items():
        if len(hm.axes) == 1 and hm.owner.ndim == 1 and merged(hm.owner, head_dim):
            found[name] = hm.axes[0]
    nodes = topological(flow)
    for _ in range(4):         # both ways until nothing changes (a block is a short chain)
        before = len(found)
        for node in nodes + nodes[::-1]:
            _step(flow, node, found, head_dim, pos)
        if len(found) == before:
            break
    return found


def _sliced(flow, node) -> dict | None:
    """{axis: the input positions that the output keeps} of a Slice, its bounds constant or as probed (a bound
    read at run time from the head size, ``Shape(x)[-1] // 2``, follows a cut by itself)."""
    x = node.inputs[0]
    args = []
    for t in node.inputs[1:5]:
        if t is None or not t.name:
            args.append(None)
            continue
        value = const_value(t)
        value = flow.values.get(t.name) if value is None else value
        if value is None:
            return None
        args.append(np.asarray(value).reshape(-1))
    args += [None] * (4 - len(args))
    starts, ends, axes, steps = args
    shape = _shape(flow, x)
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
    return {norm_axis(int(a), len(shape)): np.arange(shape[norm_axis(int(a), len(shape))])[slice(int(s), int(e), int(st))]
            for s, e, a, st in zip(starts, ends, axes, steps)}


def _kept_axes(flow, node, rx: int, ry: int) -> dict | None:
    """{input axis: output axis} of an Unsqueeze or Squeeze, from its axes (input or attribute)."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        axes = const_value(node.inputs[1])
        axes = flow.values.get(node.inputs[1].name) if axes is None else axes
    if node.op == "Squeeze" and axes is None:
        shape = _shape(flow, node.inputs[0])
        axes = [i for i, n in enumerate(shape) if n == 1]
    if axes is None:
        return None
    if node.op == "Unsqueeze":
        added = {norm_axis(int(a), ry) for a in np.asarray(axes).reshape(-1)}
        rest = [j for j in range(ry) if j not in added]
        return dict(zip(range(rx), rest)) if len(rest) == rx else None
    gone = {norm_axis(int(a), rx) for a in np.asarray(axes).reshape(-1)}
    rest = [i for i in range(rx) if i not in gone]
    return dict(zip(rest, range(ry))) if len(rest) == ry else None


def topological(flow) -> list:
    """The block's nodes in graph order (the flow visits them from the attention outwards): positions are
    derived forwards, a part of the head size from the whole."""
    rank = {id(n): i for i, n in enumerate(flow.graph.nodes)}
    return sorted((n for n in flow.node_order if id(n) in flow.nodes), key=lambda n: rank.get(id(n), len(rank)))


def _shape(flow, t):
    return flow.shapes.get(t.name) if t is not None else None


def _step(flow, node, found: dict, head_dim: int, pos: dict):
    ins = [t for t in node.inputs if t is not None and t.name in flow.maps]
    outs = [t for t in node.outputs if t.name in flow.maps]
    if not ins or not outs:
        return
    y = outs[0]

    def carry(src, dst):          # the head-size positions go along with the axis
        if src.name in pos:
            pos[dst.name] = pos[src.name]
    if node.op == "Slice":          # a part of the head size (forward only: the rest of it is elsewhere)
        x = node.inputs[0]
        if x.name in found and y.name not in found and (x.name not in pos or pos[x.name].ndim == 1):
            picked = _sliced(flow, node)
            ax = found[x.name]
            if picked is not None and set(picked) == {ax}:
                found[y.name] = ax
                pos[y.name] = pos.get(x.name, np.arange(_shape(flow, x)[ax]))[picked[ax]]
        return
    if node.op == "Concat":         # parts of the head size put back together along it, or stacked after it
        rank = len(_shape(flow, y) or ())
        axis = norm_axis(node.attrs.get("axis", 0), rank) if rank else None
        parts = [t for t in node.inputs if t is not None and t.name]
        known = [t for t in parts + [y] if t.name in found]
        stacked = all(t.name in pos and pos[t.name].ndim == 2 for t in parts)    # GPT-J's interleave, below
        if known and axis is not None and found[known[0].name] != axis and not stacked and \
                all(t.name in flow.maps and len(_shape(flow, t)) == rank for t in parts):
            # along another axis (a KV cache's past and new entries, along the sequence): the head size is
            # the same axis in every part
            for t in parts + [y]:
                if t.name not in found:
                    found[t.name] = found[known[0].name]
                    carry(known[0], t)
            return
        if y.name in found or not parts or not all(t.name in found for t in parts):
            return
        at = {found[t.name] for t in parts}
        if at == {axis}:
            found[y.name] = axis
            pos[y.name] = np.concatenate([pos.get(t.name, np.arange(_shape(flow, t)[axis])) for t in parts])
        elif at == {axis - 1} and all(t.name in pos and pos[t.name].ndim == 2 for t in parts):
            found[y.name] = axis - 1          # GPT-J's interleave: [..., D/2, 1] parts side by side on a new axis
            pos[y.name] = np.concatenate([pos[t.name] for t in parts], axis=1)
        return
    if node.op in NORMS:            # a norm over the head size mixes its positions
        rank = len(_shape(flow, y) or ())
        first = norm_axis(node.attrs.get("axis", -1), rank) if rank else 0
        x = node.inputs[0]
        if fused_rms_over(flow, node, found, head_dim):     # but an RMS one over exactly it lets a cut pass:
            for src, dst in ((x, y), (y, x)):                 # the rewrite rescales it (``qknorm.fused_rms``)
                if src.name in found and dst.name not in found and dst.name in flow.maps:
                    found[dst.name] = found[src.name]
                    carry(src, dst)
            return
        if (x.name in found and found[x.name] >= first) or (y.name in found and found[y.name] >= first):
            return
    if node.op in ("Reshape", "Flatten"):
        x = node.inputs[0]
        if x.name not in flow.maps:
            return
        if x.name in found and y.name not in found and x.name in pos and pos[x.name].ndim == 2:
            sx, sy, ax = _shape(flow, x), _shape(flow, y), found[x.name]
            if len(sy) == len(sx) - 1 and tuple(sy[:ax]) == tuple(sx[:ax]) and sy[ax] == sx[ax] * sx[ax + 1] \
                    and tuple(sy[ax + 1:]) == tuple(sx[ax + 2:]):
                found[y.name] = ax            # the interleave merged: positions pair by pair
                pos[y.name] = pos[x.name].reshape(-1)
            return
        for src, dst in ((x, y), (y, x)):
            if src.name in found and dst.name not in found:
                axis = _through_reshape(flow, src, dst, found[src.name], head_dim)
                if axis is None:
                    continue
                if src.name in pos and _shape(flow, dst)[axis] != len(pos[src.name]):
                    continue        # reordered positions merged with the heads: no longer one run per head
                found[dst.name] = axis
                carry(src, dst)
        return
    if node.op == "Transpose":
        x = node.inputs[0]
        rank = len(_shape(flow, x) or ())
        perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
        if x.name in found and y.name not in found:
            found[y.name] = perm.index(found[x.name])
            carry(x, y)
        elif y.name in found and x.name not in found:
            found[x.name] = perm[found[y.name]]
            carry(y, x)
        return
    if node.op == "MatMul" and len(node.inputs) == 2:
        a, b = node.inputs
        ra, rb, ry = len(_shape(flow, a) or ()), len(_shape(flow, b) or ()), len(_shape(flow, y) or ())
        if b.name in found and found[b.name] == rb - 1 and y.name not in found and a.name not in found:
            found[y.name] = ry - 1                      # probabilities x V: V's columns are the output's
            carry(b, y)
        elif y.name in found and found[y.name] == ry - 1 and b.name in flow.maps and b.name not in found \
                and a.name not in found:
            found[b.name] = rb - 1
            carry(y, b)
        elif a.name in found and found[a.name] == ra - 2 and y.name not in found:
            found[y.name] = ry - 2
            carry(a, y)
        elif a.name in found and found[a.name] == ra - 1 and b.name in flow.maps and b.name not in found \
                and y.name not in found and _shape(flow, b)[rb - 2] == _shape(flow, a)[ra - 1]:
            found[b.name] = rb - 2              # Q x Kᵀ: the keys' head size is the one contracted
            carry(a, b)
        return
    if node.op in ("Unsqueeze", "Squeeze"):       # axes added or removed around the head size
        x = node.inputs[0]
        rx, ry = len(_shape(flow, x) or ()), len(_shape(flow, y) or ())
        kept = _kept_axes(flow, node, rx, ry)       # x's axis -> y's axis
        if kept is None:
            return
        back = {j: i for i, j in kept.items()}
        if x.name in found and y.name not in found and found[x.name] in kept:
            found[y.name] = kept[found[x.name]]
            if node.op == "Unsqueeze" and found[y.name] + 1 < ry and found[y.name] + 1 not in back:
                # a new axis right after the head size: the first step of an interleave (GPT-J's stack)
                pos[y.name] = pos.get(x.name, np.arange(_shape(flow, x)[found[x.name]]))[:, None]
            else:
                carry(x, y)
        elif y.name in found and x.name not in found and found[y.name] in back:
            found[x.name] = back[found[y.name]]
            carry(y, x)
        return
    if node.op == "GroupQueryAttention":          # its KV cache in and out: [B, H_kv, T, D]
        for t in [node.inputs[i] for i in (3, 4) if i < len(node.inputs)] + list(node.outputs[1:3]):
            shape = _shape(flow, t) if t is not None and t.name in flow.maps else None
            if shape and len(shape) == 4 and shape[-1] == head_dim and t.name not in found:
                found[t.name] = 3
        return
    if node.op in ("QuantizeLinear", "DequantizeLinear"):   # a static QDQ model's activations, one scale each
        x = node.inputs[0]
        scalar = all(flow.shape(t) is not None and int(np.prod(flow.shape(t))) == 1
                     for t in node.inputs[1:] if t is not None and t.name)
        if scalar and x.name in found and y.name not in found:
            found[y.name] = found[x.name]
            carry(x, y)
        elif scalar and y.name in found and x.name not in found and x.name in flow.maps:
            found[x.name] = found[y.name]
            carry(y, x)
        return
    if node.op in _KEEP_AXES:
        ry = len(_shape(flow, y) or ())
        for x in ins:
            rx = len(_shape(flow, x) or ())
            if x.name in found and y.name not in found and _shape(flow, x)[found[x.name]] > 1 and \
                    _shape(flow, y)[found[x.name] + (ry - rx)] == _shape(flow, x)[found[x.name]]:
                found[y.name] = found[x.name] + (ry - rx)
                carry(x, y)
            elif y.name in found and x.name not in found and rx == ry and _shape(flow, x)[found[y.name]] == \
                    _shape(flow, y)[found[y.name]]:
                found[x.name] = found[y.name]
                carry(y, x)


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
        if axis == gi[-1] and (s_shape[axis] == head_dim or axis in flow.maps[src.name].axes):
            # the group's innermost D entries are the same ones on both sides: [B, S, H*D] <-> [B, S*H, D]
            # (a q norm over each head's D, as GenAI's Gemma 3 writes it)
            last = gj[-1]
            if d_shape[last] == head_dim and last not in d_heads:
                return last
            if d_shape[last] % head_dim == 0 and last in d_heads and merged(flow.maps[dst.name].owner, head_dim):
                return last
        return None
    return None


FUSED_RMS = {"SimplifiedLayerNormalization", "RMSNormalization"}     # RMS norms in one op (no centring)


def fused_rms_over(flow, node, found: dict, head_dim: int) -> bool:
    """``node`` is an RMS norm op (no centring) over exactly the last axis of its input, which is a head-size
    axis of D entries in order, with a weight of D (and no bias): a QK cut that keeps whole positions passes it
    exactly, once its epsilon and weight are rescaled (``rewrite.rewriter``)."""
    if node.op not in FUSED_RMS or len(node.inputs) < 2 or len(node.inputs) > 2 and node.inputs[2] is not None \
            and node.inputs[2].name:
        return False
    x, w = node.inputs[0], node.inputs[1]
    shape = _shape(flow, x)
    if not shape or not is_const(w) or tuple(_shape(flow, w) or np.shape(const_value(w))) != (head_dim,):
        return False
    rank = len(shape)
    if norm_axis(node.attrs.get("axis", -1), rank) != rank - 1 or shape[-1] != head_dim:
        return False
    y = node.outputs[0]
    axis = found.get(x.name, found.get(y.name))
    return axis == rank - 1


# ------------------------------------------------------------------ one KV head for all (multi-query)
PASSING = {"Transpose", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast", "Add"}


def broadcast_chains(flow, found: dict, head_dim: int) -> list[tuple]:
    """Where one K/V head is broadcast to every query head (multi-query attention: the flow's head maps stop
    at the broadcast, as nothing above it carries heads), the head-size axis still runs up to the projection:
    [B, 1, S, D] <- Transpose <- [B, S, 1, D] <- Reshape <- [B, S, D] <- MatMul(x, W [E, D]). Returns one
    (role, [(tensor, its head-size axis)], [nodes], projection weight, bias or None) per chain that reaches a
    constant weight; a chain that meets anything else (a norm or rotary over the head size) is left out."""
    chains = []
    for node in flow.node_order:
        if id(node) not in flow.nodes or not node.outputs:
            continue
        y = node.outputs[0]
        start = None
        if node.op == "Expand" and y.name in found and node.inputs[0].name not in flow.maps:
            x = node.inputs[0]
            start = (x, found[y.name] - (len(flow.shape(y)) - len(flow.shape(x))), flow.role_of(y))
        elif node.op == "MatMul" and len(node.inputs) == 2 and node.inputs[1].name not in flow.maps \
                and not is_const(node.inputs[1]):
            a, x = node.inputs
            if y.name in found and found[y.name] == len(flow.shape(y)) - 1:          # probabilities x V
                start = (x, len(flow.shape(x)) - 1, frozenset({"v"}))
            elif a.name in found and found[a.name] == len(flow.shape(a)) - 1:        # Q x Kᵀ
                start = (x, len(flow.shape(x)) - 2, frozenset({"k"}))
        if start is None or len(start[2]) != 1 or not start[2] <= {"k", "v"}:
            continue
        chain = _walk_up(flow, start[0], start[1], head_dim)
        if chain is not None:
            chains.append((next(iter(start[2])),) + chain)
    return chains


def fused_kv_chains(flow, head_dim: int) -> list[tuple]:
    """The one K/V head of ``GroupQueryAttention(kv_num_heads=1)`` (GenAI's Gemma 3 270M): K and V come in as
    inputs of their own, [B, S, D], with no head axis to show; their head size runs up to the packed QKV
    projection through Reshapes, a fused RMS k norm and the Split of the packed output. Returns one (role,
    [(tensor, head-size axis)], [nodes], weight, bias or None, [RMS norm nodes], {tensor: offset of the run in
    a packed axis}) per input that reaches a constant weight, and one (role, [(cache, 3)], [], None, None, [],
    {}) per KV cache in and out ([B, 1, T, D])."""
    chains = []
    for node in flow.node_order:
        if id(node) not in flow.nodes or node.op != "GroupQueryAttention" or node.attrs.get("kv_num_heads") != 1 \
                or len(node.inputs) < 3 or not all(node.inputs[i] is not None and node.inputs[i].name for i in (1, 2)):
            continue
        for i, role in ((1, "k"), (2, "v")):
            t = node.inputs[i]
            shape = flow.shape(t)
            chain = _walk_up(flow, t, len(shape) - 1, head_dim, fused=True) if shape else None
            if chain is not None:
                chains.append((role,) + chain)
        caches = [(node.inputs[i], r) for i, r in ((3, "k"), (4, "v")) if len(node.inputs) > i and node.inputs[i] is not None
                  and node.inputs[i].name] + [(o, r) for o, r in zip(node.outputs[1:3], "kv") if o is not None and o.name]
        for t, role in caches:
            shape = flow.shape(t)
            if shape is not None and len(shape) == 4 and shape[1] == 1 and shape[3] == head_dim:
                chains.append((role, [(t, 3)], [], None, None, [], {}))
    return chains


def _walk_up(flow, t, axis: int, head_dim: int, fused: bool = False):
    """The chain from ``t``'s head size (``axis``) up to a constant projection weight, or None; ``fused``: also
    through fused RMS norms over it and a Split of a packed projection's output."""
    tensors, nodes, bias, norms, offsets, offset = [(t, axis)], [], None, [], {}, 0
    for _ in range(12):
        if not t.inputs or flow.shape(t) is None or flow.shape(t)[axis] < offset + head_dim or \
                (not offset and flow.shape(t)[axis] != head_dim):
            return None
        node = t.inputs[0]
        nodes.append(node)
        x = node.inputs[0] if node.inputs else None
        if node.op in ("MatMul", "Gemm") and len(node.inputs) >= 2 and is_const(node.inputs[1]) \
                and axis == len(flow.shape(t)) - 1:
            w = node.inputs[1]
            w_axis = 0 if node.op == "Gemm" and node.attrs.get("transB", 0) else len(flow.shape(w)) - 1
            if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                if bias is not None or offset:
                    return None
                bias = node.inputs[2]
                tensors.append((bias, len(flow.shape(bias)) - 1))
            tensors.append((w, w_axis))
            if offset:
                offsets[w.name] = offset
            return (tensors, nodes, w, bias) + ((norms, offsets) if fused else ())
        if fused and node.op in FUSED_RMS and x is not None and not offset and fused_rms_over(
                flow, node, {x.name: axis}, head_dim) and axis == len(flow.shape(t)) - 1:
            norms.append(node)
            t = x
            tensors.append((t, axis))
            continue
        if fused and node.op == "Split" and x is not None and flow.shape(x) is not None and not offset:
            rank = len(flow.shape(x))
            if norm_axis(node.attrs.get("axis", 0), rank) != axis or len(flow.shape(t)) != rank:
                return None
            j = next(k for k, o in enumerate(node.outputs) if o is t)
            offset = sum(flow.shape(o)[axis] for o in node.outputs[:j])
            t = x
            offsets[t.name] = offset
            tensors.append((t, axis))
            continue
        if node.op not in PASSING or x is None or flow.shape(x) is None or offset:
            return None
        sx, sy = flow.shape(x), flow.shape(t)
        if node.op == "Add":
            consts = [i for i in node.inputs if is_const(i)]
            data = [i for i in node.inputs if not is_const(i)]
            if len(consts) != 1 or len(data) != 1 or bias is not None or len(flow.shape(consts[0])) != 1:
                return None
            bias, x = consts[0], data[0]
            tensors.append((bias, 0))
            sx = flow.shape(x)
            new = axis - (len(sy) - len(sx))
        elif node.op == "Transpose":
            new = list(node.attrs.get("perm", list(range(len(sy)))[::-1]))[axis]
        elif node.op == "Reshape":
            groups = reshape_groups(sx, sy) or []
            gi = next((gi for gi, gj in groups if axis in gj and gj[-1] == axis), None)
            new = gi[-1] if gi else None
        else:                   # Unsqueeze, Squeeze, Identity, Cast: the head size stays the last axis
            new = len(sx) - 1 if axis == len(sy) - 1 else (axis if len(sx) == len(sy) else None)
        if new is None or new < 0 or sx[new] != head_dim:
            return None
        t, axis = x, new
        tensors.append((t, axis))
    return None


_SIZE_MOVERS = {"Slice", "Gather", "Squeeze", "Unsqueeze", "Identity", "Reshape"}
_FLOAT_TYPES = {1, 10, 11, 16}      # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def head_size_readers(flow, dims: dict[str, int]) -> list:
    """The Casts that turn a block tensor's runtime head size into a float: TorchScript's scaled-dot-product
    attention without a ``scale`` computes it as ``sqrt(1 / sqrt(Cast(Shape(q)[-1])))`` and multiplies it into
    q and k (transformers 4's ``BertSdpaSelfAttention``, hence Optimum's exports of MiniLM). A cut inside the
    heads changes that size but not the scale the original computed, so the rewrite pins it (site
    ``head_size``). ``dims``: {tensor: head-size axis} (``head_dim_axes``)."""
    from . import shape_expr
    found, seen = [], set()
    for name, axis in dims.items():
        t = flow.tensors.get(name)
        for shape in [r for r in t.outputs if r.op == "Shape"] if t is not None else ():
            stack = [shape.outputs[0]]
            while stack:
                x = stack.pop()
                for reader in x.outputs:
                    if reader.op in _SIZE_MOVERS and reader.inputs and reader.inputs[0] is x:
                        stack.append(reader.outputs[0])
                    elif reader.op == "Cast" and reader.attrs.get("to") in _FLOAT_TYPES and id(reader) not in seen \
                            and tuple(flow.shapes.get(x.name, (0,))) in ((), (1,)):      # one size, not a vector
                        src = shape_expr.locate(x, None, flow.shapes)
                        if isinstance(src, shape_expr.Dim) and src.tensor == name and src.axis == axis:
                            seen.add(id(reader))
                            found.append(reader)
    return found
