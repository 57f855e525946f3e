"""Concrete shapes of every tensor, from one ONNX Runtime run on synthetic inputs.

The matcher needs real sizes (to split a Reshape into axis groups, to align broadcasts), and exporters
compute many shapes at run time (``Shape -> Gather -> Concat -> Reshape``). One run with every
intermediate tensor exposed as a graph output answers all of that exactly.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper

from .errors import InputError, OnnxPruneError
from .inputs import synth_inputs
from .model import dtypes
from .model.proto import consumers, copy_without_initializers, large_weights
from .runtime import ort_reason, session


class Shapes(dict):
    """Tensor name -> the shape seen in the probe run. ``static`` holds, per tensor, the sizes that onnx's
    shape inference finds fixed from the declared input shapes (None where they follow the inputs)."""

    static: dict = {}

    def is_static(self, name: str, axis: int) -> bool:
        dims = self.static.get(name)
        return bool(dims) and axis < len(dims) and dims[axis] is not None and dims[axis] == self[name][axis]


def light_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of ``model`` for probing, without its large weights.

    Shapes do not depend on weight values, so every floating-point initializer of 1 MiB or more is replaced
    by an ``Expand`` of one small value to its shape: the probe then neither copies nor reads the weights
    (a model above 2 GB is probed in the memory of its activations), and ONNX Runtime frees each stand-in
    after its last use. Each stand-in comes right before its first reader: ONNX Runtime runs nodes in the order
    given where the graph allows, and stand-ins put first (they depend on nothing) were all made before the
    first layer ran, the whole model at once (a 1.5 GB fp16 model probed in 2.43 GiB; issue 26). A weight read only
    by MatMul or by a Gather of rows gets no stand-in at all (``_light_reader``). Integer tensors (shapes, indices)
    stay real. Returns the copy and the names that are the copy's own (stand-ins, light readers' tensors).
    """
    probe = copy_without_initializers(model, value_info=False)
    g, src = probe.graph, model.graph
    stand_ins, nodes = large_weights(model, dtypes.STAND_IN_BYTES), []
    readers = consumers(model)
    light = {t.name for t in src.initializer if t.name in stand_ins and _light(t, readers.get(t.name, []))}
    for init in src.initializer:
        if init.name in light:
            continue
        if init.name in stand_ins:
            value = helper.make_tensor(f"{init.name}__value", init.data_type, [], [0.02])
            shape = helper.make_tensor(f"{init.name}__shape", onnx.TensorProto.INT64, [len(init.dims)], list(init.dims))
            g.initializer.extend([value, shape])
            nodes.append(helper.make_node("Expand", [value.name, shape.name], [init.name],
                                          name=f"{init.name}__stand_in"))
        else:
            g.initializer.append(init)
    pending = {n.output[0]: n for n in nodes}
    weights = {t.name: t for t in src.initializer}
    own = set()          # the light readers' own tensors, which the probe does not report
    for node in src.node:        # each stand-in just before its first reader
        for name in node.input:
            if name in pending:
                g.node.append(pending.pop(name))
        light_in = [i for i in node.input if i in light]
        if light_in:
            made = _light_reader(node, weights[light_in[0]], g)
            g.node.extend(made)
            own |= {o for n in made for o in n.output if o not in node.output}
        else:
            g.node.append(node)
    g.node.extend(pending.values())      # read by no node (a graph output): last
    return probe, stand_ins | own


def _light(weight: onnx.TensorProto, readers: list) -> bool:
    """Whether every reader of ``weight`` can run without it (``_light_reader``): a MatMul by the 2-D weight, or a
    Gather of its rows (an embedding)."""
    def ok(n):
        if n.op_type == "MatMul":
            return list(n.input).index(weight.name) == 1 and len(weight.dims) == 2
        if n.op_type == "Gather":
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            return n.input[0] == weight.name and n.input[1] != weight.name and axis == 0 and len(weight.dims) >= 1
        return False
    return bool(readers) and all(ok(n) for n in readers)


def _light_reader(node: onnx.NodeProto, weight: onnx.TensorProto, g: onnx.GraphProto) -> list:
    """Nodes that give ``node``'s output the shape (and, for the Expand stand-in's constant weight, the values)
    it has, without making the weight: the largest weights (an LLM's embedding and output head, [128256, 4096],
    2.1 GB in fp32) were the probe's peak.

    * ``MatMul(x, W)`` with W [K, N] of one value c: each output is c times the sum of x's row, so
      ``Expand(MatMul(x, ones[K, 1]) * c, [N])``;
    * ``Gather(W, ids)``: every row is alike, so row 0 of a one-row table, gathered at ``ids - ids``."""
    out, p = node.output[0], f"{node.name or node.output[0]}__light"
    value = helper.make_tensor(f"{p}_value", weight.data_type, [], [0.02])
    if node.op_type == "MatMul":
        k, n = weight.dims
        ones = helper.make_tensor(f"{p}_ones", weight.data_type, [k, 1], [1.0] * k)
        size = helper.make_tensor(f"{p}_size", onnx.TensorProto.INT64, [1], [n])
        g.initializer.extend([value, ones, size])
        return [helper.make_node("MatMul", [node.input[0], ones.name], [f"{p}_sum"], name=f"{p}_sum"),
                helper.make_node("Mul", [f"{p}_sum", value.name], [f"{p}_scaled"], name=f"{p}_scaled"),
                helper.make_node("Expand", [f"{p}_scaled", size.name], [out], name=node.name)]
    row = helper.make_tensor(f"{p}_shape", onnx.TensorProto.INT64, [len(weight.dims)], [1] + list(weight.dims[1:]))
    g.initializer.extend([value, row])
    ids = node.input[1]
    return [helper.make_node("Expand", [value.name, row.name], [f"{p}_row"], name=f"{p}_row"),
            helper.make_node("Sub", [ids, ids], [f"{p}_zeros"], name=f"{p}_zeros"),
            helper.make_node("Gather", [f"{p}_row", f"{p}_zeros"], [out], name=node.name, axis=0)]


def in_fp32(probe: onnx.ModelProto, external_dir=None) -> bool:
    """Turn the probe's copy of an fp16 (or bf16) model into fp32, in place; whether it had any half type.

    Shapes do not depend on the float type, and ONNX Runtime's CPU provider has few half kernels: it casts each
    half weight to fp32 before a MatMul, and the casts of the stand-ins made the whole model at once (a 1.5 GB fp16
    model probed in 1.56 GiB, its fp32 twin in 0.34 GiB). Half initializers, Constants and ConstantOfShape values
    become fp32, a Cast to half casts to fp32, half graph inputs and outputs are declared fp32."""
    from onnx import numpy_helper

    def widen(t: onnx.TensorProto) -> bool:
        if t.data_type not in dtypes.HALF_TYPES:
            return False
        value = numpy_helper.to_array(t, base_dir=str(external_dir or "")).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(value, t.name))
        return True

    g = probe.graph
    found = any([widen(t) for t in g.initializer])
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type in dtypes.HALF_TYPES:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            found = True
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type == "Cast" and a.i in dtypes.HALF_TYPES:
                a.i = onnx.TensorProto.FLOAT
                found = True
            elif a.type == onnx.AttributeProto.TENSOR:
                found = widen(a.t) or found
    return found


def probe(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
          external_dir: str | os.PathLike | None = None, wanted: set[str] | None = None, view: bool = False):
    """Shape of every tensor in the main graph from one run, and the values of the small integer ones.

    Returns ``(shapes, values)``: ``shapes`` covers initializers too; ``values`` holds the integer tensors
    of at most 64 elements (shape vectors and the like), which the shape tracer reads. ``wanted``: only these
    tensors (ONNX Runtime keeps every requested one alive to the end of the run: at a long length, asking
    for all of them takes much memory).
    """
    given = feeds is not None
    feeds = feeds if given else synth_inputs(model)
    probe, stand_ins = light_copy(model)
    if in_fp32(probe, external_dir):       # the same shapes, in fp32 kernels: no cast copy of every weight
        feeds = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}
    g = probe.graph
    static = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
        infos = list(inferred.value_info) + list(inferred.output) + list(inferred.input)
        types = {v.name: v.type.tensor_type.elem_type for v in infos}
        static = {v.name: tuple(d.dim_value if d.HasField("dim_value") else None
                                for d in v.type.tensor_type.shape.dim)
                  for v in infos if v.type.tensor_type.HasField("shape")}
    except Exception:   # shape inference is only a source of element types and static sizes here
        types = {}
    have = {o.name for o in g.output} | stand_ins
    for node in g.node:
        for out in node.output:
            if out and out not in have and (wanted is None or out in wanted):
                # without a type (after contrib ops, which onnx cannot infer) ORT fills in its own
                g.output.append(helper.make_tensor_value_info(out, types[out], None) if types.get(out)
                                else onnx.ValueInfoProto(name=out))
                have.add(out)
    try:
        sess = session(probe, external_dir=external_dir)
    except Exception as exc:
        raise _load_failure(model, external_dir, exc, view) from None
    try:
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, feeds)
    except Exception as exc:
        which = "the given inputs (calibration data, feeds)" if given else "synthetic inputs"
        raise InputError(f"onnxruntime could not run the model on {which}: {ort_reason(exc)}") from None
    shapes = Shapes({n: tuple(v.shape) for n, v in zip(names, values)})
    shapes.static = static
    small = {n: v for n, v in zip(names, values)
             if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and v.size <= 64}
    shapes.update({k: tuple(v.shape) for k, v in feeds.items()})
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes, small


def _load_failure(model, external_dir, exc: Exception, view: bool) -> OnnxPruneError:
    """Whose fault it is that onnxruntime would not load the probe's copy of ``model``: the model's (it does
    not load either: an ``InputError``), or onnxprune's own (its copy, or its float view of a quantized model,
    ``view``): never the user's model for the tool's intermediate."""
    reason = ort_reason(exc)
    if view:
        return OnnxPruneError(f"onnxprune's float view of this quantized model does not load in onnxruntime (a fault "
                              f"of onnxprune, not of the model; please report it): {reason}")
    if external_dir is None and model.ByteSize() < (1 << 30):       # small enough to try the model itself
        try:
            session(model)
        except Exception as own:
            return InputError(f"onnxruntime cannot load the model: {ort_reason(own)}")
        return OnnxPruneError(f"onnxprune's probe copy of the model does not load in onnxruntime, though the model "
                              f"does (a fault of onnxprune, not of the model; please report it): {reason}")
    return InputError(f"onnxruntime cannot load the model (or onnxprune's probe copy of it): {reason}")
