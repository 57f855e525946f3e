"""A model's inputs: synthetic ones that exercise it (token ids, masks with padding, positions, a KV cache
of the right head size), arrays checked against the declared inputs, and the sizes an export fixes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError
from .model.proto import consumers


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
                    # per input too: a cut with a rank per layer leaves one symbolic size with several values
                    hints[_INPUT + name] = width // heads
    return hints


_INPUT = "input:"       # a hint for one graph input's last axis, before the hint of its symbolic name


def _sized(name: str, dims, shape: list[int], hints: dict) -> list[int]:
    """``shape`` with the last axis of input ``name`` as its own hint says, where that axis is symbolic."""
    if dims and dims[-1].dim_param and _INPUT + name in hints:
        shape[-1] = hints[_INPUT + name]
    return shape


_VALUE_KEEPERS = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Slice", "Transpose"}


def _constant_dims(name: str, inits: dict, producers: dict) -> list[int] | None:
    """The shape of a constant (an initializer or a Constant node's value), its data left unread."""
    if name in inits:
        return list(inits[name].dims)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return list(node.attribute[0].t.dims)
    return None


def table_rows(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer graph input that indexes a constant table (a ``Gather`` of an initializer, through ops that
    keep its values: casts and reshapes), the fewest rows of the tables it indexes: the ids it may hold. A token
    type or language table of 4 rows takes no id of 15."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = consumers(model)
    rows = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        todo, seen = [inp.name], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for n in readers.get(name, ()):
                if n.op_type in _VALUE_KEEPERS and n.input[0] == name:
                    todo.extend(n.output)
                elif n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == name:
                    dims = _constant_dims(n.input[0], inits, producers)
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    if dims:
                        rows[inp.name] = min(rows.get(inp.name, dims[axis]), dims[axis])
    return rows


def input_shapes(model: onnx.ModelProto, batch: int, seq: int, past: int = 0) -> dict[str, list[int]]:
    """The shape of every graph input at ``batch`` x ``seq`` with a past of ``past`` tokens, symbolic
    dimensions sized as ``synth_inputs`` sizes them (a KV cache's head size read from the graph)."""
    inits = {i.name for i in model.graph.initializer}
    hints = _cache_hints(model)
    return {inp.name: _sized(inp.name, inp.type.tensor_type.shape.dim,
                             [_dim_value(d, batch, seq, past, hints, axis) for axis, d in
                              enumerate(inp.type.tensor_type.shape.dim)], hints)
            for inp in model.graph.input if inp.name not in inits}


def plain_input(name: str, dtype, shape: list[int]) -> np.ndarray | None:
    """What an input is whatever the data: a mask all ones, position ids ``0 .. n-1`` along the last axis and
    token types zero (integer ones); None for any other input (token ids, features: the data's)."""
    name = name.lower()
    if "mask" in name:
        return np.ones(shape, dtype=dtype)
    if not np.issubdtype(dtype, np.integer):
        return None
    if "position" in name:
        return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy() if shape else np.zeros(shape, dtype)
    if "type" in name:
        return np.zeros(shape, dtype=dtype)
    return None


def takes_past(model: onnx.ModelProto) -> bool:
    """Whether ``model`` takes a KV cache: a graph input (not an initializer) named like a past."""
    inits = {t.name for t in model.graph.initializer}
    return any("past" in i.name.lower() for i in model.graph.input if i.name not in inits)


def synth_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = BATCH, seq: int = SEQ,
                 past: int = PAST) -> dict[str, np.ndarray]:
    """Plausible inputs for every graph input: token ids (below 16, and within the table they index:
    ``table_rows``), all-ones masks, positions, random floats.

    Symbolic dimensions get ``batch`` when named like a batch, ``past`` (a KV cache's past length) when
    named like a past length, ``past + seq`` when named like a total length, ``seq`` when named like a
    length; an unnamed one (dynamo's ``s0``) gets ``batch`` on the first axis and ``seq`` elsewhere. A KV
    cache's symbolic head size is read from the graph.
    """
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    past = past if takes_past(model) else 0
    fixed_batch, fixed_seq = fixed_sizes(model)
    batch, seq = fixed_batch or batch, fixed_seq or seq    # a size fixed in one input holds for the others
    hints = _cache_hints(model)
    rows = table_rows(model)
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
        shape = _sized(inp.name, tt.shape.dim,
                       [_dim_value(d, batch, seq, past, hints, axis) for axis, d in enumerate(tt.shape.dim)], hints)
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        name = inp.name.lower()
        if tt.elem_type == TensorProto.BOOL:
            value = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            value = plain_input(name, dtype, shape)
            table = rows.get(inp.name, 16)        # ids within the table the input indexes
            if value is None:
                value = (rng.integers(1, min(16, table), size=shape) if table > 1 else np.zeros(shape)).astype(dtype)
            elif "mask" in name and pad and value.ndim == 2 and shape[0] > 1 and shape[1] > 2:
                value[-1, -2:] = 0        # one padded row: masks are really exercised
            elif value.size and value.max() >= table:      # positions past a small table
                value = value % max(table, 1)
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


def first_samples(model: onnx.ModelProto, calib: dict) -> dict:
    """The first samples of calibration data, for a probe that synthetic inputs cannot drive: two, or the
    model's fixed batch. (Few, since the probe keeps every intermediate tensor of its run.)"""
    size = fixed_sizes(model)[0] or min(2, len(next(iter(calib.values()))))
    return {k: v[:size] for k, v in calib.items()}
