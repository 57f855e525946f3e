"""Multiply-accumulate counts: per attention block and for the whole model, at a given batch and length.

The count is over the nodes that do dense products: MatMul, Gemm, Conv, Einsum, their quantized forms
(``MatMulNBits``, ``MatMulInteger`` and what ONNX Runtime's optimizer fuses it into, ``QLinearMatMul``,
``QGemm``; a QDQ ``MatMul`` is a ``MatMul``), each counted as the float product it stands for, and the fused
attention ops (com.microsoft Attention and QAttention, MultiHeadAttention, GroupQueryAttention, ONNX
Attention), whose score and context products are counted as their unfused form would do them (the full
T x S score matrix, causal or not).
Everything else (norms, activations, softmax, gathers) is counted as zero: it is not where the time goes
at the sizes where pruning matters, and it is the usual convention.

Shapes come from onnx's shape inference with the inputs fixed to ``batch`` x ``seq`` (a KV cache's past
length is 0: the prompt step); where that leaves a size unknown, from one ONNX Runtime run on synthetic
inputs (``probe``), with the large weights stood in for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import helper

from .model.proto import consumers
from .probe import light_copy, probe
from .inputs import synth_inputs

# a product of A [..., M, K] and a weight [K, N]: MACs = the output's size x K (A's last axis)
_MATMULS = {"MatMul", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
            "QLinearMatMul"}
PRODUCT_OPS = _MATMULS | {"Gemm", "QGemm", "MatMulNBits", "Conv", "Einsum", "Attention", "QAttention",
                          "MultiHeadAttention", "GroupQueryAttention"}
_PASS_THROUGH = {"Transpose", "Cast", "Reshape", "Identity", "DequantizeLinear", "Unsqueeze", "Squeeze"}


@dataclass(frozen=True)
class MacCount:
    batch: int
    seq: int
    total: int
    blocks: dict[int, int]        # block index -> MACs of its projections and score/context products
    weight_bytes: int = 0         # the bytes of every initializer as stored (int4 packed): what each forward
    # pass, and so each decoded token, reads at least once

    def ideal_speedup(self, after: "MacCount") -> float:
        return self.total / max(after.total, 1)

    def bytes_per_token(self, kv_bytes_per_token: int, batch: int, context: int) -> int:
        """The bytes that one decode step reads per token it makes, at ``batch`` sequences with ``context``
        tokens cached each: the weights once for the batch, and each sequence's cache."""
        return self.weight_bytes // batch + kv_bytes_per_token * context


def human(n: int | None, sep: str = "") -> str:
    """1572864 -> '1.57M' (thousands as K, M, G)."""
    if n is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{sep}{unit}"
    return str(n)


def stored_bytes(model: onnx.ModelProto) -> int:
    """The bytes of ``model``'s initializers as stored, from their shapes and types alone (external data is
    not read); 4-bit types are packed two to a byte."""
    total = 0
    for t in model.graph.initializer:
        n = math.prod(t.dims)
        if t.data_type in _FOUR_BITS:
            total += (n + 1) // 2
        else:
            total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


_FOUR_BITS = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _fixed_inputs(model: onnx.ModelProto, batch: int, seq: int) -> tuple[onnx.ModelProto, dict]:
    """``model``'s light copy (no large weights) with every graph input's shape made concrete."""
    light, _ = light_copy(model)
    feeds = synth_inputs(model, batch=batch, seq=seq, past=0)
    for inp in light.graph.input:
        if inp.name in feeds:
            shape = feeds[inp.name].shape
            dims = inp.type.tensor_type.shape.dim
            for d, n in zip(dims, shape):
                d.Clear()
                d.dim_value = int(n)
    return light, feeds


def _shapes(model: onnx.ModelProto, batch: int, seq: int, external_dir=None) -> dict[str, tuple]:
    light, feeds = _fixed_inputs(model, batch, seq)
    shapes: dict[str, tuple] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True).graph
        for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
            tt = v.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shapes[v.name] = tuple(d.dim_value for d in tt.shape.dim)
    except Exception:       # contrib ops or odd graphs: the probe below answers instead
        pass
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for inp, arr in feeds.items():
        shapes[inp] = arr.shape
    unknown = [n for n in model.graph.node if n.op_type in PRODUCT_OPS and not _known(n, shapes)]
    if unknown:
        wanted = {name for n in unknown for name in list(n.input)[:3] + list(n.output)[:1] if name}
        probed, _ = probe(model, feeds, external_dir=external_dir, wanted=wanted)
        shapes.update(probed)
    return shapes


def _known(node, shapes) -> bool:
    return all(not name or name in shapes for name in list(node.input)[:3]) and \
        all(not name or name in shapes for name in list(node.output)[:1])


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple]) -> int:
    """MACs of one node (0 for nodes that do no dense product, or whose shapes are unknown)."""
    op = node.op_type
    if op not in PRODUCT_OPS or not _known(node, shapes):
        return 0
    ins = [shapes.get(i) if i else None for i in node.input]
    out = shapes[node.output[0]]
    a = _attrs(node)
    if op in _MATMULS:
        k = ins[0][-1] if not a.get("transA") else ins[0][-2] if len(ins[0]) > 1 else ins[0][0]
        return math.prod(out) * k
    if op == "MatMulNBits":             # B packed in blocks along K: the attribute says K
        return math.prod(out) * a["K"]
    if op in ("Gemm", "QGemm"):
        return math.prod(out) * (ins[0][0] if a.get("transA") else ins[0][1])
    if op == "Conv":
        w = ins[1]
        return math.prod(out) * math.prod(w[1:])
    if op == "Einsum":
        return _einsum_macs(a["equation"], ins)
    if op in ("Attention", "QAttention") and node.domain == "com.microsoft":
        return _ms_attention(node, ins, out, a, shapes)
    return _core_attention(node, ins, out, a, shapes)


def _einsum_macs(equation: str, ins) -> int:
    lhs = equation.replace(" ", "").split("->")[0]
    sizes = {}
    for term, shape in zip(lhs.split(","), ins):
        if shape is None or "..." in term or len(term) != len(shape):
            return 0
        sizes.update(zip(term, shape))
    return math.prod(sizes.values()) if len(lhs.split(",")) > 1 else 0


def _ms_attention(node, ins, out, a, shapes) -> int:
    """com.microsoft.Attention: the packed QKV projection, then the score and context products."""
    x, w = ins[0], ins[1]
    heads = a["num_heads"]
    sizes = a.get("qkv_hidden_sizes") or [w[1] // 3] * 3
    batch, seq = x[0], x[1]
    total = seq
    if len(node.output) > 1 and node.output[1] in shapes:       # present: [2, B, H, T, D]
        total = shapes[node.output[1]][3]
    proj = batch * seq * x[2] * w[1]
    return proj + batch * heads * seq * total * (sizes[0] + sizes[2]) // heads


def _core_attention(node, ins, out, a, shapes) -> int:
    """The score and context products of MultiHeadAttention, GroupQueryAttention and ONNX Attention."""
    q, k = ins[0], ins[1] if len(ins) > 1 else None
    if node.domain == "com.microsoft":
        heads = a["num_heads"]
        batch, seq = q[0], q[1]
        width = out[2]                    # H * Dv
        head_dim = width // heads
        if node.op_type == "GroupQueryAttention":
            present = shapes.get(node.output[1]) if len(node.output) > 1 else None
            total = present[2] if present else seq
        elif k is None:
            total = seq
        else:
            total = k[2] if len(k) == 4 else k[1]
        return batch * heads * seq * total * 2 * head_dim
    # ONNX Attention: 4-D [B, H, S, D] or 3-D [B, S, H * D] with q_num_heads
    v = ins[2]
    if len(q) == 4:
        batch, heads, seq, dq = q
        total, dv = k[2], v[-1]
    else:
        heads = a["q_num_heads"]
        batch, seq, dq = q[0], q[1], q[2] // heads
        total, dv = k[1], v[2] // a["kv_num_heads"]
    return batch * heads * seq * total * (dq + dv)


def block_nodes(model: onnx.ModelProto, blocks) -> dict[int, set[str]]:
    """Block index -> the names of the nodes whose products belong to it: its own nodes, and the products
    that read its projection weights (through a Transpose, Cast or dequantization on the way). In a
    quantized model, whose blocks were matched on its float view, a projection's weight is followed from
    the quantized data it stands for (``quant.weight_sources``)."""
    from .quant import weight_sources
    readers = consumers(model)
    sources = weight_sources(model)
    return {b.index: _block_nodes(b, readers, sources) | _broadcast_key_projection(model, b)
            for b in blocks}


def _broadcast_key_projection(model: onnx.ModelProto, block, depth: int = 16) -> set[str]:
    """The product that makes the one K head of a multi-query block whose K the block does not follow up to a
    projection (its norm and rotary embedding lie above the broadcast, where the cut gathers it): the nearest
    MatMul or Gemm (or quantized MatMul) above the broadcast with a constant weight as wide as the K head
    (``[E, D]``)."""
    if block.projection("k") is not None or not block.cut_points:
        return set()
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    sizes = {i.name: list(i.dims) for i in model.graph.initializer}
    width = block.head_dim * block.num_kv_heads
    for name, i, _ in block.cut_points:
        frontier, seen = [nodes[name].input[i]] if name in nodes else [], set()
        for _ in range(depth):
            nxt = []
            for t in frontier:
                p = producers.get(t)
                if p is None or p.name in seen:
                    continue
                seen.add(p.name)
                w = sizes.get(p.input[1]) if p.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(p.input) > 1 \
                    else [_attrs(p)["K"], _attrs(p)["N"]] if p.op_type == "MatMulNBits" else None
                if w is not None and len(w) == 2 and width in (w[1], w[0] if p.op_type == "Gemm" else -1):
                    return {p.name}
                nxt += [x for x in p.input if x and x not in sizes]
            frontier = nxt
    return set()


def _block_nodes(block, readers, sources: dict) -> set[str]:
    names = set(block.nodes)
    for p in block.projections:
        frontier, seen = [sources.get(p.weight, p.weight)], set()
        while frontier:
            t = frontier.pop()
            for n in readers.get(t, []):
                if n.name in seen:
                    continue
                seen.add(n.name)
                if n.op_type in PRODUCT_OPS:
                    names.add(n.name)
                elif n.op_type in _PASS_THROUGH:
                    frontier.extend(n.output)
    return names


def count_macs(model: onnx.ModelProto, blocks, batch: int = 1, seq: int = 128, external_dir=None,
               block_node_names: dict[int, set[str]] | None = None) -> MacCount:
    """MACs of ``model`` at ``batch`` x ``seq``, in total and per block of ``blocks``.

    ``block_node_names`` (block index -> node names, from ``block_nodes`` on the original) lets a pruned
    model, whose node names the rewrite keeps, be counted per block without matching it again.
    """
    from .inputs import fixed_sizes
    fixed_batch, fixed_seq = fixed_sizes(model)       # a model with fixed sizes runs at those only
    batch, seq = fixed_batch or batch, fixed_seq or seq
    shapes = _shapes(model, batch, seq, external_dir)
    per_node = {}
    for i, n in enumerate(model.graph.node):
        per_node[n.name or f"#{i}"] = node_macs(n, shapes)
    names = block_node_names or block_nodes(model, blocks)
    return MacCount(batch, seq, sum(per_node.values()),
                    {b: sum(per_node.get(n, 0) for n in nodes) for b, nodes in names.items()}, stored_bytes(model))
