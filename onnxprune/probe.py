"""Concrete shapes of every tensor, from one ONNX Runtime run on synthetic inputs.

The matcher needs real sizes (to split a Reshape into axis groups, to align broadcasts), and exporters
compute many shapes at run time (``Shape -> Gather -> Concat -> Reshape``). One run with every
intermediate tensor exposed as a graph output answers all of that exactly.
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import InputError

BATCH = 2
SEQ = 5
PAST = 0          # the prompt step: ORT's GroupQueryAttention takes a past only at batch 1


def _dim_value(dim, batch: int, seq: int, past: int, hints: dict[str, int]) -> int:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return dim.dim_value
    param = dim.dim_param.lower()
    if param in hints:
        return hints[param]
    if "batch" in param:
        return batch
    if "total" in param:
        return past + seq
    if "past" in param:
        return past
    return seq


def _cache_hints(model: onnx.ModelProto) -> dict[str, int]:
    """Symbolic sizes that only the graph can tell: the head size of a KV cache ("kv_cache_dim"), read off
    the GroupQueryAttention node that takes the cache and the packed QKV weight in front of it."""
    hints = {}
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name: i for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 5:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        heads = attrs.get("num_heads", 0) + 2 * attrs.get("kv_num_heads", 0)
        mm = producers.get(node.input[0])
        weight = inits.get(mm.input[1]) if mm is not None and mm.op_type == "MatMul" else None
        if weight is None or not heads or (node.input[1] if len(node.input) > 1 else ""):
            continue
        for name in node.input[3:5]:
            if name in inputs:
                last = inputs[name].type.tensor_type.shape.dim[-1]
                if last.dim_param:
                    hints[last.dim_param.lower()] = int(weight.dims[-1]) // heads
    return hints


def synth_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = BATCH, seq: int = SEQ,
                 past: int = PAST) -> dict[str, np.ndarray]:
    """Plausible inputs for every graph input: token ids, all-ones masks, positions, random floats.

    Symbolic dimensions get ``batch`` when named like a batch, ``past`` (a KV cache's past length) when
    named like a past length, ``past + seq`` when named like a total length, and ``seq`` otherwise; a KV
    cache's symbolic head size is read from the graph.
    """
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    past = past if any("past" in i.name.lower() for i in model.graph.input) else 0
    hints = _cache_hints(model)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not tt.HasField("elem_type"):
            raise InputError(f"graph input {inp.name!r} is not a tensor")
        shape = [_dim_value(d, batch, seq, past, hints) for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        name = inp.name.lower()
        if tt.elem_type == TensorProto.BOOL:
            value = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            if "mask" in name:
                value = np.ones(shape, dtype=dtype)
                if value.ndim == 2 and shape[0] > 1 and shape[1] > 2:
                    value[-1, -2:] = 0        # one padded row: masks are really exercised
            elif "position" in name:
                value = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy() if shape else \
                    np.zeros(shape, dtype)
            elif "type" in name:
                value = np.zeros(shape, dtype=dtype)
            else:
                value = rng.integers(1, 16, size=shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        feeds[inp.name] = value
    return feeds


def session(model: onnx.ModelProto | bytes | str, optimize: bool = False, providers=None,
            external_dir: str | os.PathLike | None = None):
    """An ORT CPU session with graph optimizations off (so ORT's fusions cannot hide a bug).

    ``external_dir``: the folder of the external data files that ``model`` (loaded without them) refers to.
    """
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if external_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_dir))
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, opts, providers=providers or ["CPUExecutionProvider"])


def probe(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
          external_dir: str | os.PathLike | None = None):
    """Shape of every tensor in the main graph from one run, and the values of the small integer ones.

    Returns ``(shapes, values)``: ``shapes`` covers initializers too; ``values`` holds the integer tensors
    of at most 64 elements (shape vectors and the like), which the shape tracer reads.
    """
    feeds = feeds if feeds is not None else synth_inputs(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    del g.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(inferred.value_info) + list(inferred.output) + list(inferred.input)}
    except Exception:   # shape inference is only a source of element types here
        types = {}
    have = {o.name for o in g.output}
    for node in g.node:
        for out in node.output:
            if out and out not in have:
                # without a type (after contrib ops, which onnx cannot infer) ORT fills in its own
                g.output.append(helper.make_tensor_value_info(out, types[out], None) if types.get(out)
                                else onnx.ValueInfoProto(name=out))
                have.add(out)
    try:
        sess = session(probe, external_dir=external_dir)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, feeds)
    except Exception as exc:
        msg = re.sub(r"\s+", " ", str(exc))[:300]
        raise InputError(f"onnxruntime could not run the model on synthetic inputs: {msg}") from None
    shapes = {n: tuple(v.shape) for n, v in zip(names, values)}
    small = {n: v for n, v in zip(names, values)
             if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and v.size <= 64}
    shapes.update({k: tuple(v.shape) for k, v in feeds.items()})
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes, small
