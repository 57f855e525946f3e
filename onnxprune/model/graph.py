"""onnx-graphsurgeon graphs: made from a model with every node named, and the constants read through them.
This is the one module that touches graphsurgeon's internals (a lazily loaded constant's ``_values``)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .external import read_external
from .proto import unique_names


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx-graphsurgeon graph, every node with a unique name (as ``name_nodes`` gives them)."""
    graph = gs.import_onnx(model)
    names = unique_names(graph.nodes, lambda n: n.op)
    for node, name in zip(graph.nodes, names or ()):
        node.name = name
    return graph


def attach_external(graph: gs.Graph, base_dir: str | os.PathLike):
    """Let the graph's constants whose data sits in external files be read from ``base_dir``, on demand and
    without being kept (``headflow.const_value``): only the attention weights are ever read, one at a time,
    and the others are written out by streaming their bytes (``save_model_atomic``)."""
    from onnx.external_data_helper import uses_external_data as external
    for t in graph.tensors().values():
        lazy = getattr(t, "_values", None)
        if isinstance(t, gs.Constant) and hasattr(lazy, "tensor") and external(lazy.tensor):
            lazy.base_dir = str(base_dir)


def identity_source(t):
    """The tensor behind a chain of Identity nodes (TorchScript shares equal weights through them)."""
    while len(t.inputs) == 1 and t.inputs[0].op == "Identity" and t.inputs[0].inputs:
        t = t.inputs[0].inputs[0]
    return t


def const_value(t) -> np.ndarray | None:
    """The value of a constant tensor: an initializer or the output of a Constant node, also through
    Identity. Data in an external file (``attach_external``) is read from disk each time, never kept."""
    t = identity_source(t)
    if isinstance(t, gs.Constant):
        lazy = getattr(t, "_values", None)
        if getattr(lazy, "base_dir", None):
            return read_external(lazy.tensor, lazy.base_dir)
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        if "value" in attrs:
            return np.asarray(attrs["value"].values)
        for key in ("value_ints", "value_floats", "value_int", "value_float"):
            if key in attrs:
                return np.asarray(attrs[key])
    return None


def is_const(t) -> bool:
    t = identity_source(t)
    return isinstance(t, gs.Constant) or (len(t.inputs) == 1 and t.inputs[0].op == "Constant")


def set_values(const: gs.Constant, values: np.ndarray):
    """Give ``const`` new values, in memory now even if the original sat in an external file."""
    const.values = values
    const.data_location = None


def export_light(graph: gs.Graph, min_bytes: int) -> onnx.ModelProto:
    """``gs.export_onnx(graph)``, each in-memory constant of ``min_bytes`` or more written into its initializer one
    at a time, its array let go as soon as it is (the graph's constants become empty). onnx-graphsurgeon makes
    every tensor's proto, then ``make_graph`` copies them all: three copies of the cut weights at once (an 8B
    fp32 model's attention, cut: 7.7 GiB where one copy is 2.5)."""
    held = {}
    for t in graph.tensors().values():
        values = getattr(t, "_values", None)
        if isinstance(t, gs.Constant) and isinstance(values, np.ndarray) and values.nbytes >= min_bytes:
            held[t.name] = values
            t.values = np.zeros((0,), dtype=values.dtype)
    model = gs.export_onnx(graph, do_type_check=False)
    for init in model.graph.initializer:
        arr = held.pop(init.name, None)
        if arr is not None:
            del init.dims[:]
            init.dims.extend(arr.shape)
            init.raw_data = np.ascontiguousarray(arr).tobytes()
            del arr
    if held:
        raise ValueError(f"constants {sorted(held)[:3]} are not initializers of the exported model")
    return model
