"""``dq``: a DequantizeLinear of an initializer (QDQ models: per tensor, per axis, or blockwise int4 with
``block_size``). The real DequantizeLinear reads the float weight's name itself, so the view only drops it."""

from __future__ import annotations

import numpy as np

from ...errors import PlanError
from ..codes import attrs, dq_value, sub_block, take, typed
from ..form import Folded, Form


def _detect(n, inits) -> bool:
    return n.op_type == "DequantizeLinear" and n.input[0] in inits


def _size(n, inits):
    return n.input[0], int(np.prod(inits[n.input[0]].dims)), tuple(n.input[1:])


def _fold(n, ctx):
    if n.input[1] not in ctx.inits:
        return None
    zero = n.input[2] if len(n.input) > 2 and n.input[2] else None
    f = Folded("dq", n.output[0], (n,), None, n.input[0], n.input[1], zero)
    return f, ctx.inits[n.input[0]].dims, ctx.inits[n.input[1]].data_type, {n.name: []}


def _float_weight(f, arrays):
    a = attrs(f.nodes[0])
    return dq_value(arrays(f.data), arrays(f.scale), arrays(f.zero) if f.zero else None,
                    a.get("axis", 1), a.get("block_size", 0))


def _cut(f, keep, arr):
    a = attrs(f.nodes[0])
    x = arr(f.data)
    axis, block = a.get("axis", 1) % max(x.ndim, 1), a.get("block_size", 0)
    out = {f.data: take(x, keep)}
    new_block = block
    if block and axis in keep:      # whole blocks, or re-packed into smaller ones with the old scales
        new_block = sub_block(keep[axis], block)
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
        out[name] = take(s, {ax: idx[::new_block] // block if ax == axis else idx for ax, idx in keep.items()})
    out = {k: typed(v, arr(k)) for k, v in out.items()}
    if new_block != block:
        out["__attrs__"] = {"block_size": int(new_block)}
    return out


FORM = Form("dq", "QDQ", _detect, _size, _fold, _float_weight, _cut)
