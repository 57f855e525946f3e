"""Where a QK cut starts below q/k norms (Qwen3, Gemma 3: an RMS norm over each head's D): the tensors above the
norm stay whole, and each node below it that reads one of them gets the kept positions.

    q = Reshape(x W_q) -> q * rsqrt(mean(q^2)) * w -> RoPE -> scores
        above: x W_q, q, q^2 (and W_q)     cut point: the Mul that reads q     below: everything after it
"""

from __future__ import annotations

from ..model.graph import is_const
from .headdim import PASSING, topological
from .headmap import ELEMENTWISE


def below_norms(flow, found: dict, head_dim: int):
    """(the q/k tensors above a norm over the head size, the (node, input) points below it where a QK cut can
    start) of a block whose queries or keys pass such a norm (Qwen3, Gemma 3: RMS over each head's D). The norm's
    own tensors (its mean square, [..., 1]) have no head-size axis: every q/k tensor they are computed from is
    above the cut; the first nodes that read one of those and give a tensor below are the cut points. None when
    a tensor without a head-size axis reaches one below other than by broadcasting (size 1 there)."""
    def qk(t):
        return t is not None and t.name in flow.maps and flow.roles.get(t.name) and \
            set(flow.roles[t.name]) <= {"q", "k"} and not is_const(t)
    nodes = topological(flow)
    lost = {t.name for n in nodes for t in n.outputs if qk(t) and t.name not in found}
    above, todo, seen = set(), list(lost), set(lost)
    while todo:                 # every q/k tensor the norm's own tensors are computed from
        t = flow.tensors.get(todo.pop())
        producer = t.inputs[0] if t is not None and t.inputs else None
        if producer is None or id(producer) not in flow.nodes:
            continue
        for x in producer.inputs:     # the projections' weights and biases too: they stay whole
            if (qk(x) or (x is not None and is_const(x) and x.name in flow.maps and flow.roles.get(x.name) and
                          set(flow.roles[x.name]) <= {"q", "k"})) and x.name not in seen:
                seen.add(x.name)
                todo.append(x.name)
                if x.name not in lost:
                    above.add(x.name)
    points = []
    for n in nodes:
        y = n.outputs[0] if n.outputs else None
        if not qk(y) or y.name not in found or y.name in above:
            continue
        for i, x in enumerate(n.inputs):
            if not qk(x):
                continue
            if x.name in lost:
                shape, ys = flow.shape(x), flow.shape(y)
                axis = found[y.name] - (len(ys) - len(shape))
                if axis < 0 or shape[axis] != 1:
                    return None          # a tensor without the head size reaches the queries at full size
            elif x.name in above and x.name in found:
                points.append((n.name, i, len(flow.shape(x)) - 1 - found[x.name]))
        x = n.inputs[0] if n.inputs else None
        if n.op not in ELEMENTWISE and x is not None and x.name and x.name not in flow.maps and not is_const(x) \
                and n.op in PASSING | {"Expand"} and (lost or n.op == "Expand"):
            shape, ys = flow.shape(x), flow.shape(y)      # one K head broadcast to all (multi-query), its
            axis = found[y.name] - (len(ys) - len(shape))  # head size not followed above: cut it here
            if 0 <= axis < len(shape) and shape[axis] == ys[found[y.name]]:
                points.append((n.name, 0, len(shape) - 1 - axis))
    if not lost and not points:
        return None
    sides = {r for name, *_ in points for r in flow.roles.get(next(n for n in nodes if n.name == name).outputs[0].name, ())}
    if lost and not {"q", "k"} <= sides:
        return None
    return (frozenset(above), tuple(points)) if points else None
