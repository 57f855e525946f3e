"""``inttofloat``: ONNX Runtime's ``MatMulIntegerToFloat`` (the uint8 output of a ``DynamicQuantizeLinear``, an
int8 weight, both scales and zero points, an optional bias), what its CPU optimizer makes of ``quantize_dynamic``'s
pattern where several weights read one input (Q, K and V). Seen in the view as one MatMul of the float input that
the DynamicQuantizeLinear reads (which comes back once: ``Folded.restore``); the weight is cut with its scale,
zero point and bias along its columns."""

from __future__ import annotations

import numpy as np

from ...errors import MatchError
from ..codes import column_weight, cut_columns, fused_matmul_view
from ..form import Folded, Form


def _detect(n, inits) -> bool:
    return n.op_type == "MatMulIntegerToFloat" and n.input[1] in inits


def _size(n, inits):
    return n.input[1], int(np.prod(inits[n.input[1]].dims)), tuple(i for i in (n.input[3], *n.input[5:6]) if i)


def _fold(n, ctx):
    dql = ctx.producer.get(n.input[0])
    if dql is None or dql.op_type != "DynamicQuantizeLinear":
        raise MatchError(f"MatMulIntegerToFloat node {n.name!r} does not read a DynamicQuantizeLinear; not supported")
    scale = n.input[3]
    zero = n.input[5] if len(n.input) > 5 and n.input[5] else None
    bias = n.input[6] if len(n.input) > 6 and n.input[6] else None
    if scale not in ctx.inits or (zero and zero not in ctx.inits) or (bias and bias not in ctx.inits):
        return None
    weight = ctx.fresh_name(n.input[1].removesuffix("_quantized"))
    nodes = fused_matmul_view(n, dql.input[0], weight, bias)
    f = Folded("inttofloat", weight, (n,), n.name, n.input[1], scale, zero, (bias,) if bias else (),
               view_nodes=tuple(m.name for m in nodes), restore=(dql.name,))
    return f, ctx.inits[n.input[1]].dims, ctx.inits[scale].data_type, {n.name: nodes}


FORM = Form("inttofloat", "int8 dynamic fused by ORT (MatMulIntegerToFloat)", _detect, _size, _fold, column_weight,
            cut_columns)
