"""The op rules of the head flow, one function per op type, in one table (``RULES``).

A rule gets the flow, the node, the direction it is reached in (``"up"`` from an output towards the
weights, ``"down"`` from an input towards the output projection) and the tensor it is reached through
(``trigger``). It maps the head axis across the node with ``flow.assign`` and records the node as a
rewrite site (``flow.sites``) when an attribute or a shape-like input encodes a head count. Anything it
does not understand is a ``FlowFail`` with the reason: the block becomes an explained miss, never a wrong
rewrite. A new op needs a rule here and a unit test in ``tests/test_rules.py``.
"""

from __future__ import annotations

import numpy as np

from ..model.graph import const_value, is_const
from .headmap import ELEMENTWISE, NORMS, FlowFail, HeadMap, embed, norm_axis, regroup


def elementwise(flow, node, direction, trigger):
    ins, outs = flow.data_io(node)
    out = outs[0]
    out_shape = flow.shape(out)
    if direction == "down":
        in_shape = flow.shape(trigger)
        hm = flow.maps[trigger.name]
        offset = len(out_shape) - len(in_shape)
        for ax in hm.axes:
            if in_shape[ax] != out_shape[ax + offset]:
                raise FlowFail(node, f"{node.op} broadcasts {trigger.name!r} along its head axis")
        flow.assign(out, HeadMap(tuple(a + offset for a in hm.axes), hm.owner), "down", node,
                    flow.role_of(trigger))
    hm = flow.maps.get(out.name)
    if hm is None:
        return
    if node.op in ("Softmax", "LogSoftmax"):
        axis = norm_axis(node.attrs.get("axis", -1), len(out_shape))
        if axis in hm.axes:
            raise FlowFail(node, f"{node.op} normalises over the head axis")
    for t in ins:
        if t is not trigger:
            flow.side_input(node, t, hm, out_shape, flow.role_of(out))



def norm(flow, node, direction, trigger):
    x = node.inputs[0]
    rank = len(flow.shape(x))
    axis = norm_axis(node.attrs.get("axis", -1), rank)
    known = flow.maps.get(trigger.name)
    if known and any(a >= axis for a in known.axes):
        if not _one_head_per_group(known, axis, partial=True):
            raise FlowFail(node, f"{node.op} normalises over the head axis")

        def recheck(t=trigger):     # positions still unknown (-1) now may be another head's once the flow ends
            if not _one_head_per_group(flow.maps[t.name], axis, partial=False):
                raise FlowFail(node, f"{node.op} normalises over the head axis")
        flow.checks.append(recheck)
    if trigger is not x and direction == "down":
        raise FlowFail(node, f"{node.op} scale or bias carries the head axis")
    if direction == "down":
        flow.assign(node.outputs[0], known, "down", node, flow.role_of(x))
    else:
        flow.assign(x, flow.maps[node.outputs[0].name], "up", node, flow.role_of(node.outputs[0]))



def _one_head_per_group(hm: HeadMap, axis: int, partial: bool) -> bool:
    """Every group that a norm from ``axis`` on takes together holds one head only: StableLM's LayerNorm
    of one head's [B, 1, S, D] part, whose D positions all belong to that head. ``partial``: while the
    flow runs, positions not reached yet (-1) may still join."""
    inner = [i for i, a in enumerate(hm.axes) if a >= axis]
    outer = [i for i, a in enumerate(hm.axes) if a < axis]
    owner = np.moveaxis(hm.owner, inner, list(range(len(hm.axes) - len(inner), len(hm.axes))))
    groups = owner.reshape(int(np.prod([hm.owner.shape[i] for i in outer], dtype=np.int64)), -1)
    return all(len(set(g[g >= 0].tolist())) == 1 and (partial or (g >= 0).all()) for g in groups)


def transpose(flow, node, direction, trigger):
    x, y = node.inputs[0], node.outputs[0]
    rank = len(flow.shape(x))
    perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
    if direction == "up":
        hm = flow.maps[y.name]
        flow.assign(x, HeadMap(tuple(perm[a] for a in hm.axes), hm.owner), "up", node, flow.role_of(y))
    else:
        hm = flow.maps[x.name]
        flow.assign(y, HeadMap(tuple(perm.index(a) for a in hm.axes), hm.owner), "down", node,
                    flow.role_of(x))



def reshape(flow, node, direction, trigger):
    x, y = node.inputs[0], node.outputs[0]
    if trigger is not x and direction == "down":
        raise FlowFail(node, "Reshape shape input carries the head axis")
    if direction == "up":
        flow.assign(x, regroup(node, flow.shape(y), flow.shape(x), flow.maps[y.name]), "up", node, flow.role_of(y))
    else:
        flow.assign(y, regroup(node, flow.shape(x), flow.shape(y), flow.maps[x.name]), "down", node, flow.role_of(x))
    if ("reshape", node) not in flow.sites:
        flow.sites.append(("reshape", node))



def unsqueeze(flow, node, direction, trigger):
    x, y = node.inputs[0], node.outputs[0]
    out_rank = len(flow.shape(y))
    added = flow.axes_arg(node, out_rank)
    kept = [a for a in range(out_rank) if a not in added]     # kept[i] = output axis of input axis i
    if direction == "up":
        hm = flow.maps[y.name]
        if any(a in added for a in hm.axes):
            raise FlowFail(node, "Unsqueeze adds the head axis")
        flow.assign(x, HeadMap(tuple(kept.index(a) for a in hm.axes), hm.owner), "up", node, flow.role_of(y))
    else:
        hm = flow.maps[x.name]
        flow.assign(y, HeadMap(tuple(kept[a] for a in hm.axes), hm.owner), "down", node, flow.role_of(x))



def squeeze(flow, node, direction, trigger):
    x, y = node.inputs[0], node.outputs[0]
    in_shape = flow.shape(x)
    removed = flow.axes_arg(node, len(in_shape))
    if removed is None:
        removed = [a for a, d in enumerate(in_shape) if d == 1]
    kept = [a for a in range(len(in_shape)) if a not in removed]   # kept[j] = input axis of output axis j
    if direction == "up":
        hm = flow.maps[y.name]
        flow.assign(x, HeadMap(tuple(kept[a] for a in hm.axes), hm.owner), "up", node, flow.role_of(y))
    else:
        hm = flow.maps[x.name]
        if any(a in removed for a in hm.axes):
            raise FlowFail(node, "Squeeze removes the head axis")
        flow.assign(y, HeadMap(tuple(kept.index(a) for a in hm.axes), hm.owner), "down", node,
                    flow.role_of(x))



def expand(flow, node, direction, trigger):
    x, y = node.inputs[0], node.outputs[0]
    if direction == "up":
        sx, sy = flow.shape(x), flow.shape(y)
        off = len(sy) - len(sx)
        flow.copy_axes[y.name] = tuple(a for a in flow.maps[y.name].axes
                                       if a - off < 0 or (sx[a - off] == 1 and sy[a] > 1))
        if flow.role_of(y) & {"k", "v"} and flow.copy_axes[y.name]:
            # repeat_kv: each KV head serves the query heads it is copied to; with one KV head (Gemma 3
            # 270M, multi-query) the K/V tensors carry no head axis at all, so only this says so
            cur = flow.maps[y.name]
            for a in sorted(flow.copy_axes[y.name], reverse=True):
                cur = flow.merge_axis(cur, a)
            flow.broadcast_kv.update(int(u) for u in np.unique(cur.owner) if u >= 0)
        flow.side_input(node, x, flow.maps[y.name], sy, flow.role_of(y))
    else:
        if trigger is not x:
            raise FlowFail(node, "Expand shape input carries the head axis")
        hm = flow.maps[x.name]
        offset = len(flow.shape(y)) - len(flow.shape(x))
        flow.assign(y, HeadMap(tuple(a + offset for a in hm.axes), hm.owner), "down", node, flow.role_of(x))
    if ("expand", node) not in flow.sites:
        flow.sites.append(("expand", node))



def split(flow, node, direction, trigger):
    x = node.inputs[0]
    in_shape = flow.shape(x)
    axis = norm_axis(node.attrs.get("axis", 0), len(in_shape))
    sizes = [flow.shape(o)[axis] for o in node.outputs]
    if direction == "down":
        raise FlowFail(node, "Split of a tensor that already carries the head axis")
    offsets = np.cumsum([0] + sizes)
    for k, out in enumerate(node.outputs):
        if out.name in flow.maps:
            pos = {axis: np.arange(offsets[k], offsets[k + 1])}
            flow.assign(x, embed(node, flow.maps[out.name], flow.shape(out), in_shape, pos),
                        "up", node, flow.role_of(out))
    if ("split", node) not in flow.sites:
        flow.sites.append(("split", node))



def slice_(flow, node, direction, trigger):
    x, y = node.inputs[0], node.outputs[0]
    if trigger is not x and direction == "down":
        raise FlowFail(node, "Slice bounds carry the head axis")
    if direction == "up":
        out_map = flow.maps[y.name]
        pos = flow.slice_positions(node, set(out_map.axes))
        pos = {a: p for a, p in pos.items() if a in out_map.axes or len(p) != flow.shape(x)[a]}
        flow.assign(x, embed(node, out_map, flow.shape(y), flow.shape(x), pos), "up", node,
                    flow.role_of(y))
    else:
        hm = flow.maps[x.name]
        pos = flow.slice_positions(node, set(hm.axes))
        for a in hm.axes:
            if a in pos and len(pos[a]) != flow.shape(x)[a]:
                raise FlowFail(node, "Slice of a tensor along its head axis")
        flow.assign(y, hm, "down", node, flow.role_of(x))
    if ("slice", node) not in flow.sites:
        flow.sites.append(("slice", node))



def gather(flow, node, direction, trigger):
    data, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
    in_shape, idx_shape = flow.shape(data), flow.shape(idx)
    axis = norm_axis(node.attrs.get("axis", 0), len(in_shape))
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
        hm = flow.maps[y.name]
        if any(out_to_in(a) is None for a in hm.axes):
            raise FlowFail(node, "Gather indices carry the head axis")
        val = const_value(idx)
        if val is not None and k == 0:
            dropped = {axis: int(val) % in_shape[axis]}
            flow.assign(data, embed(node, hm, flow.shape(y), in_shape, {}, dropped), "up", node,
                        flow.role_of(y))
        else:
            flow.assign(data, HeadMap(tuple(out_to_in(a) for a in hm.axes), hm.owner), "up", node,
                        flow.role_of(y))
    else:
        hm = flow.maps[data.name]
        if axis in hm.axes:
            raise FlowFail(node, "Gather along the head axis")
        in_to_out = {a: (a if a < axis else a + k - 1) for a in range(len(in_shape)) if a != axis}
        flow.assign(y, HeadMap(tuple(in_to_out[a] for a in hm.axes), hm.owner), "down", node,
                    flow.role_of(data))
    if ("gather", node) not in flow.sites:
        flow.sites.append(("gather", node))



def concat(flow, node, direction, trigger):
    y = node.outputs[0]
    out_shape = flow.shape(y)
    axis = norm_axis(node.attrs["axis"], len(out_shape))
    if direction == "down":
        hm = flow.maps[trigger.name]
        if axis in hm.axes:
            raise FlowFail(node, "Concat along the head axis")
        flow.assign(y, hm, "down", node, flow.role_of(trigger))
    hm = flow.maps.get(y.name)
    if hm is None:
        return
    offset, parts = 0, {}
    for t in node.inputs:
        size = flow.shape(t)[axis]
        if axis in hm.axes:
            pos = hm.axes.index(axis)
            owner = np.take(hm.owner, np.arange(offset, offset + size), axis=pos)
            part = HeadMap(hm.axes, owner)
        else:
            part = hm
        offset += size
        if t is not trigger:
            parts.setdefault(t.name, (t, []))[1].append(part)
    for t, maps in parts.values():
        # one tensor concatenated several times (a mask repeated once per head) serves all their heads
        owner = maps[0].owner
        for other in maps[1:]:
            owner = np.vectorize(lambda a, b: flow.unit(flow.units[a] | flow.units[b]) if a >= 0 and b >= 0
                                 else max(a, b), otypes=[np.int64])(owner, other.owner)
        flow.assign(t, HeadMap(hm.axes, owner), "up", node, flow.role_of(y))
    if axis in hm.axes and ("concat", node) not in flow.sites:
        flow.sites.append(("concat", node))



def matmul(flow, node, direction, trigger):
    """MatMul, and ONNX Runtime's FusedMatMul (a MatMul with a scale ``alpha`` and a transposed B folded in, as
    its CPU optimizer writes the scores of a saved model): the heads follow the batch axes and the rows of A /
    columns of B."""
    a, b = node.inputs[:2]
    y = node.outputs[0]
    sa, sb, sy = flow.shape(a), flow.shape(b), flow.shape(y)
    ra, rb, ry = len(sa), len(sb), len(sy)
    if ra < 2 or rb < 2:
        raise FlowFail(node, "MatMul with a 1-D operand on the head path")
    if any(node.attrs.get(k, 0) for k in ("transA", "transBatchA", "transBatchB")):
        raise FlowFail(node, f"{node.op} with a transposed A or batch axes; not supported")
    tb = int(node.attrs.get("transB", 0))        # FusedMatMul: B given as its transpose
    b_rows, b_cols = (rb - 1, rb - 2) if tb else (rb - 2, rb - 1)
    core = not is_const(a) and not is_const(b)
    if direction == "up":
        hm = flow.maps[y.name]
        role = flow.role_of(y)
        ra_role, rb_role = ("q", "k") if core and "s" in role else (role, role)
        a_axes = {ax: ra - 2 for ax in hm.axes if ax == ry - 2}
        b_axes = {ax: b_cols for ax in hm.axes if ax == ry - 1}
        flow.matmul_side(node, a, hm, sy, a_axes, ra_role)
        flow.matmul_side(node, b, hm, sy, b_axes, rb_role)
        return
    hm = flow.maps[trigger.name]
    if trigger is a:
        role = flow.role_of(a)
        contracted = ra - 1 in hm.axes
        if contracted:
            if len(hm.axes) > 1:
                raise FlowFail(node, "MatMul contracts a tensor with several head axes")
            flow.assign(b, HeadMap((b_rows,), hm.owner), "up", node, "o")
            flow.contractions.append((node, b.name))
            return
        out_axes = {ax + (ry - ra): ax for ax in hm.axes}
        flow.assign(y, HeadMap(tuple(out_axes), hm.owner), "down", node,
                    "o" if core and "s" in role else role)
        if core:
            flow.matmul_side(node, b, flow.maps[y.name], sy, {}, "v" if "s" in role else role)
    else:
        raise FlowFail(node, "MatMul whose right operand carries the head axis downstream")



def gemm(flow, node, direction, trigger):
    a, b = node.inputs[:2]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    ta, tb = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
    if direction == "up":
        hm = flow.maps[y.name]
        role = flow.role_of(y)
        if 0 in hm.axes:
            raise FlowFail(node, "Gemm rows carry the head axis")
        flow.assign(b, HeadMap((0 if tb else 1,), hm.owner), "up", node, role)
        if c is not None and c.name:
            flow.side_input(node, c, hm, flow.shape(y), role)
        return
    if trigger is not a:
        raise FlowFail(node, "Gemm weight carries the head axis downstream")
    hm = flow.maps[a.name]
    if hm.axes != ((0,) if ta else (1,)):
        raise FlowFail(node, "Gemm input carries the head axis on its rows")
    flow.assign(b, HeadMap((1 if tb else 0,), hm.owner), "up", node, "o")
    flow.contractions.append((node, b.name))



def rotary_embedding(flow, node, direction, trigger):
    """X [B,H,S,D] or [B,S,H*D] rotated per position; cos/sin caches and positions carry no heads."""
    x, y = node.inputs[0], node.outputs[0]
    if trigger is not x and direction == "down":
        raise FlowFail(node, "RotaryEmbedding cache carries the head axis")
    src, dst, d = (y, x, "up") if direction == "up" else (x, y, "down")
    hm = flow.maps[src.name]
    if len(flow.shape(x)) == 3:
        if node.attrs.get("num_heads"):
            if ("attr", node) not in flow.sites:
                flow.sites.append(("attr", node))
        elif node.domain != "com.microsoft" or node.attrs.get("rotary_embedding_dim"):
            raise FlowFail(node, "3-D RotaryEmbedding without num_heads")
        # else ORT's op takes the head size from the cos cache and the head count from the width
    flow.assign(dst, hm, d, node, flow.role_of(src))



def attention(flow, node, direction, trigger):
    if node.domain not in (None, "", "ai.onnx"):
        raise FlowFail(node, f"{node.domain}.Attention is matched by the fused-op matcher")
    raise FlowFail(node, "a second Attention op inside one block")


def resize(flow, node, direction, trigger):
    """Resize that leaves the head axis as it is (BEiT resizes its per-head bias table over its spatial
    axes); its ``sizes`` vector, which holds the head count, is a rewrite site."""
    x, y = node.inputs[0], node.outputs[0]
    if trigger is not x and direction == "down":
        raise FlowFail(node, "Resize sizes or scales carry the head axis")
    src, dst, d = (x, y, "down") if direction == "down" else (y, x, "up")
    hm = flow.maps[src.name]
    sx, sy = flow.shape(x), flow.shape(y)
    if any(sx[a] != sy[a] for a in hm.axes):
        raise FlowFail(node, "Resize scales the head axis")
    flow.assign(dst, hm, d, node, flow.role_of(src))
    sizes = node.inputs[3] if len(node.inputs) > 3 else None
    if sizes is not None and sizes.name and ("resize", node) not in flow.sites:
        flow.sites.append(("resize", node))


def gather_elements(flow, node, direction, trigger):
    """GatherElements along an axis without heads (DeBERTa-v2 picks its relative-position scores along
    the key axis of [B*H, S, 2k]): the head axis passes, and the indices, of the output's shape, carry it
    too."""
    data, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
    sd, si = flow.shape(data), flow.shape(idx)
    axis = norm_axis(node.attrs.get("axis", 0), len(sd))
    if direction == "down" and trigger is idx:
        raise FlowFail(node, "GatherElements indices carry the head axis")
    hm = flow.maps[data.name] if direction == "down" else flow.maps[y.name]
    if axis in hm.axes:
        raise FlowFail(node, "GatherElements along the head axis")
    if any(sd[a] != si[a] for a in hm.axes):
        raise FlowFail(node, "GatherElements indices broadcast along the head axis")
    if direction == "down":
        flow.assign(y, hm, "down", node, flow.role_of(data))
    else:
        flow.assign(data, hm, "up", node, flow.role_of(y))
    flow.side_input(node, idx, hm, si, flow.role_of(y))


def tile(flow, node, direction, trigger):
    """Tile that repeats whole copies of the heads (DeBERTa-v2 tiles its [H, 2k, D] position keys over the
    batch into [B*H, 2k, D]); the repeats hold no head count and stay as they are."""
    x, y = node.inputs[0], node.outputs[0]
    if trigger is not x and direction == "down":
        raise FlowFail(node, "Tile repeats carry the head axis")
    sx, sy = flow.shape(x), flow.shape(y)
    if direction == "down":
        hm = flow.maps[x.name]
        owner = hm.owner
        for i, a in enumerate(hm.axes):
            owner = np.concatenate([owner] * (sy[a] // sx[a]), axis=i)
        flow.assign(y, HeadMap(hm.axes, owner), "down", node, flow.role_of(x))
    else:
        hm = flow.maps[y.name]
        owner = hm.owner
        for i, a in enumerate(hm.axes):
            parts = np.split(owner, sy[a] // sx[a], axis=i)
            if any(not np.array_equal(p, parts[0]) for p in parts[1:]):
                raise FlowFail(node, "Tile output holds different heads in its copies")
            owner = parts[0]
        flow.assign(x, HeadMap(hm.axes, owner), "up", node, flow.role_of(y))
    if ("tile", node) not in flow.sites:     # repeats computed as (B*H)/H must stay B
        flow.sites.append(("tile", node))


def constant_of_shape(flow, node, direction, trigger):
    """A tensor of one value made from a shape vector (T5's cross-attention position bias: zeros of [1, H, S, T],
    which every decoder layer then reads): nothing above it carries heads; its shape vector holds the head
    count, rewritten as a Reshape's is (a site)."""
    if direction != "up":
        raise FlowFail(node, "ConstantOfShape's shape input carries the head axis")
    if ("constant_of_shape", node) not in flow.sites:
        flow.sites.append(("constant_of_shape", node))


def quantize_linear(flow, node, direction, trigger):
    """QuantizeLinear / DequantizeLinear of an activation with one scale (QDQ models quantize every
    activation per tensor): elementwise. Per-axis scales on the head path are refused."""
    scale = node.inputs[1]
    if int(np.prod(flow.shape(scale))) != 1:
        raise FlowFail(node, f"{node.op} with per-axis scales on a tensor with the head axis")
    if trigger is not node.inputs[0] and direction == "down":
        raise FlowFail(node, f"{node.op} scale or zero point carries the head axis")
    elementwise(flow, node, direction, trigger)


REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"}


def reduce(flow, node, direction, trigger):
    """A reduction over axes that hold no head (an RMSNorm of q or k over the head size, as Qwen3, OLMo-2
    and Gemma 3 have): the head axis passes, renumbered when ``keepdims`` is 0. Over a head axis: refused."""
    x, y = node.inputs[0], node.outputs[0]
    if trigger is not x and direction == "down":
        raise FlowFail(node, f"{node.op} axes carry the head axis")
    rank = len(flow.shape(x))
    axes = flow.axes_arg(node, rank)
    if axes is None:
        axes = [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
    kept = list(range(rank)) if node.attrs.get("keepdims", 1) else [a for a in range(rank) if a not in axes]
    if direction == "down":
        hm = flow.maps[x.name]
        if any(a in axes for a in hm.axes):
            raise FlowFail(node, f"{node.op} reduces over the head axis")
        flow.assign(y, HeadMap(tuple(kept.index(a) for a in hm.axes), hm.owner), "down", node, flow.role_of(x))
    else:
        hm = flow.maps[y.name]
        flow.assign(x, HeadMap(tuple(kept[a] for a in hm.axes), hm.owner), "up", node, flow.role_of(y))


RULES = {
    "Transpose": transpose, "Reshape": reshape, "Flatten": reshape, "Unsqueeze": unsqueeze,
    "Squeeze": squeeze, "Expand": expand, "Split": split, "Slice": slice_, "Gather": gather, "Concat": concat,
    "MatMul": matmul, "FusedMatMul": matmul, "Gemm": gemm, "RotaryEmbedding": rotary_embedding, "Attention": attention,
    "Resize": resize, "GatherElements": gather_elements, "Tile": tile, "QuantizeLinear": quantize_linear,
    "DequantizeLinear": quantize_linear, "ConstantOfShape": constant_of_shape,
    **{op: elementwise for op in ELEMENTWISE}, **{op: norm for op in NORMS}, **{op: reduce for op in REDUCTIONS},
}


def rule_for(op: str):
    """The rule for ``op``, or None when no rule follows the head axis through it."""
    return RULES.get(op)


def head_attrs(node, block, kept_heads, width) -> dict | None:
    """Head counts that an op rule recorded as an ``attr`` site: RotaryEmbedding's ``num_heads`` over a
    3-D input, scaled with the input's width (``width``: before, after)."""
    if node.op == "RotaryEmbedding" and node.attrs.get("num_heads"):
        before, after = width
        return {"num_heads": node.attrs["num_heads"] * after // before}
    return None
