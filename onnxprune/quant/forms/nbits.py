"""``nbits``: MatMulNBits (int4/int8 blocks along K, a scale and a zero point per block and column: ORT GenAI's
``-p int4`` and ``MatMulNBitsQuantizer``), seen in the view as one MatMul (and the Add of its bias). Rows are
cut in whole blocks, or re-packed exactly into smaller blocks with the old scales and zero points."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...errors import MatchError, PlanError
from ..codes import attrs, nbits, pack, sub_block, typed
from ..form import Folded, Form


def _detect(n, inits) -> bool:
    return n.op_type == "MatMulNBits"


def _size(n, inits):
    a = attrs(n)
    return n.input[1], int(a["K"]) * int(a["N"]), tuple(n.input[2:4])


def _fold(n, ctx):
    if len(n.input) > 4 and n.input[4]:
        raise MatchError(f"MatMulNBits node {n.name!r} reorders its rows (g_idx); not supported")
    weight = ctx.fresh_name(n.input[1].removesuffix("_Q4").removesuffix("_Q8") or n.name)
    bias = n.input[5] if len(n.input) > 5 and n.input[5] else None
    out = n.output[0]
    nodes = [helper.make_node("MatMul", [n.input[0], weight], [f"{out}.onnxprune_nobias" if bias else out],
                              name=n.name)]
    if bias:
        nodes.append(helper.make_node("Add", [nodes[0].output[0], bias], [out], name=f"{n.name}.bias"))
    zero = n.input[3] if len(n.input) > 3 and n.input[3] else None
    if zero and ctx.inits[zero].data_type != onnx.TensorProto.UINT8:
        raise MatchError(f"MatMulNBits node {n.name!r} has float zero points; only packed uint8 zero "
                         "points are supported")
    f = Folded("nbits", weight, (n,), n.name, n.input[1], n.input[2], zero, (bias,) if bias else (),
               view_nodes=tuple(m.name for m in nodes))
    a = attrs(n)
    return f, (a["K"], a["N"]), ctx.inits[n.input[2]].data_type, {n.name: nodes}


def _float_weight(f, arrays):
    return nbits(f.nodes[0], arrays).dequantized()


def _cut(f, keep, arr):
    nb = nbits(f.nodes[0], arr)     # the float weight is [K, N]
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
        new_block = sub_block(rows, block)
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
    out[f.data] = pack(q.reshape(n, nb_new, new_block), nb.bits)
    like = arr(f.scale)
    out[f.scale] = typed(scales.reshape(n, -1) if like.ndim == 2 else scales.reshape(-1), like)
    if f.zero:
        packed = pack(zeros, nb.bits)
        out[f.zero] = packed if arr(f.zero).ndim == 2 else packed.reshape(-1)
    out["__attrs__"] = {"K": int(k), "N": int(n), "block_size": int(new_block)}
    return out


FORM = Form("nbits", "MatMulNBits", _detect, _size, _fold, _float_weight, _cut)
