"""Where each block's output projection is in a model: its weight, its bias (one added where it has none, for
compensation to write into), the context it reads, and which of its positions belong to which heads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..block import AttentionBlock
from ..errors import PlanError
from ..model.proto import consumers as graph_consumers, own_constant

@dataclass
class ProjectionSite:
    """Where one block's output projection is: its weight and bias names, the context it reads."""

    block: AttentionBlock
    weight: str
    bias: str | None
    context: str
    head_axis: int


def find_sites(model: onnx.ModelProto, blocks) -> list[ProjectionSite]:
    consumers = graph_consumers(model)
    inits = {i.name: i for i in model.graph.initializer}
    sites = []
    for b in blocks:
        w = b.o_proj.weight
        mine = {t.name for t in b.tensors}     # a weight shared by blocks (ALBERT) has one reader in each:
        readers = [n for n in consumers.get(w, []) if n.op_type in ("MatMul", "Gemm")]    # the one fed by
        node = next((n for n in readers if any(i in mine for i in n.input if i != w)),      # this block
                    readers[0] if readers else None)
        if node is None:
            raise PlanError(f"block {b.index} ({b.name}): its output projection is not a MatMul or Gemm")
        context = node.input[0] if node.input[1] == w else node.input[1]
        bias = None
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            bias = node.input[2]
        elif node.op_type == "MatMul":
            adds = consumers.get(node.output[0], [])
            if len(adds) == 1 and adds[0].op_type == "Add":
                other = [i for i in adds[0].input if i != node.output[0]]
                if other and other[0] in inits and len(inits[other[0]].dims) == 1:
                    bias = other[0]
        sites.append(ProjectionSite(b, w, bias, context, b.o_proj.head_axis))
    return sites


def add_bias(model: onnx.ModelProto, site: ProjectionSite) -> str:
    """Give a bias-free output projection a zero bias (an Add after it), for compensation to write into."""
    node = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and site.weight in n.input)
    w = own_initializer(model, site.weight)
    width = w.dims[1 - site.head_axis] if len(w.dims) == 2 else w.dims[-1]
    name = f"{site.weight}.onnxprune_bias"
    model.graph.initializer.append(numpy_helper.from_array(
        np.zeros(width, dtype=helper.tensor_dtype_to_np_dtype(w.data_type)), name))
    out = node.output[0]
    node.output[0] = f"{out}.onnxprune_unbiased"
    at = list(model.graph.node).index(node) + 1
    model.graph.node.insert(at, helper.make_node("Add", [node.output[0], name], [out],
                                                 name=f"{node.name or out}.onnxprune_bias"))
    return name


def private_copy(model: onnx.ModelProto, site: ProjectionSite, name: str, value: np.ndarray) -> str:
    """Make ``site``'s projection (or its bias Add) read a copy of ``name`` (whose value is ``value``) that
    no other block reads, so that masking or refitting one block leaves the others alone; returns the
    copy's name."""
    copy = numpy_helper.from_array(value, f"{name}.onnxprune_block{site.block.index}")
    model.graph.initializer.append(copy)
    proj = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and site.context in n.input
                and site.weight in n.input)
    node = proj if name in proj.input else next(n for n in model.graph.node
                                                 if n.op_type == "Add" and proj.output[0] in n.input)
    node.input[list(node.input).index(name)] = copy.name
    if site.weight == name:
        site.weight = copy.name
    else:
        site.bias = copy.name
    return copy.name


def own_initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    """``name``'s tensor as an initializer of its own (a Constant node becomes one), to move or edit."""
    return own_constant(model, name, initializer=True)


def head_columns(block: AttentionBlock, name: str, heads) -> np.ndarray:
    """Positions along ``name``'s head axis that belong to ``heads`` (one-head units only). A block's
    private copy of a shared output projection (see ``private_copy``) has the projection's positions."""
    t = next((t for t in block.tensors if t.name == name), None) or block.tensor(block.o_proj.weight)
    units = [u for u, hs in enumerate(block.units) if len(hs) == 1 and next(iter(hs)) in set(heads)]
    return np.flatnonzero(np.isin(t.owner, units))


def projection_output(model: onnx.ModelProto, block: AttentionBlock, role: str) -> str | None:
    """The tensor that ``block``'s ``role`` projection (q or k) computes, its bias added: the queries or keys of
    every head side by side ([..., H * D]). None where the block has no such projection of its own, or its
    output is not one of the block's head tensors with each head's positions in one run."""
    proj = block.projection(role)
    if proj is None:
        return None
    consumers = graph_consumers(model)
    readers = [n for n in consumers.get(proj.weight, []) if n.op_type in ("MatMul", "Gemm")]
    if len(readers) != 1:
        return None
    out = readers[0].output[0]
    adds = consumers.get(out, [])
    if readers[0].op_type == "MatMul" and len(adds) == 1 and adds[0].op_type == "Add" and proj.bias in adds[0].input:
        out = adds[0].output[0]
    t = next((t for t in block.tensors if t.name == out), None)
    if t is None or len(t.axes) != 1 or t.dim_axis != t.axes[0]:
        return None
    return out


def projection_input(model: onnx.ModelProto, block: AttentionBlock, role: str) -> str | None:
    """The tensor that ``block``'s ``role`` projection reads ([..., E]), where its weight has one reader that
    takes the data first (a MatMul, or ORT's Attention with its packed QKV weight): the queries' and keys'
    moments follow from its moments and the weight when their own tensor is not there to read."""
    proj = block.projection(role)
    if proj is None:
        return None
    readers = graph_consumers(model).get(proj.weight, [])
    if len(readers) != 1 or readers[0].op_type not in ("MatMul", "Attention") or list(readers[0].input).index(
            proj.weight) != 1:
        return None
    return readers[0].input[0]


def broadcast_key(model: onnx.ModelProto, block: AttentionBlock) -> str | None:
    """The one key head that a multi-query block broadcasts to its query heads, read where a QK cut below the q/k
    norms starts (``block.cut_points``; its last axis the head size): the keys' moments when they have no
    projection of their own that the block knows."""
    names = {t.name for t in block.tensors}
    nodes = {n.name: n for n in model.graph.node}
    for name, i, _ in block.cut_points:
        node = nodes.get(name)
        if node is not None and node.input[i] not in names:
            return node.input[i]
    return None
