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


def reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor name ``node`` reads: its inputs and what its subgraphs (If, Loop, Scan) read from outside."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                  list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [i for n in g.node for i in reads(n) if i not in inner]
    return names


def segments(model: onnx.ModelProto, budget: int = SEGMENT_BYTES) -> list[list[int]]:
    """The node indices of ``model`` in segments of at most ``budget`` bytes of initializers (a node whose own
    weights pass it is a segment alone), in graph order."""
    sizes = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    out, cur, held, seen = [], [], 0, set()
    for k, node in enumerate(model.graph.node):
        new = {i for i in reads(node) if i in sizes and i not in seen}
        extra = sum(sizes[i] for i in new)
        if cur and held + extra > budget:
            out.append(cur)
            cur, held = [], 0
            seen = set()
            new = {i for i in reads(node) if i in sizes}
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


class Segmented:
    """``model`` cut into segments (``segments``), to be run one segment at a time over any number of states (a
    dict of values per batch: the graph inputs, then what the earlier segments made). Each segment's session is
    made once for every state that passes it, so a calibration over many batches reads each weight once per
    pass, not once per batch. ``wanted``: the values kept to the end (default: the graph outputs); any other value
    is dropped from a state once no later segment reads it."""

    def __init__(self, model: onnx.ModelProto, external_dir=None, budget: int = SEGMENT_BYTES,
                 wanted: list | None = None, optimize: bool = False, overrides: dict | None = None,
                 providers=None):
        self.model, self.external_dir, self.optimize, self.providers = model, external_dir, optimize, providers
        self.overrides = overrides or {}
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.parts = segments(model, budget)
        self.last: dict[str, int] = {}           # value name -> the last segment that reads it
        self.reads: list[list[str]] = []
        self.made: list[set] = []
        for s, part in enumerate(self.parts):
            nodes = [g.node[k] for k in part]
            self.reads.append(list(dict.fromkeys(i for n in nodes for i in reads(n))))
            self.made.append({o for n in nodes for o in n.output if o})
            for name in self.reads[-1]:
                self.last[name] = s
        self.wanted = list(wanted) if wanted is not None else [o.name for o in g.output]
        for name in self.wanted:
            self.last[name] = len(self.parts)
        self._open: tuple[int, object] | None = None

    def inputs(self, s: int) -> list[str]:
        """The values segment ``s`` takes: graph inputs and what earlier segments made (not its weights)."""
        return [i for i in self.reads[s] if i not in self.made[s] and i not in self.inits]

    def outputs(self, s: int) -> list[str]:
        g = self.model.graph
        made = dict.fromkeys(o for k in self.parts[s] for o in g.node[k].output if o)
        return [o for o in made if self.last.get(o, -1) > s]

    def _session(self, s: int, like: dict):
        if self._open is not None and self._open[0] == s:
            return self._open[1]
        self._open = None           # the last segment's session goes before the next one is made
        part = submodel(self.model, self.parts[s], like, self.outputs(s), self.inits)
        mine = {k: v for k, v in self.overrides.items() if k in self.reads[s]}
        sess = session(part, optimize=self.optimize, providers=self.providers, external_dir=self.external_dir,
                       overrides=mine)
        self._open = (s, sess)
        return sess

    def advance(self, s: int, states: list[dict], extra: dict | None = None) -> None:
        """Run segment ``s`` on every state, in place: its outputs added, what no later segment reads (and is not
        wanted) dropped. ``extra``: values for graph inputs that every state shares (fed weights)."""
        outputs = self.outputs(s)
        extra = extra or {}
        if outputs:
            names = self.inputs(s)
            pick = lambda st, i: extra[i] if i in extra else st[i]      # noqa: E731
            sess = self._session(s, {i: pick(states[0], i) for i in names}) if states else None
            for st in states:
                st.update(zip(outputs, sess.run(outputs, {i: pick(st, i) for i in names})))
        for st in states:
            for name in [n for n in st if self.last.get(n, -1) <= s and n not in self.wanted]:
                del st[name]

    def close(self) -> None:
        self._open = None

    def run(self, states: list[dict], extra: dict | None = None, progress: bool = False) -> list[dict]:
        """Every segment in turn over ``states`` (consumed); the wanted values of each."""
        with Progress(len(self.parts), "running the model in segments", unit="segments",
                      min_total=1 if progress else 10 ** 9) as bar:
            for s in range(len(self.parts)):
                self.advance(s, states, extra)
                bar.update()
        self.close()
        return [{name: st[name] for name in self.wanted} for st in states]


def submodel(model: onnx.ModelProto, nodes: list[int], like: dict, outputs: list[str],
             inits: dict | None = None) -> onnx.ModelProto:
    """The model of ``model``'s nodes ``nodes`` (indices, in graph order) alone: what they read and no node of them
    makes is a graph input, typed like its value in ``like`` (``value_info_like``), or an initializer (``inits``:
    the model's, by name); ``outputs`` are its outputs."""
    g = model.graph
    inits = inits if inits is not None else {t.name: t for t in g.initializer}
    made = {o for k in nodes for o in g.node[k].output if o}
    used = list(dict.fromkeys(i for k in nodes for i in reads(g.node[k]) if i not in made))
    sub = helper.make_graph([g.node[k] for k in nodes], "part",
                            [value_info_like(i, like[i]) for i in used if i not in inits],
                            [onnx.ValueInfoProto(name=o) for o in outputs], [inits[i] for i in used if i in inits])
    part = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    part.functions.extend(model.functions)
    return part


def value_info_like(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    """A segment's input like ``value``: its type and rank, its sizes left open (the batches that pass one session
    may differ in length), but a shape vector's length (a 1-D integer value: ``Resize`` checks its ``sizes``
    against the rank at load)."""
    value = np.asarray(value)
    dims = list(value.shape) if value.ndim == 1 and value.dtype.kind in "iu" else [None] * value.ndim
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), dims)


def run_segmented(model: onnx.ModelProto, feeds: dict, external_dir=None, overrides: dict | None = None,
                  budget: int = SEGMENT_BYTES, progress: bool = False, outputs: list | None = None,
                  optimize: bool = False, providers=None) -> dict[str, np.ndarray]:
    """The graph outputs of ``model`` on ``feeds`` (or the tensors named in ``outputs``), run segment by segment
    (``Segmented``). ``external_dir``, ``overrides``, ``optimize`` and ``providers`` as for ``runtime.session``."""
    runner = Segmented(model, external_dir, budget, outputs, optimize, overrides, providers)
    return runner.run([dict(feeds)], progress=progress)[0]


def has_half(model: onnx.ModelProto) -> bool:
    return any(t.data_type in HALF_TYPES for t in model.graph.initializer)
