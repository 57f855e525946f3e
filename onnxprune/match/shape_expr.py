"""Where does element j of a shape vector come from, and how to rebuild the vector with new values.

Exporters write a Reshape target as a constant (``[0, 0, 12, 64]``), as a Concat of constants and runtime
pieces (``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1], [64])``), or as arithmetic on runtime sizes
(``Mul(Gather(Shape(x), 0), 12)``, the B*H of Bloom-style layouts). ``locate`` walks that expression to the
constant (or runtime size) behind one element; ``rebuild`` writes a new vector that differs only in the
chosen elements, without touching any tensor that other nodes still read: constants are copied, and the
nodes on the way are duplicated.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx_graphsurgeon as gs

from ..model.graph import const_value

_fresh = itertools.count()


@dataclass(frozen=True)
class Const:
    value: int


@dataclass(frozen=True)
class Dim:
    tensor: str      # Shape(tensor)[axis]
    axis: int


@dataclass(frozen=True)
class Arith:
    op: str
    const: int       # the constant operand
    other: object    # Const | Dim | Arith | Unknown of the other operand


@dataclass(frozen=True)
class Unknown:
    why: str


@dataclass(frozen=True)
class Keep:
    """A change that keeps an element's value while the runtime size it is computed from is multiplied by
    ``factor``: Bloom's ``(B*H) / H`` stays B when B*H becomes B*H' and the divisor becomes H'."""
    factor: Fraction


@dataclass(frozen=True)
class Fixed:
    """A change that replaces an element computed at run time from a fixed size (the model width, read off
    an input's shape) by a constant."""
    value: int


def leaf(src):
    """The Const, Dim or Unknown under a chain of arithmetic, and the operations on the way."""
    ops = []
    while isinstance(src, Arith):
        ops.append(src.op)
        src = src.other
    return src, ops


def _len(shapes, t) -> int | None:
    shape = shapes.get(t.name)
    if shape is None:
        return None
    return 1 if len(shape) == 0 else shape[0]


def locate(t, j: int | None, shapes) -> object:
    """Source of element ``j`` of 1-D tensor ``t`` (``j=None`` for a scalar)."""
    val = const_value(t)
    if val is not None:
        flat = np.atleast_1d(val).reshape(-1)
        return Const(int(flat[0 if j is None else j]))
    if not t.inputs:
        return Unknown(f"graph input {t.name}")
    node = t.inputs[0]
    op = node.op
    if op == "Concat":
        off = 0
        for piece in node.inputs:
            n = _len(shapes, piece)
            if n is None:
                return Unknown(f"unknown length of {piece.name}")
            if j < off + n:
                return locate(piece, j - off, shapes)
            off += n
        return Unknown("index past the end of a Concat")
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape", "Flatten"):
        src = node.inputs[0]
        n = _len(shapes, src)
        return locate(src, None if (shapes.get(src.name) == () or n == 1) else j, shapes)
    if op == "Where" and j is not None:
        # TorchScript's expand: Where(Equal(s, -1), 1, s) only replaces the -1 entries of s
        src = locate(node.inputs[2], j, shapes)
        if isinstance(src, Const) and src.value == -1:
            return Unknown(f"Where node {node.name}")
        return src     # a runtime size is never -1, so Where passes it through
    if op == "ConstantOfShape":
        value = node.attrs.get("value")
        value = np.zeros(1) if value is None else np.asarray(value.values if hasattr(value, "values") else value)
        return Const(int(value.reshape(-1)[0]))
    if op == "Shape":
        start = node.attrs.get("start", 0)
        rank = len(shapes.get(node.inputs[0].name, ()))
        start = start + rank if start < 0 else start
        return Dim(node.inputs[0].name, start + (j or 0))
    if op == "Slice":
        starts = const_value(node.inputs[1])
        steps = const_value(node.inputs[4]) if len(node.inputs) > 4 else None
        n = _len(shapes, node.inputs[0])
        if starts is None or n is None or (steps is not None and int(np.atleast_1d(steps)[0]) != 1):
            return Unknown(f"Slice node {node.name}")
        start = int(np.atleast_1d(starts)[0])
        start = max(0, start + n if start < 0 else min(start, n))
        return locate(node.inputs[0], start + (j or 0), shapes)
    if op == "Split" and node.attrs.get("axis", 0) in (0, -1):
        # ONNX Runtime's optimizer turns Gathers and Slices of a shape vector into one Split
        off = 0
        for out in node.outputs:
            if out is t:
                return locate(node.inputs[0], off + (j or 0), shapes)
            n = _len(shapes, out)
            if n is None:
                return Unknown(f"unknown length of {out.name}")
            off += n
    if op == "Gather" and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Shape":
        idx = const_value(node.inputs[1])
        if idx is None:
            return Unknown(f"runtime index in {node.name}")
        idx = np.atleast_1d(idx).reshape(-1)[0 if j is None else j]
        return locate(node.inputs[0], int(idx), shapes)
    if op in ("Mul", "Div", "Add", "Sub"):
        a, b = node.inputs
        ca, cb = const_value(a), const_value(b)
        if ca is not None and cb is not None:
            return Unknown(f"constant arithmetic in {node.name}")
        if cb is not None:
            return Arith(op, int(np.atleast_1d(cb).reshape(-1)[0]), locate(a, None if _len(shapes, a) == 1 else j,
                                                                        shapes))
        if ca is not None and op in ("Mul", "Add"):
            return Arith(op, int(np.atleast_1d(ca).reshape(-1)[0]), locate(b, None if _len(shapes, b) == 1 else j,
                                                                        shapes))
        return Unknown(f"{op} of two runtime sizes in {node.name}")
    return Unknown(f"{op} node {node.name}")


def evaluate(src, size: int) -> int | None:
    """The element's value when the runtime size under ``src`` is ``size``; None where a step is inexact."""
    if isinstance(src, Const):
        return src.value
    if isinstance(src, Dim):
        return size
    if not isinstance(src, Arith):
        return None
    x = evaluate(src.other, size)
    if x is None:
        return None
    if src.op == "Div":
        return x // src.const if src.const and x % src.const == 0 else None
    return {"Mul": x * src.const, "Add": x + src.const, "Sub": x - src.const}[src.op]


def bound_value(t, shapes, values: dict, tensors: dict):
    """A Slice bound: constant, or computed from fixed sizes only (``fixed_value``); else None."""
    val = const_value(t)
    return val if val is not None else fixed_value(t, shapes, values, tensors)


def fixed_value(t, shapes, values: dict, tensors: dict):
    """The value of 1-D integer tensor ``t`` when every element is a constant, or arithmetic on sizes that
    are fixed (a model width read at run time: TorchScript's ``nn.MultiheadAttention`` cuts its packed
    weight at ``Shape(q)[-1]``), so that the probed value holds at any input size; else None."""
    if t.name not in values:
        return None
    n = _len(shapes, t)
    if n is None:
        return None
    scalar = shapes.get(t.name) == ()
    if all(_fixed_element(t, None if scalar else j, shapes, tensors) for j in range(n)):
        return np.asarray(values[t.name])
    return None


def _fixed_element(t, j, shapes, tensors, depth: int = 0) -> bool:
    if const_value(t) is not None:
        return True
    node = t.inputs[0] if t.inputs else None
    if node is not None and depth < 16:
        if node.op in ("Add", "Sub", "Mul", "Div") and all(const_value(i) is None for i in node.inputs):
            return all(_fixed_element(i, None if _len(shapes, i) == 1 else j, shapes, tensors, depth + 1)
                       for i in node.inputs)      # two runtime sizes: E + 2E
        if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
            src = node.inputs[0]
            one = shapes.get(src.name) == () or _len(shapes, src) == 1
            return _fixed_element(src, None if one else j, shapes, tensors, depth + 1)
        if node.op == "Concat" and j is not None:
            off = 0
            for piece in node.inputs:
                size = _len(shapes, piece)
                if size is None:
                    return False
                if j < off + size:
                    return _fixed_element(piece, j - off, shapes, tensors, depth + 1)
                off += size
    src, _ = leaf(locate(t, j, shapes))
    return not isinstance(src, Unknown) and (not isinstance(src, Dim) or is_fixed(src, shapes, tensors))


def is_fixed(dim: Dim, shapes, tensors: dict, depth: int = 0) -> bool:
    """Size ``dim`` is the same at any input size: shape inference says so, or it is carried unchanged
    from a fixed size through Transpose, Expand or Tile by 1 (which shape inference gives up on when the
    repeats are computed at run time, as for SigLIP's pooling probe tiled over the batch)."""
    if hasattr(shapes, "is_static") and shapes.is_static(dim.tensor, dim.axis):
        return True
    t = tensors.get(dim.tensor)
    if t is None or depth > 8:
        return False
    if const_value(t) is not None:
        return True
    if not t.inputs:
        return False
    node = t.inputs[0]
    x = node.inputs[0] if node.inputs else None
    if x is None or x.name not in shapes:
        return False
    rank, in_rank = len(shapes[t.name]), len(shapes[x.name])
    if node.op in ("Identity", "Cast", "Neg", "Add", "Sub", "Mul", "Div") and rank == in_rank and \
            all(i.name in shapes and len(shapes[i.name]) <= rank and
                (const_value(i) is not None or i is x) for i in node.inputs):
        return is_fixed(Dim(x.name, dim.axis), shapes, tensors, depth + 1)
    if node.op == "Transpose":
        perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
        return is_fixed(Dim(x.name, perm[dim.axis]), shapes, tensors, depth + 1)
    if node.op in ("Expand", "Tile"):
        ia = dim.axis - (rank - in_rank)
        if ia < 0:
            return False
        factor = locate(node.inputs[1], ia if node.op == "Tile" else dim.axis - (rank - _len(shapes, node.inputs[1])),
                        shapes)
        if not (isinstance(factor, Const) and factor.value == 1):
            return False
        return is_fixed(Dim(x.name, ia), shapes, tensors, depth + 1)
    return False


def describe(src) -> str:
    if isinstance(src, Dim):
        return f"computed at runtime from the shape of {src.tensor}"
    if isinstance(src, Unknown):
        return f"computed at runtime ({src.why})"
    if isinstance(src, Arith):
        return f"{src.op} by {src.const} of a value " + describe(src.other)
    return f"constant {src.value}"


def _copy_node(graph: gs.Graph, node, inputs) -> gs.Variable:
    out = gs.Variable(f"{node.outputs[0].name}__onnxprune{next(_fresh)}", dtype=node.outputs[0].dtype)
    new = gs.Node(node.op, name=f"{node.name}__onnxprune{next(_fresh)}", attrs=dict(node.attrs),
                  inputs=list(inputs), outputs=[out], domain=node.domain)
    graph.nodes.append(new)
    return out


def rebuild(graph: gs.Graph, t, changes: dict, shapes, values: dict) -> object:
    """A tensor equal to ``t`` except ``changes`` ({index or None: new value or Keep}); ``t`` itself is
    untouched. ``values`` holds the probed values of small integer tensors, to solve arithmetic."""
    if changes and all(isinstance(v, Fixed) for v in changes.values()) and _len(shapes, t) == 1:
        (value,) = {v.value for v in changes.values()}
        dtype = np.int64
        scalar = shapes.get(t.name) == ()
        return gs.Constant(f"{t.name}__onnxprune{next(_fresh)}",
                           np.array(value if scalar else [value], dtype=dtype))
    val = const_value(t)
    if val is not None:
        arr = np.array(val, copy=True)
        flat = arr.reshape(-1)
        for j, v in changes.items():
            if isinstance(v, Keep):
                raise ValueError(f"{t.name} is a constant, not computed from a runtime size")
            flat[0 if j is None else j] = v
        return gs.Constant(f"{t.name}__onnxprune{next(_fresh)}", arr.reshape(np.shape(val)))
    node = t.inputs[0]
    op = node.op
    if op == "Concat":
        inputs, off = list(node.inputs), 0
        for k, piece in enumerate(node.inputs):
            n = _len(shapes, piece)
            local = {j - off: v for j, v in changes.items() if off <= j < off + n}
            if local:
                inputs[k] = rebuild(graph, piece, local, shapes, values)
            off += n
        return _copy_node(graph, node, inputs)
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape", "Flatten"):
        src = node.inputs[0]
        scalar = shapes.get(src.name) == () or _len(shapes, src) == 1
        local = {None if scalar else j: v for j, v in changes.items()}
        return _copy_node(graph, node, [rebuild(graph, src, local, shapes, values)] + list(node.inputs[1:]))
    if op == "Where":
        return _copy_node(graph, node, list(node.inputs[:2]) + [rebuild(graph, node.inputs[2], changes, shapes,
                                                                         values)])
    if op == "Gather":
        idx = np.atleast_1d(const_value(node.inputs[1])).reshape(-1)
        local = {int(idx[0 if j is None else j]): v for j, v in changes.items()}
        return _copy_node(graph, node, [rebuild(graph, node.inputs[0], local, shapes, values)]
                          + list(node.inputs[1:]))
    if op in ("Mul", "Div", "Add", "Sub"):
        # every change here is a full new value of the scalar result; solve for the constant operand
        a, b = node.inputs
        const_side = 1 if const_value(b) is not None else 0
        c_t, x_t = node.inputs[const_side], node.inputs[1 - const_side]
        c = int(np.atleast_1d(const_value(c_t)).reshape(-1)[0])
        ((j, new),) = changes.items()
        inputs = list(node.inputs)
        if isinstance(new, Keep):
            x_j = None if _len(shapes, x_t) == 1 else j
            if isinstance(locate(x_t, x_j, shapes), Arith):      # the runtime size sits deeper
                inputs[1 - const_side] = rebuild(graph, x_t, {x_j: new}, shapes, values)
                return _copy_node(graph, node, inputs)
            scaled = {"Div": c * new.factor, "Mul": c / new.factor}.get(op)
            if scaled is None or scaled.denominator != 1:
                raise ValueError(f"cannot keep the value of {op} node {node.name} when its input is scaled by "
                                 f"{new.factor}")
            inputs[const_side] = rebuild(graph, c_t, {None: int(scaled)}, shapes, values)
            return _copy_node(graph, node, inputs)
        old = _scalar_value(t, values)
        # the runtime operand x: old = x (op) c
        x = {"Mul": old // c if c else 0, "Div": old * c, "Add": old - c, "Sub": old + c}[op]
        if op == "Mul":
            new_c, rem = divmod(new, x) if x else (0, 1)
        elif op == "Div":
            new_c, rem = divmod(x, new) if new else (0, 1)
        else:
            new_c, rem = (new - x if op == "Add" else x - new), 0
        if rem:
            raise ValueError(f"cannot write {new} as {op} of a runtime size in {node.name}")
        inputs[const_side] = rebuild(graph, c_t, {None: new_c}, shapes, values)
        return _copy_node(graph, node, inputs)
    raise ValueError(f"cannot rebuild the shape computed by {op} node {node.name}")


def _scalar_value(t, values: dict) -> int:
    if t.name not in values:
        raise ValueError(f"value of {t.name} unknown")
    return int(np.atleast_1d(values[t.name]).reshape(-1)[0])
