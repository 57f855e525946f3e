"""The edited graph back to a model: unused nodes removed (the original's own dead ones kept), the original's
model-level fields and shape annotations, then the strongest ONNX checks that the original passes."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..errors import RewriteError
from ..model import dtypes
from ..model.graph import export_light
from ..model.proto import copy_without_initializers, large_weights

def dead_nodes(graph: gs.Graph) -> list:
    """Nodes that no graph output depends on. Call before editing: they are the original's, and stay."""
    live, stack = set(), [t for t in graph.outputs]
    while stack:
        t = stack.pop()
        for node in t.inputs:
            if id(node) not in live:
                live.add(id(node))
                stack.extend(i for i in node.inputs if i is not None)
    return [n for n in graph.nodes if id(n) not in live]


def export(graph: gs.Graph, original: onnx.ModelProto, keep: list | tuple = ()) -> onnx.ModelProto:
    """gs graph -> ModelProto with the original's model-level fields, fresh shape information, checked.

    The nodes that the edits left unused are removed; ``keep`` (the original's own dead nodes) stay.
    """
    graph.cleanup(remove_unused_graph_inputs=False)
    present = {id(n) for n in graph.nodes}
    graph.nodes.extend(n for n in keep if id(n) not in present)
    graph.toposort()
    model = export_light(graph, dtypes.STAND_IN_BYTES)
    model.ir_version = original.ir_version
    model.producer_name, model.producer_version = original.producer_name, original.producer_version
    model.domain, model.model_version, model.doc_string = original.domain, original.model_version, \
        original.doc_string
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    if not model.functions and original.functions:
        model.functions.extend(original.functions)
    del model.graph.value_info[:]
    _keep_output_ranks(model, original)
    if original.graph.value_info:
        _refresh_value_info(model, original)
    return model


def _refresh_value_info(model: onnx.ModelProto, original: onnx.ModelProto):
    """The original's intermediate shape annotations (value_info), recomputed for the pruned graph.

    Exporters and converters (ORT's float16 converter, for one) store them, and ONNX Runtime's fusions read
    them; a stale one would be wrong, and none at all can cost a fusion. So every tensor the original
    annotated gets the shape that onnx's inference finds for it in the pruned model, or no annotation
    where inference cannot tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), data_prop=True).graph
    except Exception:         # contrib ops onnx cannot infer: no annotation is safer than a stale one
        return
    fresh = {v.name: v for v in inferred.value_info}
    produced = {o for n in model.graph.node for o in n.output}
    model.graph.value_info.extend(fresh[v.name] for v in original.graph.value_info
                                  if v.name in fresh and v.name in produced)


def _keep_output_ranks(model: onnx.ModelProto, original: onnx.ModelProto):
    """A graph output that lost its shape gets the one the original's output or value_info had: after
    contrib ops, onnx's inference cannot rebuild it, and the full checker wants one."""
    known = {v.name: v for v in list(original.graph.value_info) + list(original.graph.output)
             if v.type.tensor_type.HasField("shape")}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.HasField("shape") or out.name not in known:
            continue
        tt.shape.CopyFrom(known[out.name].type.tensor_type.shape)   # graph outputs never carry heads


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every floating-point initializer of 1 MiB or more turned into a graph input of the same
    type and shape. The checks read types and shapes, not weight values: checking this copy costs the
    memory of the graph, not of the weights (and works for models above 2 GB)."""
    light = copy_without_initializers(model)
    light.graph.node.extend(model.graph.node)
    weights = large_weights(model, dtypes.STAND_IN_BYTES)
    for init in model.graph.initializer:
        if init.name in weights:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            light.graph.initializer.append(init)
    return light


def _strict_check(model: onnx.ModelProto) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(_weightless(model), check_type=True, strict_mode=True,
                                                 data_prop=True)
    onnx.checker.check_model(inferred, full_check=True)
    return model


def _plain_check(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(_weightless(model))
    return model


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def check_model(model: onnx.ModelProto, original: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Strict shape inference and the full checker (on a copy without the large weights); returns ``model``.

    No check can ask more of the output than of the input: when the original fails the strict checks
    (ONNX Runtime's contrib ops that the GenAI builder puts in the default domain, unknown to onnx), the
    output must pass the strongest check the original passes, or, when the original passes none, fail it
    for the same reason and no other. ONNX Runtime then judges both (verification).
    """
    try:
        return _strict_check(model)
    except Exception as exc:
        reason = _first_line(exc)
    if original is not None:
        for level in (_strict_check, _plain_check):
            try:
                level(original)
            except Exception as exc:
                original_reason = _first_line(exc)
                continue
            try:
                return level(model)
            except Exception as exc:
                reason = _first_line(exc)
                break
        else:
            try:
                _plain_check(model)
                return model
            except Exception as exc:
                if _first_line(exc) == original_reason:
                    return model
                reason = _first_line(exc)
    raise RewriteError(f"the pruned model fails the ONNX checks: {reason}")
