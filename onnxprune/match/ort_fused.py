"""ONNX Runtime's fused attention ops (``com.microsoft``), as its transformer optimizer writes them.

* ``Attention``: X [B, S, hidden] times one packed weight [hidden, Fq + Fk + Fv] (Q, K and V sections side
  by side, each H runs of D columns) plus a packed bias; ``num_heads`` and, when the sections differ,
  ``qkv_hidden_sizes`` are rewritten.
* ``GroupQueryAttention`` (ORT GenAI's model builder): a packed QKV [B, S, (H + 2 Hkv) * D] or separate
  Q/K/V, a KV cache in and out ([B, Hkv, T, D] graph inputs ``past_key_values.*`` and outputs
  ``present.*``, whose head dimension changes), RoPE caches (no heads); ``num_heads`` and ``kv_num_heads``
  are rewritten.
* ``MultiHeadAttention``: Q/K/V already projected, [B, S, H*D] each (K/V may also come as [B, H, L, D], or
  Q as a packed [B, S, H, 3, D]); an optional packed bias [Fq + Fk + Fv]; ``num_heads`` is rewritten.

Both take an optional attention bias [B or 1, H, S, T], which carries heads too. The output [B, S, H*Dv]
flows on to the output projection like any other block.
"""

from __future__ import annotations

import numpy as np

from .headflow import Flow
from .headmap import FlowFail, HeadMap
from ..model.graph import is_const

FAMILY = "ort-fused"
OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


def cores(graph):
    return [n for n in graph.nodes if n.domain == "com.microsoft" and n.op in OPS]


def start(flow: Flow, node) -> int:
    num_heads = node.attrs.get("num_heads")
    if not num_heads or num_heads < 1:
        raise FlowFail(node, f"{node.op} without a positive num_heads attribute")
    if node.op == "GroupQueryAttention":
        return _gqa(flow, node, num_heads)
    if node.op == "Attention" and (_given(node, 4) or any(o.name and o.outputs for o in node.outputs[1:])):
        raise FlowFail(node, "Attention with a past/present state (KV cache) is not supported yet")
    units = np.array([flow.unit({h}) for h in range(num_heads)])
    flow.begin(node)
    sizes = _attention(flow, node, units) if node.op == "Attention" else _mha(flow, node, units)
    if node.op == "MultiHeadAttention":         # KV cache: past_key/past_value in, present_key/value out
        caches = [(node.inputs[i], "up", role) for i, role in ((6, "k"), (7, "v")) if _given(node, i)]
        caches += [(o, "down", role) for o, role in zip(node.outputs[1:3], "kv") if o is not None and o.name]
        for t, direction, role in caches:
            _cache(flow, node, t, direction, role, units)
    bias = node.inputs[2] if node.op == "Attention" else (node.inputs[3] if len(node.inputs) > 3 else None)
    if bias is not None and bias.name:
        if flow.shape(bias) != (sum(sizes),):
            raise FlowFail(node, f"{node.op} bias {bias.name!r} has shape {list(flow.shape(bias))}, "
                                 f"expected [{sum(sizes)}]")
        flow.assign(bias, HeadMap((0,), _packed(units, sizes)), "up", node, {"q", "k", "v"})
    attn_bias = node.inputs[5] if len(node.inputs) > 5 else None
    if attn_bias is not None and attn_bias.name:
        shape = flow.shape(attn_bias)
        if len(shape) != 4:
            raise FlowFail(node, f"{node.op} attention bias is {len(shape)}-D; expected [B, H, S, T]")
        flow.side_input(node, attn_bias, HeadMap((1,), units), (shape[0], num_heads) + tuple(shape[2:]), "s")
    y = node.outputs[0]
    flow.assign(y, HeadMap((2,), np.repeat(units, sizes[2] // num_heads)), "down", node, "o")
    flow.sites.append(("attr", node))
    return num_heads


def _given(node, i) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None and bool(node.inputs[i].name)


def _cache(flow: Flow, node, t, direction: str, role: str, units):
    """A K or V cache [B, Hkv, T, D]. A graph input or output (``past_*`` / ``present_*``) is re-declared
    with the kept heads, and verification feeds and compares it on those heads."""
    shape = flow.shape(t)
    if len(shape) != 4 or shape[1] != len(units):
        raise FlowFail(node, f"KV cache {t.name!r} {list(shape)} is not [B, {len(units)}, T, head_size]")
    if not t.inputs if direction == "up" else any(o is t for o in flow.graph.outputs):
        flow.io.add(t.name)
    flow.assign(t, HeadMap((1,), units), direction, node, role)


def _packed(units, sizes) -> np.ndarray:
    h = len(units)
    return np.concatenate([np.repeat(units, s // h) for s in sizes])


def _attention(flow: Flow, node, units) -> list[int]:
    h = len(units)
    w = node.inputs[1]
    if not is_const(w):
        raise FlowFail(node, "Attention weight is computed at run time")
    shape = flow.shape(w)
    if len(shape) != 2:
        raise FlowFail(node, f"Attention weight {w.name!r} is {len(shape)}-D; expected [hidden, 3 * hidden]")
    sizes = list(node.attrs.get("qkv_hidden_sizes") or [shape[1] // 3] * 3)
    if len(sizes) != 3 or sum(sizes) != shape[1] or any(s % h for s in sizes):
        raise FlowFail(node, f"Attention weight {w.name!r} of shape {list(shape)} does not split into Q/K/V "
                             f"sections of {h} heads each")
    flow.assign(w, HeadMap((1,), _packed(units, sizes)), "up", node, {"q", "k", "v"})
    flow.weight_inputs.add((id(node), 1))
    return sizes


def _mha(flow: Flow, node, units) -> list[int]:
    h = len(units)
    q = node.inputs[0]
    qs = flow.shape(q)
    if len(qs) == 5:            # packed [B, S, H, 3, D]
        if qs[2] != h or qs[3] != 3:
            raise FlowFail(node, f"packed QKV {list(qs)} is not [B, S, {h}, 3, D]")
        flow.assign(q, HeadMap((2,), units), "up", node, {"q", "k", "v"})
        return [h * qs[4]] * 3
    if len(qs) != 3 or qs[2] % h:
        raise FlowFail(node, f"MultiHeadAttention query {list(qs)} is not [B, S, {h} * D]")
    flow.assign(q, HeadMap((2,), np.repeat(units, qs[2] // h)), "up", node, "q")
    sizes = [qs[2]]
    k, v = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    ks = flow.shape(k)
    if len(ks) == 5:            # packed KV [B, L, H, 2, D]
        flow.assign(k, HeadMap((2,), units), "up", node, {"k", "v"})
        return sizes + [h * ks[4]] * 2
    for t, role in ((k, "k"), (v, "v")):
        if t is None or not t.name:
            raise FlowFail(node, "MultiHeadAttention without separate key and value")
        s = flow.shape(t)
        if len(s) == 3 and s[2] % h == 0:
            flow.assign(t, HeadMap((2,), np.repeat(units, s[2] // h)), "up", node, role)
            sizes.append(s[2])
        elif len(s) == 4 and s[1] == h:         # [B, H, L, D]: a cross-attention cache, often a graph input
            _cache(flow, node, t, "up", role, units)
            sizes.append(h * s[3])
        else:
            raise FlowFail(node, f"MultiHeadAttention {role} {list(s)} is neither [B, L, {h} * D] nor "
                                 f"[B, {h}, L, D]")
    return sizes


def _gqa(flow: Flow, node, num_heads: int) -> int:
    num_kv = node.attrs.get("kv_num_heads")
    if not num_kv or num_kv < 1 or num_heads % num_kv:
        raise FlowFail(node, f"GroupQueryAttention: {num_heads} query heads do not split into "
                             f"kv_num_heads={num_kv} groups")
    group = num_heads // num_kv
    q_units = np.array([flow.unit({h}) for h in range(num_heads)])
    kv_units = np.array([flow.unit(range(g * group, (g + 1) * group)) for g in range(num_kv)])
    # the KV groups as the op says (one KV head, Gemma 3 270M's, leaves K and V with no head axis to show it)
    flow.broadcast_kv.update(int(u) for u in kv_units)
    flow.begin(node)
    q = node.inputs[0]
    width = flow.shape(q)[-1]
    if not _given(node, 1):                     # packed QKV
        if width % (num_heads + 2 * num_kv):
            raise FlowFail(node, f"packed QKV width {width} is not (num_heads + 2 * kv_num_heads) * head_size")
        d = width // (num_heads + 2 * num_kv)
        owner = np.concatenate([np.repeat(q_units, d), np.repeat(kv_units, d), np.repeat(kv_units, d)])
        flow.assign(q, HeadMap((2,), owner), "up", node, {"q", "k", "v"})
    else:
        if width % num_heads:
            raise FlowFail(node, f"query width {width} is not num_heads * head_size")
        d = width // num_heads
        flow.assign(q, HeadMap((2,), np.repeat(q_units, d)), "up", node, "q")
        for i, role in ((1, "k"), (2, "v")):
            t = node.inputs[i]
            if flow.shape(t)[-1] != num_kv * d:
                raise FlowFail(node, f"{role} width {flow.shape(t)[-1]} is not kv_num_heads * head_size")
            flow.assign(t, HeadMap((2,), np.repeat(kv_units, d)), "up", node, role)
    caches = [(node.inputs[i], "up", role) for i, role in ((3, "k"), (4, "v")) if _given(node, i)]
    caches += [(o, "down", role) for o, role in zip(node.outputs[1:3], "kv") if o is not None and o.name]
    for t, direction, role in caches:
        _cache(flow, node, t, direction, role, kv_units)
    if _given(node, 10):                        # attention_bias [B or 1, H, S, T]
        shape = flow.shape(node.inputs[10])
        flow.side_input(node, node.inputs[10], HeadMap((1,), q_units), (shape[0], num_heads) + tuple(shape[2:]),
                         "s")
    if _given(node, 11):                        # head_sink [H]
        flow.assign(node.inputs[11], HeadMap((0,), q_units), "up", node, "s")
    flow.assign(node.outputs[0], HeadMap((2,), np.repeat(q_units, d)), "down", node, "o")
    flow.sites.append(("attr", node))
    return num_heads


def head_attrs(node, block, kept_heads, width) -> dict | None:
    """``num_heads`` (and ``kv_num_heads``, ``qkv_hidden_sizes``) of ORT's fused ops after pruning."""
    if node.domain != "com.microsoft":
        return None
    if node.op == "GroupQueryAttention":
        return {"num_heads": len(kept_heads), "kv_num_heads": len(block.kept_kv_heads(kept_heads))}
    if node.op in ("Attention", "MultiHeadAttention"):
        old = node.attrs["num_heads"]
        new = {"num_heads": len(kept_heads)}
        if node.attrs.get("qkv_hidden_sizes"):
            new["qkv_hidden_sizes"] = [s // old * len(kept_heads) for s in node.attrs["qkv_hidden_sizes"]]
        return new
    return None
