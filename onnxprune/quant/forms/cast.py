"""``cast``: weight-only int8 written by hand, ``DequantizeLinear`` spelled out: an int8 (or uint8) matrix
initializer -> ``Cast`` to float -> ``Mul`` by a scale initializer (per column ``[1, N]`` or ``[N]``, per row
``[K, 1]``, or one number), read as the weight of a ``MatMul`` or ``Gemm`` (OCR recognisers from paddle2onnx and
some TTS exports write it so). The ``Mul``'s output is the float weight's name, so the view drops both nodes and
the real ones come back before the weight's first reader; the data and its scale are cut along the head axis,
never quantized again."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..codes import attrs, typed
from ..form import Folded, Form

INTEGER = (TensorProto.INT8, TensorProto.UINT8)
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _scale_of(n, ctx):
    """The Mul that scales the Cast ``n``'s output, and its scale initializer's name (or None, None)."""
    readers = ctx.readers.get(n.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Mul":
        return None, None
    mul = readers[0]
    other = mul.input[1] if mul.input[0] == n.output[0] else mul.input[0]
    if other not in ctx.inits or ctx.inits[other].data_type not in FLOATS:
        return None, None
    data, scale = list(ctx.inits[n.input[0]].dims), list(ctx.inits[other].dims)
    if len(scale) > 2 or any(s not in (1, d) for s, d in zip(scale[::-1], data[::-1])):
        return None, None       # not a scale per row, per column or per tensor
    return mul, other


def _detect(n, inits) -> bool:
    if n.op_type != "Cast" or n.input[0] not in inits:
        return False
    t = inits[n.input[0]]
    return t.data_type in INTEGER and len(t.dims) == 2 and attrs(n).get("to") in FLOATS


def _size(n, inits):
    # the scale is read by the Mul; its name is what counting parameters leaves out
    return n.input[0], int(np.prod(inits[n.input[0]].dims)), ()


def _fold(n, ctx):
    mul, scale = _scale_of(n, ctx)
    if mul is None:
        return None
    f = Folded("cast", mul.output[0], (n, mul), None, n.input[0], scale, None)
    return f, ctx.inits[n.input[0]].dims, attrs(n)["to"], {n.name: [], mul.name: []}


def _float_weight(f, arrays):
    # as ONNX Runtime computes it: the integers cast exactly, then one product in the scale's type
    scale = arrays(f.scale)
    return arrays(f.data).astype(scale.dtype) * scale


def _cut(f, keep, arr):
    x, s = arr(f.data), arr(f.scale)
    out = {f.data: x}
    for ax, idx in keep.items():
        out[f.data] = np.take(out[f.data], idx, axis=ax)
        sax = ax - (x.ndim - s.ndim)        # the scale's axis, broadcast from the right
        if sax >= 0 and s.shape[sax] > 1:
            s = np.take(s, idx, axis=sax)
    out[f.scale] = s
    return {k: typed(np.ascontiguousarray(v), arr(k)) for k, v in out.items()}


FORM = Form("cast", "int8 by Cast and Mul", _detect, _size, _fold, _float_weight, _cut, by_readers=True)
