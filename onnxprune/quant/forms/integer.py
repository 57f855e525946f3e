"""``integer``: quantize_dynamic's int8 pattern, DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul by the
two scales, seen in the view as one MatMul of the float input. The DynamicQuantizeLinear may serve several
weights (Q, K and V read one input): it comes back once (``Folded.restore``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...errors import MatchError
from ..codes import column_weight, cut_columns
from ..form import Folded, Form


def _detect(n, inits) -> bool:
    return n.op_type == "MatMulInteger" and n.input[1] in inits


def _size(n, inits):
    return n.input[1], int(np.prod(inits[n.input[1]].dims)), tuple(n.input[3:4])


def _fold(n, ctx):
    group = _integer_group(n, ctx.producer, ctx.readers, ctx.inits)
    if group is None:
        raise MatchError(f"MatMulInteger node {n.name!r} is not followed by the Cast and the Mul by "
                         "its scales that quantize_dynamic writes; not supported")
    dql, scale_mul, cast, out_mul, w_scale = group
    weight = ctx.fresh_name(n.input[1].removesuffix("_quantized"))
    f = Folded("integer", weight, (scale_mul, n, cast, out_mul), n.name, n.input[1], w_scale,
               n.input[3] if len(n.input) > 3 and n.input[3] else None, (dql.name,),
               view_nodes=(n.name,), restore=(dql.name,))
    replace = {n.name: [helper.make_node("MatMul", [dql.input[0], weight], [out_mul.output[0]], name=n.name)]}
    for other in (scale_mul, cast, out_mul):
        replace[other.name] = []
    return f, ctx.inits[n.input[1]].dims, onnx.TensorProto.FLOAT, replace


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


def _cut(f, keep, arr):
    # ``f.extra`` holds the activation's DynamicQuantizeLinear, not a vector of the weight
    return cut_columns(f, keep, arr, (f.scale, f.zero))


FORM = Form("integer", "int8 dynamic (MatMulInteger)", _detect, _size, _fold, column_weight, _cut)
