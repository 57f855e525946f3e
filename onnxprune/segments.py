"""Run a model piece by piece, so that a model larger than the memory can still be run, and proved.

Its nodes are cut, in graph order, into segments of at most ``budget`` bytes of weights each; each segment runs as
a model of its own (optimizations off, as every proof runs) on the values that the graph inputs and the earlier
segments made, and only the values that a later segment or a graph output reads are kept. The peak is one
segment's weights (with ONNX Runtime's fp32 copies of fp16 ones) and the activations, whatever the model's size;
the outputs are those of a whole run, since every node runs the same kernel on the same inputs.

(Issue 26 asked for a proof block by block, each attention block's subgraph run alone on captured or synthetic
inputs; running every segment in turn proves the whole model in the same memory, the untouched parts included,
with the inputs the whole proof uses.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .model.dtypes import HALF_TYPES, PACKED_TYPES
from .progress import Progress
from .runtime import session

SEGMENT_BYTES = 256 << 20     # the weights one segment holds at most, by default


def tensor_bytes(t: onnx.TensorProto) -> int:
    """The bytes of an initializer, in memory or in an external file, its data left unread."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    if uses_external_data(t):
        return int(ExternalDataInfo(t).length or 0)
    if t.raw_data:
        return len(t.raw_data)
    if t.data_type in PACKED_TYPES:
        return -(-int(np.prod(t.dims)) // 2)
    return int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor name ``node`` reads: its inputs and what its subgraphs (If, Loop, Scan) read from outside."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                  list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [i for n in g.node for i in _reads(n) if i not in inner]
    return names


def segments(model: onnx.ModelProto, budget: int = SEGMENT_BYTES) -> list[list[int]]:
    """The node indices of ``model`` in segments of at most ``budget`` bytes of initializers (a node whose own
    weights pass it is a segment alone), in graph order."""
    sizes = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    out, cur, held, seen = [], [], 0, set()
    for k, node in enumerate(model.graph.node):
        new = {i for i in _reads(node) if i in sizes and i not in seen}
        extra = sum(sizes[i] for i in new)
        if cur and held + extra > budget:
            out.append(cur)
            cur, held = [], 0
            seen = set()
            new = {i for i in _reads(node) if i in sizes}
            extra = sum(sizes[i] for i in new)
        cur.append(k)
        held += extra
        seen |= new
    if cur:
        out.append(cur)
    return out


HALF_COPIES = 3       # ONNX Runtime's CPU provider runs an fp16 weight as itself and an fp32 copy (2 + 4 bytes of 2)


def budget_for(model: onnx.ModelProto, mode: str = "auto", share: float = 0.6) -> int | None:
    """The weight bytes per segment to run ``model`` in, or None to run it whole: ``"segments"`` always,
    ``"whole"`` never, ``"auto"`` where a whole run would take more than ``share`` of the memory available now (its
    weights; three times for fp16, which ONNX Runtime copies to fp32). A segment holds at most ``SEGMENT_BYTES``
    (256 MiB) of weights, and a tenth of what is available."""
    import psutil
    available = psutil.virtual_memory().available
    budget = max(1 << 20, min(SEGMENT_BYTES, available // 10))
    if mode == "segments":
        return budget
    if mode == "whole":
        return None
    need = sum(tensor_bytes(t) for t in model.graph.initializer) * (HALF_COPIES if has_half(model) else 1)
    return budget if need > share * available else None


def run_segmented(model: onnx.ModelProto, feeds: dict, external_dir=None, overrides: dict | None = None,
                  budget: int = SEGMENT_BYTES, progress: bool = False, outputs: list | None = None,
                  optimize: bool = False) -> dict[str, np.ndarray]:
    """The graph outputs of ``model`` on ``feeds`` (or the tensors named in ``outputs``), run segment by segment
    (``segments``). ``external_dir``, ``overrides`` and ``optimize`` as for ``runtime.session``."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    parts = segments(model, budget)
    last: dict[str, int] = {}           # value name -> the last segment that reads it
    for s, part in enumerate(parts):
        for k in part:
            for name in _reads(g.node[k]):
                last[name] = s
    wanted = list(outputs) if outputs is not None else [o.name for o in g.output]
    for name in wanted:
        last[name] = len(parts)
    values = dict(feeds)
    with Progress(len(parts), "running the model in segments", unit="segments",
                  min_total=1 if progress else 10 ** 9) as bar:
        for s, part in enumerate(parts):
            nodes = [g.node[k] for k in part]
            made = {o for n in nodes for o in n.output if o}
            reads = list(dict.fromkeys(i for n in nodes for i in _reads(n)))
            inputs = [i for i in reads if i not in made and i not in inits]
            outputs = [o for o in dict.fromkeys(o for n in nodes for o in n.output if o) if last.get(o, -1) > s]
            if not outputs:
                bar.update()
                continue
            sub = helper.make_graph(
                nodes, f"segment{s}",
                [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), None)
                 for i in inputs],
                [onnx.ValueInfoProto(name=o) for o in outputs],
                [inits[i] for i in reads if i in inits and i not in made])
            part_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
            part_model.functions.extend(model.functions)
            mine = {k: v for k, v in (overrides or {}).items() if k in reads}
            sess = session(part_model, optimize=optimize, external_dir=external_dir, overrides=mine)
            got = sess.run(outputs, {i: values[i] for i in inputs})
            del sess, part_model, sub
            values.update(zip(outputs, got))
            for name in [n for n in values if last.get(n, -1) <= s and n not in wanted]:
                del values[name]
            bar.update()
    return {name: values[name] for name in wanted}


def has_half(model: onnx.ModelProto) -> bool:
    return any(t.data_type in HALF_TYPES for t in model.graph.initializer)
