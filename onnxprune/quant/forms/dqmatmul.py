"""``dqmatmul``: ONNX Runtime's ``DynamicQuantizeMatMul`` (float A, int8 weight B, its scale and zero point per
column or per tensor, an optional bias), what its CPU optimizer makes of ``quantize_dynamic``'s pattern where one
weight reads an input; a model saved after those optimizations holds it. Seen in the view as one MatMul (and
the Add of its bias); the weight is cut with its scales, zero points and bias along its columns, rows as they
are."""

from __future__ import annotations

import numpy as np

from ..codes import column_weight, cut_columns, fused_matmul_view
from ..form import Folded, Form


def _detect(n, inits) -> bool:
    return n.op_type == "DynamicQuantizeMatMul" and n.input[1] in inits


def _size(n, inits):
    return n.input[1], int(np.prod(inits[n.input[1]].dims)), tuple(i for i in n.input[2:4] if i)


def _fold(n, ctx):
    zero = n.input[3] if len(n.input) > 3 and n.input[3] else None
    bias = n.input[4] if len(n.input) > 4 and n.input[4] else None
    if n.input[2] not in ctx.inits or (zero and zero not in ctx.inits) or (bias and bias not in ctx.inits):
        return None
    weight = ctx.fresh_name(n.input[1].removesuffix("_quantized"))
    nodes = fused_matmul_view(n, n.input[0], weight, bias)
    f = Folded("dqmatmul", weight, (n,), n.name, n.input[1], n.input[2], zero, (bias,) if bias else (),
               view_nodes=tuple(m.name for m in nodes))
    return f, ctx.inits[n.input[1]].dims, ctx.inits[n.input[2]].data_type, {n.name: nodes}


FORM = Form("dqmatmul", "int8 dynamic fused by ORT (DynamicQuantizeMatMul)", _detect, _size, _fold, column_weight,
            cut_columns)
