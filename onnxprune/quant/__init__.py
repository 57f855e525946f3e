"""Quantized models: pruned in their quantized form, never re-quantized.

A quantized model is matched, scored and planned on its *float view*: the same graph with each quantized
weight replaced by the float weight that it dequantizes to, so that every matcher, importance method and
the rewriter work on it as on any float model. The forms, as onnxruntime's quantizers write them, one module
each in ``quant/forms/`` (``quant/form.py`` says what a form offers):

* ``dq``: a ``DequantizeLinear`` of an initializer (QDQ models, per-tensor, per-axis or blockwise);
* ``integer``: ``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> ``Cast`` -> ``Mul`` by the two scales
  (``quantize_dynamic``), seen as one ``MatMul`` of the float input;
* ``nbits``: ``MatMulNBits`` (int4/int8 blocks along K, a scale and a zero point per block and column: ORT
  GenAI's ``-p int4`` and ``MatMulNBitsQuantizer``), seen as one ``MatMul`` (and the ``Add`` of its bias);
* ``dqmatmul``, ``inttofloat``: what ONNX Runtime's CPU optimizer makes of ``integer`` in a model saved after it,
  ``DynamicQuantizeMatMul`` and ``MatMulIntegerToFloat`` (with the bias folded in), each seen as one ``MatMul``;
* ``cast``: int8 data -> ``Cast`` -> ``Mul`` by a scale per row, column or tensor (weight-only int8 written by
  hand, as some exporters do), seen as the float weight that the ``Mul`` makes.

After the rewrite, ``refold`` puts the quantized nodes back, each with its quantized data, scales and
zero points cut to the positions that the float weight kept: columns with their scales, rows in whole
quantization blocks. Kept rows that do not fill whole blocks (``MatMulNBits``, blockwise
``DequantizeLinear``) are re-packed exactly into smaller blocks (each new block holds rows of one old block
and takes its scale and zero point). The dequantized values of what is kept are the same bits as before.

Large float weights of the view stay placeholders (shape only) until read: matching needs shapes, scores
and slices need the blocks' weights, and only calibration needs them all (``QuantView.materialize``).

The masked reference for verification (``masked``) is the quantized model with the dropped heads' part of
each output projection's input set to zero, where the projection reads it: a zero dequantizes to zero and
does not widen a dynamic quantization range, so pruned and masked models compute the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..cut import runs, zero_dropped
from ..errors import MatchError, PlanError
from ..model.proto import consumers
from .form import FoldContext, Folded
from .forms import FORMS

OPERATOR_FORM = {"QLinearMatMul", "QAttention", "QLinearConv", "QGemm", "QOrderedAttention", "QOrderedMatMul",
                 "QLinearSoftmax"}


@dataclass
class QuantView:
    real: onnx.ModelProto
    folded: dict           # view weight name -> Folded (of its first reader)
    external_dir: object = None
    lazy: set = field(default_factory=set)     # float weights of the view not dequantized yet (placeholders)
    # view weight name -> the Folded of its other readers: one quantized weight read by several nodes (ALBERT's
    # shared layer) is one float weight of the view, read by all of them, and cut once for all
    more: dict = field(default_factory=dict)

    def every(self):
        """Each reader's Folded: the first of each weight, then the others."""
        yield from self.folded.values()
        for others in self.more.values():
            yield from others

    def materialize(self, view: onnx.ModelProto, names=None) -> dict[str, np.ndarray]:
        """Dequantize the placeholders ``names`` (all when None) into ``view``; returns them by name."""
        names = set(self.lazy) if names is None else set(names) & self.lazy
        if not names:
            return {}
        arrays = _reader(self.real, self.external_dir)
        out = {}
        for proto in view.graph.initializer:
            if proto.name in names:
                f = self.folded[proto.name]
                value = _float_weight(f, arrays).astype(helper.tensor_dtype_to_np_dtype(proto.data_type))
                proto.CopyFrom(numpy_helper.from_array(value, proto.name))
                out[proto.name] = value
        self.lazy -= set(out)
        return out

    def describe(self) -> str:
        return ", ".join(FORMS[k].label for k in sorted({f.kind for f in self.folded.values()}))


def _form_of(node: onnx.NodeProto, inits: dict, ctx: FoldContext | None = None):
    """The form whose quantized weight ``node`` holds, or None. A form that its readers decide (``by_readers``)
    counts only where it folds, given ``ctx``."""
    form = next((form for form in FORMS.values() if form.detect(node, inits)), None)
    if form is not None and form.by_readers and (ctx is None or form.fold(node, ctx) is None):
        return None
    return form


def _context(model: onnx.ModelProto) -> FoldContext:
    readers, producer = _edges(model)
    return FoldContext({i.name: i for i in model.graph.initializer}, producer, readers)


def is_quantized(model: onnx.ModelProto) -> bool:
    ctx = _context(model)
    return any(_form_of(n, ctx.inits, ctx) is not None for n in model.graph.node)


def refuse_operator_form(model: onnx.ModelProto):
    for n in model.graph.node:
        if n.op_type in OPERATOR_FORM:
            raise MatchError(f"the model is quantized in operator form ({n.op_type} node {n.name!r}), whose "
                             "heads cannot be followed through fused integer ops; prune the float model, then "
                             "quantize it (onnxruntime.quantization, QDQ or dynamic)")


def float_view(model: onnx.ModelProto, external_dir=None) -> tuple[onnx.ModelProto, QuantView | None]:
    """(the float view of a quantized ``model`` and its ``QuantView``), or (``model``, None) for a float one.
    A model quantized in operator form is refused."""
    refuse_operator_form(model)
    return view(model, external_dir) if is_quantized(model) else (model, None)


def _edges(model: onnx.ModelProto) -> tuple[dict, dict]:
    """({tensor: the nodes that read it}, {tensor: the node that makes it})"""
    return consumers(model), {o: n for n in model.graph.node for o in n.output}


def weight_sources(model: onnx.ModelProto) -> dict[str, str]:
    """{float view weight name: the quantized data initializer it stands for} of ``model`` (empty for a float
    model, or one in operator form), without dequantizing anything: what lets a count on the real model
    find the products of a block matched on the view."""
    ctx, out = _context(model), {}
    for n in model.graph.node:
        form = _form_of(n, ctx.inits, ctx)
        try:
            found = form.fold(n, ctx) if form is not None else None
        except MatchError:          # a form the view refuses: nothing to find
            found = None
        if found is not None:
            out[found[0].weight] = found[0].data
    return out


def quantized_sizes(model: onnx.ModelProto) -> tuple[dict[str, int], set[str]]:
    """({quantized weight: elements it dequantizes to}, names of their scales and zero points), for counting
    parameters."""
    ctx = _context(model)
    data, scales = {}, set()
    for n in model.graph.node:
        form = _form_of(n, ctx.inits, ctx)
        if form is not None:
            name, count, names = form.size(n, ctx.inits)
            data[name] = count
            scales.update(names)
    return data, scales


# ------------------------------------------------------------------ the float view
# float weights of this many bytes or more stay placeholders until read (see view): the size from which the
# probe stands in for a weight, so that no probe reads one
LAZY_FROM = 1 << 20
PLACEHOLDER = "onnxprune-not-dequantized-yet"


def _reader(real: onnx.ModelProto, external_dir):
    inits = {i.name: i for i in real.graph.initializer}
    base = str(external_dir or "")

    def arrays(name):
        return numpy_helper.to_array(inits[name], base_dir=base)
    return arrays


def _float_weight(f: Folded, arrays) -> np.ndarray:
    """The float weight that ``f``'s quantized data dequantizes to."""
    return FORMS[f.kind].float_weight(f, arrays)


def _placeholder(name: str, dims, data_type: int) -> onnx.TensorProto:
    """A float weight of the view that is not dequantized (yet): its name, shape and type, its data
    declared external under a name no file has, so that reading it fails loudly and the probe stands in
    for it (weights of ``LAZY_FROM`` bytes and more are never read to find shapes)."""
    t = onnx.TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(int(d) for d in dims)
    t.data_location = onnx.TensorProto.EXTERNAL
    size = int(np.prod(dims)) * helper.tensor_dtype_to_np_dtype(data_type).itemsize
    for key, value in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(size))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def view(real: onnx.ModelProto, external_dir=None, lazy: bool = True) -> tuple[onnx.ModelProto, QuantView]:
    """The float view of ``real`` (see the module docstring) and what it folded. With ``lazy``, float weights
    of ``LAZY_FROM`` bytes or more are placeholders (``_placeholder``) until ``QuantView.materialize``:
    matching needs their shapes only, and dequantizing all of an int4 LLM would take 8 times its size."""
    refuse_operator_form(real)
    if external_dir is not None:          # read again later, from inside another working directory
        external_dir = Path(external_dir).resolve()
    inits = {i.name: i for i in real.graph.initializer}
    arrays = _reader(real, external_dir)
    placeholders: set[str] = set()

    def float_weight(f: Folded, dims, data_type: int) -> onnx.TensorProto:
        size = int(np.prod(dims)) * helper.tensor_dtype_to_np_dtype(data_type).itemsize
        if lazy and size >= LAZY_FROM:
            placeholders.add(f.weight)
            return _placeholder(f.weight, dims, data_type)
        value = _float_weight(f, arrays).astype(helper.tensor_dtype_to_np_dtype(data_type))
        return numpy_helper.from_array(value, f.weight)

    readers, producer = _edges(real)
    folded: dict[str, Folded] = {}
    more: dict[str, list] = {}
    replace: dict[str, list] = {}       # real node name -> the view nodes in its place ([] drops it)
    new_inits: list[onnx.TensorProto] = []

    ctx = FoldContext(inits, producer, readers)
    for n in real.graph.node:
        form = _form_of(n, inits, ctx)
        found = form.fold(n, ctx) if form is not None else None
        if found is None:
            continue
        f, dims, data_type, in_place = found
        if f.weight in folded:          # another reader of the same quantized data: the same float weight
            if folded[f.weight].data != f.data:
                raise MatchError(f"two quantized weights would stand for {f.weight!r} in the float view")
            more.setdefault(f.weight, []).append(f)
        else:
            folded[f.weight] = f
            new_inits.append(float_weight(f, dims, data_type))
        replace.update(in_place)
    if not folded:
        raise MatchError("no quantized weight found")
    gone = set(replace)                 # real nodes that the view replaces
    # a DynamicQuantizeLinear whose every reader is folded goes too (refold puts it back)
    for n in real.graph.node:
        if n.op_type == "DynamicQuantizeLinear":
            if all(r.name in gone for o in n.output for r in readers.get(o, [])):
                replace[n.name] = []
    out = onnx.ModelProto()
    out.CopyFrom(real)
    nodes = []
    for n in real.graph.node:
        nodes.extend(replace.get(n.name, [n]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    folded_inputs = {i for n in real.graph.node if n.name in replace for i in n.input}
    # the quantized data, scales and zero points leave the view; anything else (stored scores) stays
    keep = [i for i in out.graph.initializer if i.name in used or i.name not in folded_inputs]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep + [i for i in new_inits if i.name in used])
    _drop_value_info(out, {o for f in [*folded.values(), *(g for gs in more.values() for g in gs)] for n in f.nodes
                           for o in n.output if o not in {m.output[0] for ns in replace.values() for m in ns}})
    return out, QuantView(real, folded, external_dir, placeholders & {i.name for i in out.graph.initializer}, more)


def _drop_value_info(model, names):
    keep = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


# ------------------------------------------------------------------ back to the quantized form
def refold(pruned_view: onnx.ModelProto, qv: QuantView, keeps: dict[str, dict[int, np.ndarray]]
           ) -> onnx.ModelProto:
    """The pruned quantized model: ``pruned_view`` with each folded weight back in its quantized form, cut
    to ``keeps[weight]`` ({axis of the float weight that shrinks: kept positions}; absent: unchanged; other
    names are ignored: the rewriter's ``cuts``)."""
    real = qv.real
    base = str(qv.external_dir or "")
    real_inits = {i.name: i for i in real.graph.initializer}
    view_inits = {i.name for i in pruned_view.graph.initializer}

    def arr(name):
        return numpy_helper.to_array(real_inits[name], base_dir=base)

    out = onnx.ModelProto()
    out.CopyFrom(pruned_view)
    add: dict[str, onnx.TensorProto] = {}
    before: dict[str, list] = {}     # view node name -> real nodes to put in its place
    readers_of: dict[str, list] = {}
    for n in out.graph.node:
        for i in n.input:
            readers_of.setdefault(i, []).append(n.name)
    restored = {n.name for n in out.graph.node}      # real nodes still in the view come back as they are
    real_nodes = {n.name: n for n in real.graph.node}
    for f in qv.every():
        if f.weight not in view_inits:
            if readers_of.get(f.weight):
                raise PlanError(f"the quantized weight {f.data!r} was replaced while pruning; not supported")
            continue
        keep = keeps.get(f.weight, {})
        tensors = _cut(f, keep, arr)
        attrs = tensors.pop("__attrs__", {})
        for name, value in tensors.items():
            add[name] = numpy_helper.from_array(value, name)
        node_list = [_with_attrs(n, attrs) if n.op_type in ("MatMulNBits", "DequantizeLinear") else n
                     for n in f.nodes]
        for n in node_list:        # what is not cut comes back as it was, byte for byte
            for i in n.input:
                if i in real_inits and i not in add:
                    add[i] = real_inits[i]
        if f.anchor is None:        # the real nodes read the float weight's name: before its first reader
            first = next(n for n in out.graph.node if f.weight in n.input)
            before.setdefault(first.name, []).extend(node_list)
        else:
            shared = [name for name in f.restore if name not in restored]
            node_list = [real_nodes[name] for name in shared] + list(node_list)
            restored.update(shared)
            before.setdefault(f.anchor, []).extend(node_list)
    gone = {name for f in qv.every() for name in f.view_nodes}
    nodes = []
    for n in out.graph.node:
        if n.name in before:
            nodes.extend(before[n.name])
        if n.name in gone:
            continue
        nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    folded_names = set(qv.folded)
    used = {i for n in nodes for i in n.input}
    inits = [i for i in out.graph.initializer if i.name not in folded_names and i.name in used]
    names = {i.name for i in inits}
    for name, proto in add.items():
        if name not in names and name in used:
            inits.append(proto)
            names.add(name)
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    _drop_value_info(out, {n.output[0] for n in nodes if n.op_type == "MatMulNBits"})
    return out


def _with_attrs(node, attrs: dict):
    if not attrs:
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    for a in new.attribute:
        if a.name in attrs:
            a.CopyFrom(helper.make_attribute(a.name, attrs[a.name]))
    return new


def _cut(f: Folded, keep: dict, arr) -> dict:
    """The cut initializers of ``f`` by name ({} when ``keep`` keeps all), and "__attrs__" for attributes."""
    if not keep:
        return {}
    return FORMS[f.kind].cut(f, keep, arr)


# ------------------------------------------------------------------ the masked reference
def masked(qv: QuantView, view_model: onnx.ModelProto, blocks, kept: dict, zeroed: dict | None = None,
           ov_keep: dict | None = None) -> onnx.ModelProto:
    """The quantized model with the dropped heads' inputs of each output projection zeroed (a Mul by a
    0/1 vector), where the projection reads them, and of the kept heads the positions that ``ov_keep`` ({block:
    head-size positions}: an OV cut that keeps positions) leaves out; and each tensor of ``zeroed`` ({name: 0/1
    vector over its last axis}: the queries, or keys, of a cut that keeps positions) multiplied by its vector for
    every reader."""
    out = onnx.ModelProto()
    out.CopyFrom(qv.real)
    for x, mask in (zeroed or {}).items():
        name = f"{x}.onnxprune_zeroed"
        out.graph.initializer.append(numpy_helper.from_array(np.asarray(mask, np.float32), f"{name}.value"))
        for n in out.graph.node:
            n.input[:] = [name if i == x else i for i in n.input]
        at = next(i for i, n in enumerate(out.graph.node) if x in n.output) + 1
        out.graph.node.insert(at, helper.make_node("Mul", [x, f"{name}.value"], [name], name=name))
    anchors = {f.anchor: f for f in qv.every() if f.anchor}
    for b in blocks:
        keep = set(kept.get(b.index, range(b.num_heads)))
        dropped = {u for u, heads in enumerate(b.units) if len(heads) == 1 and not heads & keep}
        positions = (ov_keep or {}).get(b.index)
        if not dropped and positions is None:
            continue
        w = b.o_proj.weight
        owner = b.tensor(w).owner
        mask = (~np.isin(owner, list(dropped))).astype(np.float32)
        if positions is not None:        # each head's positions that the OV cut drops
            for unit, pos in runs(owner):
                if unit >= 0:
                    zero_dropped(mask, pos, positions)
        readers = [n for n in view_model.graph.node if n.op_type in ("MatMul", "Gemm")
                   and len(n.input) > 1 and n.input[1] == w]
        # the block's own reader, where several blocks read one weight
        reader = next((n for n in readers if n.name in b.nodes), readers[0] if readers else None)
        if reader is None or b.o_proj.head_axis != 0:
            raise PlanError(f"block {b.index} ({b.name}): its output projection is not a MatMul of a quantized "
                            "model that masking understands")
        x = reader.input[0]
        f = anchors.get(reader.name)
        real_readers = {reader.name} | (set(f.restore) if f is not None else set())
        name = f"{x}.onnxprune_mask{b.index}"
        out.graph.initializer.append(numpy_helper.from_array(mask, f"{name}.value"))
        at = next(i for i, n in enumerate(out.graph.node) if n.name in real_readers and x in n.input)
        for n in out.graph.node:
            if n.name in real_readers:
                n.input[:] = [name if i == x else i for i in n.input]
        out.graph.node.insert(at, helper.make_node("Mul", [x, f"{name}.value"], [name], name=name))
    return out
