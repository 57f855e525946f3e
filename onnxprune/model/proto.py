"""Reading and editing an ``onnx.ModelProto``: constants behind names (initializers, Constant nodes,
Identity), tensors owned before they are edited, light copies without weights, node names."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from .dtypes import FLOAT_TYPES
from .external import read_external


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of the main graph that read it, in graph order."""
    out: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def large_weights(model: onnx.ModelProto, threshold: int) -> set[str]:
    """Floating-point initializers of ``threshold`` bytes or more, in memory or in an external file, that
    are not also graph inputs: the weights whose values neither probing nor checking needs."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data as external
    inputs = {i.name for i in model.graph.input}
    return {init.name for init in model.graph.initializer
            if init.data_type in FLOAT_TYPES and init.name not in inputs
            and (ExternalDataInfo(init).length if external(init) else len(init.raw_data)) >= threshold}


def find_constant(model: onnx.ModelProto, name: str) -> tuple[onnx.TensorProto, onnx.NodeProto | None] | None:
    """The tensor behind ``name`` in ``model``: (an initializer, None), (a Constant node's value, the node),
    or, through Identity (TorchScript shares equal weights so), its source's. None when ``name`` is not a
    constant. Reads only: the model is never changed. (The graphsurgeon side has ``headflow.const_value``.)"""
    for init in model.graph.initializer:
        if init.name == name:
            return init, None
    for node in model.graph.node:
        if node.output and node.output[0] == name:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                return node.attribute[0].t, node
            if node.op_type == "Identity":
                return find_constant(model, node.input[0])
            return None
    return None


def constant_array(model: onnx.ModelProto, name: str, external_dir: str | os.PathLike | None = None
                   ) -> np.ndarray | None:
    """The value of constant ``name`` (see ``find_constant``), read from its external data file when it
    has one (``external_dir``: that file's folder); None when ``name`` is not a constant."""
    found = find_constant(model, name)
    if found is None:
        return None
    proto = found[0]
    if uses_external_data(proto):
        return read_external(proto, str(external_dir or "."))
    return numpy_helper.to_array(proto)


def own_constant(model: onnx.ModelProto, name: str, initializer: bool = False) -> onnx.TensorProto:
    """The tensor of constant ``name``, to be edited in place: an initializer, or a Constant node's value
    (made an initializer with ``initializer``). A weight shared through Identity gets a copy of its own
    first, so that editing it leaves the other users alone. Changes ``model``: call it on a copy."""
    found = find_constant(model, name)
    if found is None:
        raise KeyError(name)
    proto, node = found
    via_identity = (proto.name if node is None else node.output[0]) != name
    if via_identity:          # ``name`` is an Identity's output: the Identity goes, a copy takes its place
        node = next(n for n in model.graph.node if n.op_type == "Identity" and n.output[0] == name)
    elif node is None or not initializer:
        return proto
    model.graph.node.remove(node)
    own = model.graph.initializer.add()
    own.CopyFrom(proto)
    own.name = name
    return own


def own_weights(model: onnx.ModelProto, names) -> None:
    """Each of ``names`` that is the Identity of another (a weight TorchScript shared) gets a copy of its
    own, so that editing one leaves the others alone; a shared source itself keeps its tensor."""
    names = set(names)
    sources = {n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.output[0] in names}
    for name in names - sources:
        if find_constant(model, name) is not None:
            own_constant(model, name)


def copy_without_initializers(model: onnx.ModelProto, value_info: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with every field but the graph's initializers (and nodes), which the caller
    fills: copying a model's weights is what the large-model path must never do."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.metadata_props.extend(model.metadata_props)
    g, src = light.graph, model.graph
    g.name, g.doc_string = src.name, src.doc_string
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.sparse_initializer.extend(src.sparse_initializer)
    if value_info:
        g.value_info.extend(src.value_info)
    return light


def sort_nodes(model: onnx.ModelProto) -> bool:
    """Put the main graph's nodes in topological order (in memory); False when they have a cycle or read
    a tensor that nothing makes."""
    graph = model.graph
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            return False
        for n in ready:
            known.update(n.output)
        ready_ids = {id(n) for n in ready}
        ordered += ready
        pending = [n for n in pending if id(n) not in ready_ids]
    nodes = [onnx.NodeProto() for _ in ordered]
    for new, old in zip(nodes, ordered):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def unique_names(nodes, op_of) -> list[str] | None:
    """Every node's name, unnamed ones as ``<op>_<index>`` and repeated ones as ``<name>_<index>``; None
    when every node already has a name of its own."""
    seen, names, changed = set(), [], False
    for i, node in enumerate(nodes):
        name = node.name
        if not name or name in seen:
            name = f"{op_of(node)}_{i}" if name not in seen else f"{name}_{i}"
            changed = True
        seen.add(name)
        names.append(name)
    return names if changed else None


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every node of its main graph named uniquely: the model itself when all are, else a
    named copy (the caller's model is never changed). Named once, before anything reads the model, every
    module can then find a node by its name, in the ModelProto and in the graphsurgeon graph alike."""
    names = unique_names(model.graph.node, lambda n: n.op_type)
    if names is None:
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for node, name in zip(named.graph.node, names):
        node.name = name
    return named
