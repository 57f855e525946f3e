"""Head gates: a multiplication of a block's per-head signal by one constant per head.

Trained gating methods (L0 / hard-concrete gates) and head masks leave a ``Mul`` by a constant such as a
[1, H, 1, 1] tensor on the attention probabilities or on the per-head context. Those values say which heads
matter, so they serve as importance; and since everything between the attention probabilities and the
output projection is linear in each head, the gate can be folded into the projection's rows for that
head, and the ``Mul`` removed, leaving the output unchanged. A gate in front of the Softmax (on Q or K) is
not linear in that way; it is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..block import AttentionBlock
from ..model.proto import constant_array, consumers as graph_consumers, find_constant, own_constant, own_weights


@dataclass(frozen=True)
class Gate:
    block: int
    node: str            # the Mul
    constant: str        # its per-head operand
    values: tuple        # one value per head


def find_gates(model: onnx.ModelProto, blocks) -> list[Gate]:
    nodes = {n.name: n for n in model.graph.node if n.name}
    consumers = graph_consumers(model)
    gates = []
    for b in blocks:
        o_nodes = {id(n) for n in consumers.get(b.o_proj.weight, [])}
        for name in b.nodes:
            node = nodes.get(name)
            if node is None or node.op_type != "Mul":
                continue
            const = next((i for i in node.input if find_constant(model, i) is not None), None)
            if const is None or const not in {t.name for t in b.tensors}:
                continue
            values = _per_head(b, const, constant_array(model, const))
            if values is None or not _reaches_projection(node, b, consumers, o_nodes):
                continue
            gates.append(Gate(b.index, name, const, tuple(float(v) for v in values)))
    return gates


def _per_head(block: AttentionBlock, name: str, arr: np.ndarray) -> np.ndarray | None:
    """One value per head when ``arr`` holds exactly that (equal within every head); else None."""
    t = block.tensor(name)
    if arr.ndim < max(t.axes, default=-1) + 1 or tuple(arr.shape[a] for a in t.axes) != np.shape(t.owner):
        return None
    owner = np.asarray(t.owner)
    moved = np.moveaxis(arr, t.axes, range(len(t.axes)))
    values = np.full(block.num_heads, np.nan)
    for pos in np.ndindex(owner.shape):
        unit = int(owner[pos])
        if unit < 0 or len(block.units[unit]) != 1:
            return None
        h = next(iter(block.units[unit]))
        sub = np.asarray(moved[pos])
        if sub.size and not np.all(sub == sub.flat[0]):
            return None
        v = float(sub.flat[0])
        if not np.isnan(values[h]) and values[h] != v:
            return None
        values[h] = v
    return None if np.any(np.isnan(values)) else values


def _reaches_projection(mul, block: AttentionBlock, consumers, o_nodes) -> bool:
    """True when everything downstream of ``mul`` within the block leads to the output projection without
    passing the Softmax: the gate then scales a path that is linear in each head."""
    inside = set(block.nodes)
    stack, seen, reached = [mul], set(), False
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if id(n) in o_nodes:
            reached = True
            continue
        if n.name == block.core or n.op_type == "Softmax":
            return False
        for out in n.output:
            for c in consumers.get(out, []):
                if c.name in inside or id(c) in o_nodes:
                    stack.append(c)
    return reached


def fold_gates(model: onnx.ModelProto, blocks, gates: list[Gate]) -> onnx.ModelProto:
    """A copy of ``model`` with every gate folded into its block's output-projection rows and the gating
    ``Mul`` removed: the same function, without the gate."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    own_weights(out, [b.o_proj.weight for b in blocks])
    by_index = {b.index: b for b in blocks}
    for g in gates:
        b = by_index[g.block]
        proto = own_constant(out, b.o_proj.weight)
        w = numpy_helper.to_array(proto).copy()
        t = b.tensor(b.o_proj.weight)
        scale = np.ones(w.shape[t.axes[0]], dtype=np.float64)
        for pos, unit in enumerate(t.owner):
            if unit >= 0 and len(b.units[unit]) == 1:
                scale[pos] = g.values[next(iter(b.units[unit]))]
        shape = [1] * w.ndim
        shape[t.axes[0]] = -1
        w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
        proto.CopyFrom(numpy_helper.from_array(w, proto.name))
        mul = next(n for n in out.graph.node if n.name == g.node)
        source = next(i for i in mul.input if i != g.constant)
        for n in out.graph.node:
            n.input[:] = [source if i == mul.output[0] else i for i in n.input]
        for o in out.graph.output:
            if o.name == mul.output[0]:
                o.name = source
        out.graph.node.remove(mul)
    return out
