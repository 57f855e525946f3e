"""Where a QK cut meets q/k norms (Qwen3, Gemma 3: an RMS norm over each head's D).

An RMS norm written out (``q * rsqrt(mean(q^2) + eps) * w``) lets the cut pass it: with the dropped positions of
q zero, ``mean(q^2)`` over the D positions is ``r / D`` times the mean over the r kept ones, so the cut keeps the
kept positions of W_q, W_k and of the norm's weight ``w``, and multiplies the norm's ``ReduceMean`` by ``r / D``
(``rms_means``): the Q and K projections shrink, and the pruned model equals the original with the dropped
columns of W_q and W_k zeroed. Otherwise (a fused norm op, a norm that centres) the cut starts below the norm
(``below_norms``): the tensors above it stay whole, and each node below it that reads one of them gets the kept
positions.

    q = Reshape(x W_q) -> q * rsqrt(mean(q^2)) * w -> RoPE -> scores
        above: x W_q, q, q^2 (and W_q)     cut point: the Mul that reads q     below: everything after it
"""

from __future__ import annotations

import numpy as np

from ..model.graph import const_value, is_const
from .headdim import PASSING, fused_rms_over, topological
from .headmap import ELEMENTWISE, norm_axis


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


def rms_means(flow, found: dict) -> dict[str, tuple[str, ...]]:
    """{role: the ReduceMean nodes of its RMS norms} for each side (q, k) of the block whose every q/k tensor
    without a head-size axis (a norm's mean square, [..., 1], and what is computed from it alone) comes from a
    ``ReduceMean`` over exactly the head-size axis of ``z * z`` or ``z ** 2``, ``z`` a tensor with that axis (so
    zero where the cut drops positions). A side with any other such tensor (a fused norm, a norm that centres
    first, as a LayerNorm does) is left out: its cut starts below the norm."""
    def qk(t):
        return t is not None and t.name in flow.maps and flow.roles.get(t.name) and \
            set(flow.roles[t.name]) <= {"q", "k"} and not is_const(t)
    lost = {t.name: t for n in topological(flow) for t in n.outputs if qk(t) and t.name not in found}
    memo: dict = {}

    def roots(t) -> frozenset | None:
        """The RMS means that ``t`` (a lost tensor) is computed from, or None."""
        if t.name in memo:
            return memo[t.name]
        memo[t.name] = None          # a cycle (none in a block) finds nothing
        p = t.inputs[0] if t.inputs else None
        got = None
        if p is not None and p.op == "ReduceMean" and _mean_square(flow, p, found):
            got = frozenset({p.name})
        elif p is not None and id(p) in flow.nodes:
            data = [x for x in p.inputs if x is not None and x.name and not is_const(x)]
            parts = [roots(x) if x.name in lost else None for x in data]
            if data and all(r is not None for r in parts):
                got = frozenset().union(*parts)
        memo[t.name] = got
        return got

    out, bad = {}, set()
    for t in lost.values():
        found_roots = roots(t)
        for role in set(flow.roles[t.name]) & {"q", "k"}:
            if found_roots is None:
                bad.add(role)
            else:
                out.setdefault(role, set()).update(found_roots)
    return {r: tuple(sorted(v)) for r, v in out.items() if r not in bad}


def _mean_square(flow, node, found: dict) -> bool:
    """``node`` (a ReduceMean) averages ``z * z`` or ``z ** 2`` over exactly ``z``'s head-size axis."""
    x = node.inputs[0]
    if x is None or x.name not in found:
        return False
    rank = len(flow.shape(x) or ())
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        axes = const_value(node.inputs[1])
        axes = flow.values.get(node.inputs[1].name) if axes is None else axes
    if axes is None or not rank or {norm_axis(int(a), rank) for a in np.asarray(axes).reshape(-1)} != {found[x.name]}:
        return False
    p = x.inputs[0] if x.inputs else None
    if p is None:
        return False
    if p.op == "Mul" and len(p.inputs) == 2 and p.inputs[0] is p.inputs[1]:
        return p.inputs[0].name in found
    if p.op == "Pow" and len(p.inputs) == 2 and p.inputs[0].name in found:
        exponent = const_value(p.inputs[1])
        return exponent is not None and np.size(exponent) == 1 and float(np.asarray(exponent).reshape(-1)[0]) == 2.0
    return False


def fused_rms(flow, found: dict, head_dim: int) -> tuple[str, ...]:
    """The fused RMS norm ops of the block (``SimplifiedLayerNormalization``, ``RMSNormalization``) over exactly a
    head-size axis: GenAI's Gemma 3 writes its q/k norms so, over [B, S*H, D]. A QK cut that keeps whole positions
    passes them with epsilon x D / r and the weight's kept positions x sqrt(D / r) (``rewrite.rewriter``)."""
    return tuple(n.name for n in topological(flow) if fused_rms_over(flow, n, found, head_dim))
