"""The proof block by block (``--proof blocks``): each attention block alone, and the rest compared byte for byte.

A pruned model differs from its masked original only inside its attention blocks. So each block is cut out of both
models: from its outputs (the output projection's, its bias added, and the KV cache it hands on) back to its
*frontier*, the first tensors outside the block whose values come through a weight (a 2-D float initializer): the
hidden state its projections read, a rotary table's rows, a decoder's encoder states. What needs no weight (masks,
positions, shapes) comes along and is computed from the graph inputs. Both cuts get the same random values at the
frontier, of the shapes and types that a weightless probe run gives at the proof's inputs, and the same graph inputs
(a KV cache narrowed to the kept heads for the pruned one); their outputs must agree as the whole proof's do. Every
node outside the blocks must then be the original's, byte for byte, and so must the initializers they read: small
ones whole, large ones by type, shape, length and 16 samples of 4 KiB of their data (reading both files whole is
what this proof saves). A node that the rewrite added must lie inside a block's cut.

Each block's cut holds that block's weights only, the attention's sixth of an LLM's, so the proof reads about a
sixth of the model where running both models whole, or in segments, reads it twice. It is a weaker statement than
a run of the whole model: each block is shown equal on one random input, not the model on real ones; ``auto`` takes
it only where the whole model would not fit in memory. Where a block cannot be cut out alike from both models (a
cut inside the heads narrows a frontier tensor; a quantized model's reference is its float view; a node outside
the blocks differs), ``prove`` raises ``Unavailable``, and the caller proves in segments (``segments.py``).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .block import AttentionBlock
from .model.dtypes import FLOAT_TYPES
from .model.proto import consumers
from .probe import probe
from .progress import Progress
from .runtime import ort_reason, session
from .segments import reads, submodel

SAMPLES, SAMPLE_BYTES = 16, 4096     # a large initializer outside the blocks: 16 samples of 4 KiB compared
WHOLE_BYTES = 1 << 20                # initializers below this are compared whole


class Unavailable(Exception):
    """This model, or this plan, cannot be proved block by block; the message says why."""


def inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    """{tensor: element type} from onnx's shape inference on the model's skeleton (its weights unread); empty where
    inference fails."""
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        return {}
    return {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}


def weighty(model: onnx.ModelProto, types: dict | None = None) -> set[str]:
    """Every float tensor whose value comes through a weight (a float initializer of two or more axes). An integer
    tensor never does here: a shape vector taken from such a tensor depends on its shape only. A tensor whose type
    onnx cannot infer (``types``: ``inferred_types``) counts as float."""
    g = model.graph
    types = inferred_types(model) if types is None else types
    out = {t.name for t in g.initializer if t.data_type in FLOAT_TYPES and len(t.dims) >= 2}
    for node in g.node:
        if any(i in out for i in reads(node)):
            out.update(o for o in node.output if o and types.get(o, onnx.TensorProto.FLOAT) in FLOAT_TYPES)
    return out


def block_outputs(model: onnx.ModelProto, block: AttentionBlock) -> list[str]:
    """What ``block`` hands on: its output projection's output (its bias added) and the KV cache it writes."""
    g = model.graph
    nodes = set(block.nodes)
    readers = [n for n in g.node if n.name in nodes and block.o_proj.weight in n.input]
    if len(readers) != 1:
        raise Unavailable(f"block {block.index}: its output projection is not one node of the block")
    out = readers[0].output[0]
    after = consumers(model).get(out, [])
    if len(after) == 1 and after[0].op_type == "Add" and block.o_proj.bias in after[0].input:
        out = after[0].output[0]
    outputs = {o.name for o in g.output}
    return [out] + [t.name for t in block.tensors if t.io and t.name in outputs]


def cut_out(model: onnx.ModelProto, names: set, outputs: list[str], heavy: set, stop: set | None = None
            ) -> tuple[list[int], list[str]]:
    """The node indices (in graph order) that compute ``outputs`` and the frontier they start from: walking up, a
    node named in ``names`` (the block's) is taken, as is any node whose output needs no weight (not in ``heavy``);
    any other tensor is frontier. ``stop``: tensors that are frontier wherever they are met (the original's, for
    the pruned model's walk)."""
    g = model.graph
    made = {o: k for k, n in enumerate(g.node) for o in n.output if o}
    taken, frontier, todo, seen = set(), [], list(outputs), set()
    while todo:
        t = todo.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t not in made:          # a graph input or an initializer
            continue
        k = made[t]
        if (stop is not None and t in stop) or (g.node[k].name not in names and t in heavy):
            frontier.append(t)
            continue
        if k not in taken:
            taken.add(k)
            todo.extend(reads(g.node[k]))
    return sorted(taken), frontier


def _graph(model: onnx.ModelProto, nodes: list[int], values: dict, outputs: list[str]):
    """The model of ``nodes`` alone (``segments.submodel``), its inputs typed like ``values``, and their values."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    made = {o for k in nodes for o in g.node[k].output}
    inputs = list(dict.fromkeys(i for k in nodes for i in reads(g.node[k]) if i not in made and i not in inits))
    missing = [i for i in inputs if i not in values]
    if missing:
        raise Unavailable(f"no value for {missing[0]!r}")
    return submodel(model, nodes, values, outputs), {i: values[i] for i in inputs}


def _run(part, values, outs, block, folder, overrides, providers) -> list:
    """One block's cut run; where onnxruntime will not take it (a frontier tensor whose type onnx could not infer
    after a contrib op, say), ``Unavailable``: the segments then run the models as they are."""
    try:
        return session(part, external_dir=folder, overrides=overrides, providers=providers).run(outs, values)
    except Exception as exc:
        raise Unavailable(f"block {block.index}'s cut does not run alone: {ort_reason(exc)[:160]}") from None


def _types(model: onnx.ModelProto, names: set, types: dict) -> dict:
    """The numpy types of ``names`` from ``types`` (``inferred_types``); where inference found none (after a
    contrib op), the model's float type: that of most of its float initializers."""
    floats = [t.data_type for t in model.graph.initializer if t.data_type in FLOAT_TYPES]
    default = max(set(floats), key=floats.count) if floats else onnx.TensorProto.FLOAT
    return {n: helper.tensor_dtype_to_np_dtype(types.get(n) or default) for n in names}


def same_node(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    """The same node: op, inputs, outputs, and attributes (a tensor attribute by its type, shape and values: the
    graph library writes an empty name into it)."""
    if (a.op_type, a.domain, list(a.input), list(a.output)) != (b.op_type, b.domain, list(b.input), list(b.output)):
        return False
    if sorted(x.name for x in a.attribute) != sorted(x.name for x in b.attribute):
        return False
    other = {x.name: x for x in b.attribute}
    for x in a.attribute:
        y = other[x.name]
        if x.type == onnx.AttributeProto.TENSOR and y.type == x.type:
            u, v = numpy_helper.to_array(x.t), numpy_helper.to_array(y.t)
            if u.dtype != v.dtype or u.shape != v.shape or u.tobytes() != v.tobytes():
                return False
        elif x.SerializeToString() != y.SerializeToString():
            return False
    return True


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto, dir_a, dir_b) -> bool:
    if (a.data_type, list(a.dims)) != (b.data_type, list(b.dims)):
        return False
    if not uses_external_data(a) and not uses_external_data(b):
        return a.SerializeToString() == b.SerializeToString() if a.ByteSize() < WHOLE_BYTES else \
            _sampled(_bytes(a), _bytes(b))
    return _sampled(_bytes(a, dir_a), _bytes(b, dir_b))


def _bytes(t: onnx.TensorProto, folder=None):
    """A reader of ``t``'s data: (length, read(offset, n))."""
    if not uses_external_data(t):
        raw = t.raw_data or numpy_helper.to_array(t).tobytes()
        return len(raw), lambda at, n: raw[at:at + n]
    info = ExternalDataInfo(t)
    path = os.path.join(str(folder or ""), info.location)
    length = int(info.length or (os.path.getsize(path) - int(info.offset or 0)))

    def read(at, n):
        with open(path, "rb") as f:
            f.seek(int(info.offset or 0) + at)
            return f.read(n)
    return length, read


def _sampled(a, b) -> bool:
    (na, ra), (nb, rb) = a, b
    if na != nb:
        return False
    if na <= SAMPLES * SAMPLE_BYTES:
        return ra(0, na) == rb(0, nb)
    for at in np.linspace(0, na - SAMPLE_BYTES, SAMPLES).astype(np.int64):
        if ra(int(at), SAMPLE_BYTES) != rb(int(at), SAMPLE_BYTES):
            return False
    return True


def untouched(masked: onnx.ModelProto, pruned: onnx.ModelProto, blocks, cut_masked: set, cut_pruned: set, masked_dir,
              pruned_dir) -> None:
    """Every node outside the blocks is the original's, with the initializers it reads; every node the rewrite
    added lies in a block's cut (``cut_pruned``: the pruned model's nodes cut out, ``cut_masked`` the original's). A
    node that the cuts take and only they read (a shape vector's Concat, a Constant) may differ: it is run, and so
    proved, with its block."""
    inside = {name for b in blocks for name in b.nodes}
    readers: dict[str, set] = {}
    for n in masked.graph.node:
        for i in reads(n):
            readers.setdefault(i, set()).add(n.name)
    outputs = {o.name for o in masked.graph.output}
    for n in masked.graph.node:
        if n.name in cut_masked and all(o not in outputs and readers.get(o, set()) <= cut_masked for o in n.output):
            inside.add(n.name)
    before = {n.name: n for n in masked.graph.node}
    after = {n.name: n for n in pruned.graph.node}
    if len(before) != len(masked.graph.node) or len(after) != len(pruned.graph.node):
        raise Unavailable("the nodes are not named one by one")
    for name, node in after.items():
        if name not in before and name not in cut_pruned:
            raise Unavailable(f"node {name!r} was added outside every block")
    read = set()
    ia, ib = {t.name: t for t in masked.graph.initializer}, {t.name: t for t in pruned.graph.initializer}
    for name, node in before.items():
        if name in inside:
            continue
        if name not in after and node.op_type == "Constant" and node.output[0] in ib:
            # onnx-graphsurgeon writes a Constant node as the initializer of its output
            if not np.array_equal(numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value"
                                  else None, numpy_helper.to_array(ib[node.output[0]])):
                raise Unavailable(f"constant {node.output[0]!r}, outside the blocks, differs")
            continue
        if name not in after or not same_node(node, after[name]):
            raise Unavailable(f"node {name!r}, outside the blocks, differs")
        read.update(reads(node))
    for name in sorted(read & set(ia)):
        if name not in ib or not _same_tensor(ia[name], ib[name], masked_dir, pruned_dir):
            raise Unavailable(f"initializer {name!r}, read outside the blocks, differs")
    if [o.name for o in masked.graph.output] != [o.name for o in pruned.graph.output]:
        raise Unavailable("the graph outputs differ")


def prove(masked: onnx.ModelProto, pruned: onnx.ModelProto, blocks, runs: list[tuple[dict, dict]], compare,
          masked_dir=None, pruned_dir=None, overrides: dict | None = None, providers=None, progress: bool = False,
          seed: int = 0) -> float:
    """The largest difference between the blocks of ``masked`` and ``pruned``, each cut out alone (see the module
    docstring), on every (feeds, the pruned model's feeds: a KV cache narrowed) of ``runs``;
    ``compare(reference outputs, pruned outputs, feeds)`` gives one difference (the caller's, with its cache
    handling and scale). Raises ``Unavailable`` where this proof cannot be made (checked before any block is run,
    but for a cut that onnxruntime will not run alone)."""
    blocks = list(blocks)
    types_m = inferred_types(masked)
    heavy_m, heavy_p = weighty(masked, types_m), weighty(pruned)
    known = {n.name for n in masked.graph.node}
    added = {n.name for n in pruned.graph.node if n.name not in known}
    cuts = []
    for b in blocks:
        outs = block_outputs(masked, b)
        names = set(b.nodes) | {n.name for n in masked.graph.node if set(n.output) & set(outs)}
        nodes_m, frontier = cut_out(masked, names, outs, heavy_m)
        nodes_p, frontier_p = cut_out(pruned, names | added, outs, heavy_p, stop=set(frontier))
        if not set(frontier_p) <= set(frontier):
            first = sorted(set(frontier_p) - set(frontier))[0]
            raise Unavailable(f"block {b.index}: the pruned model's cut starts at {first!r}")
        missing = [o for o in outs if o not in {x for n in pruned.graph.node for x in n.output}]
        if missing:
            raise Unavailable(f"block {b.index}: the pruned model has no {missing[0]!r}")
        cuts.append((b, outs, nodes_m, nodes_p, frontier))
    untouched(masked, pruned, blocks, {masked.graph.node[k].name for c in cuts for k in c[2]},
              {pruned.graph.node[k].name for c in cuts for k in c[3]}, masked_dir, pruned_dir)
    wanted = {t for c in cuts for t in c[4]}
    types = _types(masked, wanted, types_m)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for feeds, narrowed in runs:
        shapes, _ = probe(masked, feeds, masked_dir, wanted=wanted)
        with Progress(len(cuts), "proving block by block", unit="blocks",
                      min_total=1 if progress else 10 ** 9) as bar:
            for b, outs, nodes_m, nodes_p, frontier in cuts:
                start = {t: rng.standard_normal(shapes[t]).astype(types[t]) for t in frontier}
                part, values = _graph(masked, nodes_m, {**feeds, **start}, outs)
                mine = {k: v for k, v in (overrides or {}).items() if k in {t.name for t in part.graph.initializer}}
                ref = dict(zip(outs, _run(part, values, outs, b, masked_dir, mine, providers)))
                part, values = _graph(pruned, nodes_p, {**narrowed, **start}, outs)
                got = dict(zip(outs, _run(part, values, outs, b, pruned_dir, None, providers)))
                worst = max(worst, compare(ref, got, feeds), key=lambda e: (np.isnan(e), e))
                if np.isnan(worst):
                    return worst
                bar.update()
    return worst
