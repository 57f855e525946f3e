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
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError

BATCH = 2
SEQ = 5
PAST = 0          # the prompt step: ORT's GroupQueryAttention takes a past only at batch 1


def _dim_value(dim, batch: int, seq: int, past: int, hints: dict[str, int], axis: int = 1) -> int:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return dim.dim_value
    param = dim.dim_param.lower()
    if param in hints:
        return hints[param]
    if "+" in param:      # Optimum names a decoder mask's length "past_sequence_length + sequence_length"
        return sum(_named_size(term.strip(), batch, seq, past, hints) for term in param.split("+"))
    return _named_size(param, batch, seq, past, hints, axis)


def _named_size(param: str, batch: int, seq: int, past: int, hints: dict[str, int], axis: int = 1) -> int:
    if param in hints:
        return hints[param]
    if "batch" in param:
        return batch
    if "total" in param:
        return past + seq
    if "past" in param:
        return past
    if "seq" in param or "len" in param:
        return seq
    return batch if axis == 0 else seq     # unnamed (dynamo's s0, s1...): the first axis is the batch


_WIDTH_KEEPERS = {"RotaryEmbedding", "Reshape", "SimplifiedLayerNormalization", "LayerNormalization",
                  "RMSNormalization", "Cast"}


def _constant(name: str, inits: dict, producers: dict):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute:
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _cache_hints(model: onnx.ModelProto) -> dict[str, int]:
    """Symbolic sizes that only the graph can tell: the head size of a KV cache ("kv_cache_dim"), read off
    the GroupQueryAttention node that takes the cache and the (packed or query) weight in front of it."""
    hints = {}
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name: i for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 5:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        packed = not (len(node.input) > 1 and node.input[1])
        # the query width is (H + 2 Hkv) * D when Q/K/V come packed, else H * D
        heads = attrs.get("num_heads", 0) + (2 * attrs.get("kv_num_heads", 0) if packed else 0)
        if attrs.get("sliding_window_cache"):
            # a sliding-window cache is a buffer of at least local_window_size entries (Gemma 3's GenAI folder),
            # whatever part of it the mask says is filled: the prompt step has it empty
            for name in node.input[3:5]:
                dims = inputs[name].type.tensor_type.shape.dim if name in inputs else []
                if len(dims) == 4 and dims[2].dim_param:
                    hints[dims[2].dim_param.lower()] = int(attrs.get("local_window_size", 0))
        t = node.input[0]
        mm = producers.get(t)
        # RoPE, or a q norm over the head size (Gemma 3: Reshape, SimplifiedLayerNormalization, Reshape back)
        while mm is not None and mm.op_type in _WIDTH_KEEPERS:
            t, mm = mm.input[0], producers.get(mm.input[0])
        width = None
        if mm is not None and mm.op_type == "MatMul" and mm.input[1] in inits:
            width = int(inits[mm.input[1]].dims[-1])
        elif mm is not None and mm.op_type == "MatMulNBits":        # int4 (GenAI -p int4): N columns
            width = next((int(helper.get_attribute_value(a)) for a in mm.attribute if a.name == "N"), None)
        elif mm is not None and mm.op_type == "Split" and not packed:      # a packed QKV cut into Q, K, V
            sizes = _constant(mm.input[1], inits, producers) if len(mm.input) > 1 else None
            if sizes is not None:
                width, heads = int(np.asarray(sizes).reshape(-1)[list(mm.output).index(t)]), attrs.get("num_heads", 0)
        if width is None or not heads:
            continue
        for name in node.input[3:5]:
            if name in inputs:
                last = inputs[name].type.tensor_type.shape.dim[-1]
                if last.dim_param:
                    hints[last.dim_param.lower()] = width // heads
    return hints


def synth_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = BATCH, seq: int = SEQ,
                 past: int = PAST) -> dict[str, np.ndarray]:
    """Plausible inputs for every graph input: token ids, all-ones masks, positions, random floats.

    Symbolic dimensions get ``batch`` when named like a batch, ``past`` (a KV cache's past length) when
    named like a past length, ``past + seq`` when named like a total length, ``seq`` when named like a
    length; an unnamed one (dynamo's ``s0``) gets ``batch`` on the first axis and ``seq`` elsewhere. A KV
    cache's symbolic head size is read from the graph.
    """
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    past = past if any("past" in i.name.lower() for i in model.graph.input) else 0
    fixed_batch, fixed_seq = fixed_sizes(model)
    batch, seq = fixed_batch or batch, fixed_seq or seq    # a size fixed in one input holds for the others
    hints = _cache_hints(model)
    # a sliding-window KV cache (GroupQueryAttention's sliding_window_cache) takes no padded prompt
    pad = not any(n.op_type == "GroupQueryAttention" and any(a.name == "sliding_window_cache" and a.i
                                                              for a in n.attribute) for n in model.graph.node)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not tt.HasField("elem_type"):
            raise InputError(f"graph input {inp.name!r} is not a tensor")
        shape = [_dim_value(d, batch, seq, past, hints, axis) for axis, d in enumerate(tt.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        name = inp.name.lower()
        if tt.elem_type == TensorProto.BOOL:
            value = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            if "mask" in name:
                value = np.ones(shape, dtype=dtype)
                if pad and value.ndim == 2 and shape[0] > 1 and shape[1] > 2:
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


def checked_array(arr: np.ndarray, inp: onnx.ValueInfoProto, where: str, fixed_from: int = 0) -> np.ndarray:
    """``arr`` as graph input ``inp`` takes it: numbers, of the declared rank and of the declared fixed sizes
    from axis ``fixed_from`` on (1 for samples stacked on axis 0), cast to the declared type. Otherwise a
    one-line ``InputError`` that starts with ``where`` (the file or option the array came from)."""
    name, tt = inp.name, inp.type.tensor_type
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where}: array {name!r} holds {arr.dtype} values, not numbers")
    if tt.HasField("shape"):
        dims = list(tt.shape.dim)
        declared = "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                                   for d in dims) + "]"
        if arr.ndim != len(dims):
            raise InputError(f"{where}: array {name!r} has {arr.ndim} axes {list(arr.shape)}; graph input "
                             f"{name!r} takes {len(dims)} ({declared})")
        for axis, d in enumerate(dims[fixed_from:], fixed_from):
            if d.HasField("dim_value") and d.dim_value != arr.shape[axis]:
                raise InputError(f"{where}: array {name!r} has {arr.shape[axis]} on axis {axis}; graph input "
                                 f"{name!r} is fixed at {d.dim_value} there ({declared})")
    return arr.astype(helper.tensor_dtype_to_np_dtype(tt.elem_type), copy=False)


def fixed_sizes(model: onnx.ModelProto) -> tuple[int | None, int | None]:
    """(batch, length) where some graph input fixes them: the first axis of an input, the second of a 2-D
    integer one (token ids, masks). Exports that fix one input (an attention mask of [2, 12]) and leave the
    others dynamic run only at those sizes. None where no input fixes a size, or inputs disagree."""
    inits = {i.name for i in model.graph.initializer}
    batches, seqs = set(), set()
    for inp in model.graph.input:
        tt = inp.type.tensor_type
        if inp.name in inits or "past" in inp.name.lower() or not tt.HasField("shape"):
            continue
        dims = list(tt.shape.dim)
        if len(dims) >= 2 and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            batches.add(dims[0].dim_value)
        integer = np.issubdtype(helper.tensor_dtype_to_np_dtype(tt.elem_type), np.integer)
        if len(dims) == 2 and integer and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
            seqs.add(dims[1].dim_value)
    return (batches.pop() if len(batches) == 1 else None), (seqs.pop() if len(seqs) == 1 else None)


def ort_reason(exc: Exception) -> str:
    """ONNX Runtime's error in one readable line: the failing node and the reason, without source paths."""
    msg = re.sub(r"\s+", " ", str(exc))
    m = re.search(r"while running (\w+) node\. Name:'([^']*)' Status Message: (.*)", msg)
    if m:
        reason = re.sub(r"^\S+:\d+ [^()]*\([^)]*\) ", "", m.group(3))
        msg = f"node {m.group(2)} ({m.group(1)}): {reason.strip()}"
    return msg.strip()[:300]


def session(model: onnx.ModelProto | bytes | str, optimize: bool = False, providers=None,
            external_dir: str | os.PathLike | None = None, overrides: dict | None = None):
    """An ORT CPU session with graph optimizations off (so ORT's fusions cannot hide a bug).

    ``external_dir``: the folder of the external data files that ``model`` (loaded without them) refers to.
    """
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False   # freed tensors go back to the heap (and to the system), not to an arena
    if external_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_dir))
    opts.add_session_config_entry("session.disable_prepacking", "1")    # no second copy of every weight
    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
              for name, arr in (overrides or {}).items()}
    for name, value in values.items():    # initializers replaced without copying the model
        opts.add_initializer(name, value)
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 4         # a failure is raised, and reported in one line, not logged
    if isinstance(model, onnx.ModelProto):
        model, arrays = _hand_over_weights(model, skip=set(overrides or ()))
        if arrays:     # ORT reads them in place: no serialized copy, no parsed copy
            opts.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a)
                                                          for a in arrays.values()])
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=providers or ["CPUExecutionProvider"])
        sess._onnxprune_keep = (arrays, values)      # the session borrows them
        return sess
    sess = ort.InferenceSession(model, opts, providers=providers or ["CPUExecutionProvider"])
    sess._onnxprune_keep = values
    return sess


def _hand_over_weights(model: onnx.ModelProto, skip: set = frozenset()
                       ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Split the large in-memory initializers off ``model`` (but those in ``skip``): (the rest,
    {name: array})."""
    big = [i for i in model.graph.initializer if len(i.raw_data) >= STAND_IN_BYTES and i.name not in skip
           and i.data_type not in PACKED_TYPES]
    if not big:
        return model, {}
    from .io import copy_without_initializers
    rest = copy_without_initializers(model)
    g, src = rest.graph, model.graph
    g.node.extend(src.node)
    names = {i.name for i in big}
    g.initializer.extend(i for i in src.initializer if i.name not in names)
    for i in big:      # declared as external: the session gets the values from add_external_initializers
        t = g.initializer.add(name=i.name, data_type=i.data_type, dims=i.dims,
                              data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", "onnxprune-in-memory"), ("offset", "0"), ("length", str(len(i.raw_data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return rest, {i.name: np.frombuffer(i.raw_data, dtype=helper.tensor_dtype_to_np_dtype(i.data_type))
                  .reshape(tuple(i.dims)) for i in big}     # one copy of the bytes, not two


STAND_IN_BYTES = 1 << 20
# two values a byte (int4 data of QDQ models): their raw bytes are not one array element each
PACKED_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} | (
    {onnx.TensorProto.FLOAT4E2M1} if hasattr(onnx.TensorProto, "FLOAT4E2M1") else set())


class Shapes(dict):
    """Tensor name -> the shape seen in the probe run. ``static`` holds, per tensor, the sizes that onnx's
    shape inference finds fixed from the declared input shapes (None where they follow the inputs)."""

    static: dict = {}

    def is_static(self, name: str, axis: int) -> bool:
        dims = self.static.get(name)
        return bool(dims) and axis < len(dims) and dims[axis] is not None and dims[axis] == self[name][axis]


def _light_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of ``model`` for probing, without its large weights.

    Shapes do not depend on weight values, so every floating-point initializer of 1 MiB or more is replaced
    by an ``Expand`` of one small value to its shape: the probe then neither copies nor reads the weights
    (a model above 2 GB is probed in the memory of its activations), and ONNX Runtime frees each stand-in
    after its last use. Integer tensors (shapes, indices) stay real. Returns the copy and the stand-ins.
    """
    from .io import copy_without_initializers, large_weights
    probe = copy_without_initializers(model, value_info=False)
    g, src = probe.graph, model.graph
    stand_ins, nodes = large_weights(model, STAND_IN_BYTES), []
    for init in src.initializer:
        if init.name in stand_ins:
            value = helper.make_tensor(f"{init.name}__value", init.data_type, [], [0.02])
            shape = helper.make_tensor(f"{init.name}__shape", onnx.TensorProto.INT64, [len(init.dims)], list(init.dims))
            g.initializer.extend([value, shape])
            nodes.append(helper.make_node("Expand", [value.name, shape.name], [init.name],
                                          name=f"{init.name}__stand_in"))
        else:
            g.initializer.append(init)
    g.node.extend(nodes)
    g.node.extend(src.node)
    return probe, stand_ins


def probe(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
          external_dir: str | os.PathLike | None = None, wanted: set[str] | None = None):
    """Shape of every tensor in the main graph from one run, and the values of the small integer ones.

    Returns ``(shapes, values)``: ``shapes`` covers initializers too; ``values`` holds the integer tensors
    of at most 64 elements (shape vectors and the like), which the shape tracer reads. ``wanted``: only these
    tensors (ONNX Runtime keeps every requested one alive to the end of the run: at a long length, asking
    for all of them takes much memory).
    """
    given = feeds is not None
    feeds = feeds if given else synth_inputs(model)
    probe, stand_ins = _light_copy(model)
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
