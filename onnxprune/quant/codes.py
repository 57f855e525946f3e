"""The arithmetic of quantized data that every form shares: packing 4-bit codes, dequantizing, cutting
along axes, and re-packing kept rows into smaller blocks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper


# ------------------------------------------------------------------ dequantization
def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[..., bytes] of ``bits``-bit values (low bits first) -> [..., count] uint8."""
    if bits == 8:
        return packed[..., :count]
    per = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def pack(values: np.ndarray, bits: int) -> np.ndarray:
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
class NBits:
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


def nbits(node: onnx.NodeProto, arrays) -> NBits:
    a = attrs(node)
    k, n, bits, block = a["K"], a["N"], a.get("bits", 4), a["block_size"]
    nb = -(-k // block)
    b = arrays(node.input[1])
    q = unpack(b.reshape(n, nb, -1), bits, block).reshape(n, nb * block)
    scales = arrays(node.input[2]).reshape(n, nb)
    zp = node.input[3] if len(node.input) > 3 else ""
    if zp:           # packed uint8 (float zero points are refused by ``view``)
        zeros = unpack(arrays(zp).reshape(n, -1), bits, nb)
    else:
        zeros = np.full((n, nb), 1 << (bits - 1), np.uint8)
    return NBits(q, scales, zeros, k, n, bits, block)


def dq_value(x, scale, zero, axis: int, block: int) -> np.ndarray:
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


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def sub_block(rows: np.ndarray, block: int) -> int | None:
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


def take(a: np.ndarray, keep: dict) -> np.ndarray:
    for ax, idx in keep.items():
        a = np.take(a, idx, axis=ax)
    return np.ascontiguousarray(a)


def typed(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    return value.astype(like.dtype, copy=False)


# ------------------------------------------------------------------ ONNX Runtime's fused int8 matmuls
def fused_matmul_view(node, x: str, weight: str, bias: str | None) -> list:
    """The view nodes that stand for an ORT-fused int8 matmul ``node``: MatMul(``x``, ``weight``) under the node's
    name, and the Add of ``bias`` where it has one."""
    out = node.output[0]
    nodes = [helper.make_node("MatMul", [x, weight], [f"{out}.onnxprune_nobias" if bias else out], name=node.name)]
    if bias:
        nodes.append(helper.make_node("Add", [nodes[0].output[0], bias], [out], name=f"{node.name}.bias"))
    return nodes


def column_weight(f, arrays) -> np.ndarray:
    """The float weight [K, N] of int8 data with a scale and zero point per column or per tensor."""
    return dq_value(arrays(f.data), arrays(f.scale), arrays(f.zero) if f.zero else None, -1, 0)


def cut_columns(f, keep: dict, arr, vectors=None) -> dict:
    """A weight quantized per column or per tensor: the data cut as the float weight [K, N] is, and each of
    ``vectors`` (by default its scale, zero point and the bias in ``f.extra``) that holds one value per column,
    along the columns."""
    out = {f.data: take(arr(f.data), keep)}
    for name in (f.scale, f.zero, *f.extra) if vectors is None else vectors:
        if name and 1 in keep and arr(name).size > 1:
            out[name] = arr(name)[keep[1]]
    return out
