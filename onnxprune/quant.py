"""Quantized models: pruned in their quantized form, never re-quantized.

A quantized model is matched, scored and planned on its *float view*: the same graph with each quantized
weight replaced by the float weight that it dequantizes to, so that every matcher, importance method and
the rewriter work on it as on any float model. The forms, as onnxruntime's quantizers write them:

* ``dq``: a ``DequantizeLinear`` of an initializer (QDQ models, per-tensor, per-axis or blockwise);
* ``integer``: ``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> ``Cast`` -> ``Mul`` by the two scales
  (``quantize_dynamic``), seen as one ``MatMul`` of the float input;
* ``nbits``: ``MatMulNBits`` (int4/int8 blocks along K, a scale and a zero point per block and column: ORT
  GenAI's ``-p int4`` and ``MatMulNBitsQuantizer``), seen as one ``MatMul`` (and the ``Add`` of its bias).

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

from .errors import MatchError, PlanError

OPERATOR_FORM = {"QLinearMatMul", "QAttention", "QLinearConv", "QGemm", "QOrderedAttention", "QOrderedMatMul",
                 "QLinearSoftmax"}
# what ONNX Runtime's graph optimizer makes of quantize_dynamic's ops, in a model saved after optimization
ORT_FUSED = {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


@dataclass(frozen=True)
class Folded:
    """One quantized weight of the real model and the float weight ``weight`` that stands for it in the
    view. ``nodes``: the real nodes that the view replaces (for ``dq``, the DequantizeLinear alone);
    ``anchor``: the name of the view node that stands for them (None for ``dq``: the float weight is an
    initializer read by the real nodes themselves); ``data``/``scale``/``zero``: the initializers."""

    kind: str
    weight: str
    nodes: tuple
    anchor: str | None
    data: str
    scale: str
    zero: str | None
    extra: tuple = ()          # nbits: the bias initializer name, if any; integer: the activation's DQL


@dataclass
class QuantView:
    real: onnx.ModelProto
    folded: dict           # view weight name -> Folded
    external_dir: object = None
    lazy: set = field(default_factory=set)     # float weights of the view not dequantized yet (placeholders)

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
        kinds = sorted({f.kind for f in self.folded.values()})
        return ", ".join({"dq": "QDQ", "integer": "int8 dynamic (MatMulInteger)",
                          "nbits": "MatMulNBits"}[k] for k in kinds)


def is_quantized(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    return any((n.op_type == "DequantizeLinear" and n.input[0] in inits) or n.op_type == "MatMulNBits"
               or (n.op_type == "MatMulInteger" and n.input[1] in inits) for n in model.graph.node)


def refuse_operator_form(model: onnx.ModelProto):
    for n in model.graph.node:
        if n.op_type in ORT_FUSED:
            raise MatchError(f"{n.op_type} node {n.name!r}: this int8 model was saved after ONNX Runtime's graph "
                             "optimizations, which fuse the quantized matmuls; prune the model that the quantizer "
                             "wrote (or the float model, then quantize it)")
        if n.op_type in OPERATOR_FORM:
            raise MatchError(f"the model is quantized in operator form ({n.op_type} node {n.name!r}), whose "
                             "heads cannot be followed through fused integer ops; prune the float model, then "
                             "quantize it (onnxruntime.quantization, QDQ or dynamic)")


def float_view(model: onnx.ModelProto, external_dir=None) -> tuple[onnx.ModelProto, QuantView | None]:
    """(the float view of a quantized ``model`` and its ``QuantView``), or (``model``, None) for a float one.
    A model quantized in operator form is refused."""
    refuse_operator_form(model)
    return view(model, external_dir) if is_quantized(model) else (model, None)


def quantized_sizes(model: onnx.ModelProto) -> tuple[dict[str, int], set[str]]:
    """({quantized weight: elements it dequantizes to}, names of their scales and zero points), for counting
    parameters."""
    inits = {i.name: i for i in model.graph.initializer}
    data, scales = {}, set()
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            data[n.input[0]] = int(np.prod(inits[n.input[0]].dims))
            scales.update(n.input[1:])
        elif n.op_type == "MatMulInteger" and n.input[1] in inits:
            data[n.input[1]] = int(np.prod(inits[n.input[1]].dims))
            scales.update(n.input[3:4])
        elif n.op_type == "MatMulNBits":
            a = _attrs(n)
            data[n.input[1]] = int(a["K"]) * int(a["N"])
            scales.update(n.input[2:4])
    return data, scales


# ------------------------------------------------------------------ dequantization
def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[..., bytes] of ``bits``-bit values (low bits first) -> [..., count] uint8."""
    if bits == 8:
        return packed[..., :count]
    per = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return values.astype(np.uint8)
    per = 8 // bits
    pad = (-values.shape[-1]) % per
    if pad:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], axis=-1)
    v = values.reshape(*values.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per):
        out |= (v[..., i] << (bits * i)).astype(np.uint8)
    return out


@dataclass(frozen=True)
class _NBits:
    """A MatMulNBits weight unpacked: q [N, nb*bs] codes, scales and zero points [N, nb]."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    k: int
    n: int
    bits: int
    block: int

    def dequantized(self) -> np.ndarray:
        s = np.repeat(self.scales.astype(np.float32), self.block, axis=1)
        z = np.repeat(self.zeros.astype(np.float32), self.block, axis=1)
        return np.ascontiguousarray(((self.q.astype(np.float32) - z) * s)[:, :self.k].T)


def _nbits(node: onnx.NodeProto, arrays) -> _NBits:
    attrs = _attrs(node)
    k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    nb = -(-k // block)
    b = arrays(node.input[1])
    q = _unpack(b.reshape(n, nb, -1), bits, block).reshape(n, nb * block)
    scales = arrays(node.input[2]).reshape(n, nb)
    zp = node.input[3] if len(node.input) > 3 else ""
    if zp:           # packed uint8 (float zero points are refused by ``view``)
        zeros = _unpack(arrays(zp).reshape(n, -1), bits, nb)
    else:
        zeros = np.full((n, nb), 1 << (bits - 1), np.uint8)
    return _NBits(q, scales, zeros, k, n, bits, block)


def _dq_value(x, scale, zero, axis: int, block: int) -> np.ndarray:
    x = x.astype(np.float32)
    s = scale.astype(np.float32)
    z = zero.astype(np.float32) if zero is not None else np.zeros_like(s)
    if s.size == 1:
        return (x - z.reshape(())) * s.reshape(())
    axis %= x.ndim
    if block:
        s = np.repeat(s, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        z = np.repeat(z, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        return (x - z) * s
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - z.reshape(shape)) * s.reshape(shape)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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


def _float_weight(f: "Folded", arrays) -> np.ndarray:
    """The float weight that ``f``'s quantized data dequantizes to."""
    node = f.nodes[0]
    if f.kind == "dq":
        a = _attrs(node)
        return _dq_value(arrays(f.data), arrays(f.scale), arrays(f.zero) if f.zero else None,
                         a.get("axis", 1), a.get("block_size", 0))
    if f.kind == "nbits":
        return _nbits(node, arrays).dequantized()
    return _dq_value(arrays(f.data), arrays(f.scale), arrays(f.zero) if f.zero else None, -1, 0)


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

    readers: dict[str, list] = {}
    producer = {}
    for n in real.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n
    folded: dict[str, Folded] = {}
    replace: dict[str, list] = {}       # real node name -> the view nodes in its place ([] drops it)
    new_inits: list[onnx.TensorProto] = []

    for n in real.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[1] in inits:
            zero = n.input[2] if len(n.input) > 2 and n.input[2] else None
            f = folded[n.output[0]] = Folded("dq", n.output[0], (n,), None, n.input[0], n.input[1], zero)
            new_inits.append(float_weight(f, inits[n.input[0]].dims, inits[n.input[1]].data_type))
            replace[n.name] = []
        elif n.op_type == "MatMulNBits":
            if len(n.input) > 4 and n.input[4]:
                raise MatchError(f"MatMulNBits node {n.name!r} reorders its rows (g_idx); not supported")
            weight = _fresh_name(n.input[1].removesuffix("_Q4").removesuffix("_Q8") or n.name, inits)
            bias = n.input[5] if len(n.input) > 5 and n.input[5] else None
            out = n.output[0]
            nodes = [helper.make_node("MatMul", [n.input[0], weight], [f"{out}.onnxprune_nobias" if bias else out],
                                      name=n.name)]
            if bias:
                nodes.append(helper.make_node("Add", [nodes[0].output[0], bias], [out], name=f"{n.name}.bias"))
            zero = n.input[3] if len(n.input) > 3 and n.input[3] else None
            f = folded[weight] = Folded("nbits", weight, (n,), n.name, n.input[1], n.input[2], zero,
                                        (bias,) if bias else ())
            if zero and inits[zero].data_type != onnx.TensorProto.UINT8:
                raise MatchError(f"MatMulNBits node {n.name!r} has float zero points; only packed uint8 zero "
                                 "points are supported")
            a = _attrs(n)
            new_inits.append(float_weight(f, (a["K"], a["N"]), inits[n.input[2]].data_type))
            replace[n.name] = nodes
        elif n.op_type == "MatMulInteger" and n.input[1] in inits:
            group = _integer_group(n, producer, readers, inits)
            if group is None:
                raise MatchError(f"MatMulInteger node {n.name!r} is not followed by the Cast and the Mul by "
                                 "its scales that quantize_dynamic writes; not supported")
            dql, scale_mul, cast, out_mul, w_scale = group
            weight = _fresh_name(n.input[1].removesuffix("_quantized"), inits)
            nodes = (scale_mul, n, cast, out_mul)
            f = folded[weight] = Folded("integer", weight, nodes, n.name, n.input[1], w_scale,
                                        n.input[3] if len(n.input) > 3 and n.input[3] else None, (dql.name,))
            new_inits.append(float_weight(f, inits[n.input[1]].dims, onnx.TensorProto.FLOAT))
            replace[n.name] = [helper.make_node("MatMul", [dql.input[0], weight], [out_mul.output[0]], name=n.name)]
            for other in (scale_mul, cast, out_mul):
                replace[other.name] = []
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
    _drop_value_info(out, {o for f in folded.values() for n in f.nodes for o in n.output
                           if o not in {m.output[0] for ns in replace.values() for m in ns}})
    return out, QuantView(real, folded, external_dir, placeholders & {i.name for i in out.graph.initializer})


def _fresh_name(name: str, taken) -> str:
    return name if name not in taken else f"{name}.dequantized"


def _drop_value_info(model, names):
    keep = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _integer_group(n, producer, readers, inits):
    """quantize_dynamic's pattern around MatMulInteger ``n``: (DynamicQuantizeLinear, Mul of the scales,
    Cast, Mul by the scales, weight scale name), or None."""
    dql = producer.get(n.input[0])
    if dql is None or dql.op_type != "DynamicQuantizeLinear":
        return None
    after = readers.get(n.output[0], [])
    if len(after) != 1 or after[0].op_type != "Cast":
        return None
    cast = after[0]
    after = readers.get(cast.output[0], [])
    if len(after) != 1 or after[0].op_type != "Mul":
        return None
    out_mul = after[0]
    s = next(i for i in out_mul.input if i != cast.output[0])
    scale_mul = producer.get(s)
    if scale_mul is None or scale_mul.op_type != "Mul" or dql.output[1] not in scale_mul.input:
        return None
    w_scale = next(i for i in scale_mul.input if i != dql.output[1])
    if w_scale not in inits or len(readers.get(s, [])) != 1:
        return None
    return dql, scale_mul, cast, out_mul, w_scale


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
    restored_dql = {n.name for n in out.graph.node if n.op_type == "DynamicQuantizeLinear"}   # still in the view
    real_nodes = {n.name: n for n in real.graph.node}
    for f in qv.folded.values():
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
        if f.kind == "dq":
            first = next(n for n in out.graph.node if f.weight in n.input)
            before.setdefault(first.name, []).extend(node_list)
        else:
            if f.kind == "integer" and f.extra[0] not in restored_dql:
                node_list = [real_nodes[f.extra[0]]] + list(node_list)
                restored_dql.add(f.extra[0])
            before.setdefault(f.anchor, []).extend(node_list)
    anchors = {f.anchor for f in qv.folded.values() if f.anchor}
    bias_adds = {f"{f.anchor}.bias" for f in qv.folded.values() if f.kind == "nbits" and f.extra}
    nodes = []
    for n in out.graph.node:
        if n.name in before:
            nodes.extend(before[n.name])
        if n.name in anchors or n.name in bias_adds:
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
    """The cut initializers of ``f`` by name ({} when ``keep`` keeps all), and "__attrs__" for MatMulNBits."""
    if not keep:
        return {}
    node = f.nodes[0] if f.kind != "integer" else f.nodes[1]
    if f.kind == "dq":
        a = _attrs(node)
        x = arr(f.data)
        axis, block = a.get("axis", 1) % max(x.ndim, 1), a.get("block_size", 0)
        out = {f.data: _take(x, keep)}
        new_block = block
        if block and axis in keep:      # whole blocks, or re-packed into smaller ones with the old scales
            new_block = _sub_block(keep[axis], block)
            if new_block is None:
                raise PlanError(f"quantized weight {f.data!r}: its kept rows do not split into blocks of 16 or "
                                f"more that each lie in one block of {block}; prune the float model, then "
                                "quantize it")
        for name in (f.scale, f.zero):
            if not name:
                continue
            s = arr(name)
            if s.size == 1:
                continue
            if not block:
                out[name] = s[keep[axis]] if axis in keep else s
                continue
            out[name] = _take(s, {ax: idx[::new_block] // block if ax == axis else idx for ax, idx in keep.items()})
        out = {k: _typed(v, arr(k)) for k, v in out.items()}
        if new_block != block:
            out["__attrs__"] = {"block_size": int(new_block)}
        return out
    if f.kind == "integer":
        out = {f.data: _take(arr(f.data), keep)}
        for name in (f.scale, f.zero):
            if name and arr(name).size > 1 and 1 in keep:
                out[name] = arr(name)[keep[1]]
        return out
    # nbits: the float weight is [K, N]
    nb = _nbits(node, arr)
    q, scales, zeros, k, block = nb.q, nb.scales, nb.zeros, nb.k, nb.block
    bias = f.extra[0] if f.extra else None
    out: dict = {}
    if 1 in keep:
        cols = keep[1]
        q, scales, zeros = q[cols], scales[cols], zeros[cols]
        if bias:
            out[bias] = arr(bias)[cols]
    new_block = block
    if 0 in keep:
        rows = keep[0]
        new_block = _sub_block(rows, block)
        if new_block is None:
            raise PlanError(f"quantized weight {f.data!r}: its kept rows do not split into blocks of 16 or more "
                            f"that each lie in one block of {block}")
        picked = q[:, rows]
        old_block = rows[::new_block] // block
        scales, zeros, q = scales[:, old_block], zeros[:, old_block], picked
        k = len(rows)
    n = q.shape[0]
    nb_new = -(-k // new_block)
    pad = nb_new * new_block - q.shape[1]
    if pad:
        q = np.concatenate([q, np.zeros((n, pad), q.dtype)], axis=1)
    out[f.data] = _pack(q.reshape(n, nb_new, new_block), nb.bits)
    like = arr(f.scale)
    out[f.scale] = _typed(scales.reshape(n, -1) if like.ndim == 2 else scales.reshape(-1), like)
    if f.zero:
        packed = _pack(zeros, nb.bits)
        out[f.zero] = packed if arr(f.zero).ndim == 2 else packed.reshape(-1)
    out["__attrs__"] = {"K": int(k), "N": int(n), "block_size": int(new_block)}
    return out


def _sub_block(rows: np.ndarray, block: int) -> int | None:
    """The largest block size (``block`` itself when ``rows`` keep whole blocks, else a power of two down to
    16) whose blocks of ``rows`` each lie in one block of ``block`` original rows, contiguously (so that one
    old scale serves each); only the last may be short."""
    size = block
    while size >= min(16, block):
        ok = True
        for j in range(0, len(rows), size):
            part = rows[j:j + size]
            if len(np.unique(part // block)) != 1 or np.any(np.diff(part) != 1):
                ok = False
                break
        if ok:
            return size
        size //= 2
    return None


def _take(a: np.ndarray, keep: dict) -> np.ndarray:
    for ax, idx in keep.items():
        a = np.take(a, idx, axis=ax)
    return np.ascontiguousarray(a)


def _typed(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    return value.astype(like.dtype, copy=False)


# ------------------------------------------------------------------ the masked reference
def masked(qv: QuantView, view_model: onnx.ModelProto, blocks, kept: dict) -> onnx.ModelProto:
    """The quantized model with the dropped heads' inputs of each output projection zeroed (a Mul by a
    0/1 vector), where the projection reads them."""
    out = onnx.ModelProto()
    out.CopyFrom(qv.real)
    anchors = {f.anchor: f for f in qv.folded.values() if f.anchor}
    for b in blocks:
        keep = set(kept.get(b.index, range(b.num_heads)))
        dropped = {u for u, heads in enumerate(b.units) if len(heads) == 1 and not heads & keep}
        if not dropped:
            continue
        w = b.o_proj.weight
        owner = b.tensor(w).owner
        mask = (~np.isin(owner, list(dropped))).astype(np.float32)
        reader = next((n for n in view_model.graph.node if n.op_type in ("MatMul", "Gemm")
                       and len(n.input) > 1 and n.input[1] == w), None)
        if reader is None or b.o_proj.head_axis != 0:
            raise PlanError(f"block {b.index} ({b.name}): its output projection is not a MatMul of a quantized "
                            "model that masking understands")
        x = reader.input[0]
        f = anchors.get(reader.name)
        real_readers = {reader.name} | ({f.extra[0]} if f is not None and f.kind == "integer" else set())
        name = f"{x}.onnxprune_mask{b.index}"
        out.graph.initializer.append(numpy_helper.from_array(mask, f"{name}.value"))
        at = next(i for i, n in enumerate(out.graph.node) if n.name in real_readers and x in n.input)
        for n in out.graph.node:
            if n.name in real_readers:
                n.input[:] = [name if i == x else i for i in n.input]
        out.graph.node.insert(at, helper.make_node("Mul", [x, f"{name}.value"], [name], name=name))
    return out
