"""Pruning must equal masking: the original model with the dropped heads' output-projection rows zeroed
gives the same outputs as the pruned model (ONNX Runtime CPU, graph optimizations off)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from .block import AttentionBlock
from . import quant
from .calibration.sites import projection_output
from .cut import WRITTEN, HeadwiseMap, packed_runs, project_heads, written, zero_dropped
from .errors import PlanError, VerifyError
from .plan import BlockPlan
from .model.proto import own_constant, own_weights
from .model.external import read_external
from .runtime import session
from .segments import run_segmented


def _masked_o(block: AttentionBlock, kept: dict[int, tuple], proto: onnx.TensorProto, external_dir=None
              ) -> np.ndarray | None:
    """``block``'s output-projection weight (``proto``) with the rows of its dropped heads zeroed; None when
    the block keeps every head."""
    keep = set(kept.get(block.index, range(block.num_heads)))
    dropped = {u for u, heads in enumerate(block.units) if len(heads) == 1 and not heads & keep}
    if not dropped:
        return None
    o = block.o_proj
    arr = read_external(proto, external_dir) if uses_external_data(proto) else numpy_helper.to_array(proto)
    arr = np.array(arr, copy=True)
    index = [slice(None)] * arr.ndim
    index[o.head_axis] = np.flatnonzero(np.isin(block.tensor(o.weight).owner, list(dropped)))
    arr[tuple(index)] = 0
    return arr


def _masked_apart(blocks, kept) -> list[AttentionBlock]:
    """Blocks after the first that read one output-projection weight with another block but mask other
    heads of it (ALBERT's shared layer, pruned with different heads per block): each needs its own copy."""
    seen: dict[str, frozenset] = {}
    apart = []
    for b in blocks:
        keep = frozenset(kept.get(b.index, range(b.num_heads)))
        if b.o_proj.weight in seen and seen[b.o_proj.weight] != keep:
            apart.append(b)
        seen.setdefault(b.o_proj.weight, keep)
    return apart


def masked_weights(model: onnx.ModelProto, blocks: list[AttentionBlock], kept: dict[int, tuple],
                   external_dir=None) -> dict[str, np.ndarray] | None:
    """The masked output-projection weights alone, {initializer name: array}, for ``session(overrides=...)``:
    the original model is then run as it is, with no copy of it. None when a weight is not an initializer
    of its own (shared through Identity): use ``masked_model`` then."""
    inits = {i.name: i for i in model.graph.initializer}
    if _masked_apart(blocks, kept):
        return None
    out = {}
    for block in blocks:
        proto = inits.get(block.o_proj.weight)
        if proto is None:
            return None
        arr = _masked_o(block, kept, proto, external_dir)
        if arr is not None:
            out[block.o_proj.weight] = arr
    return out


def masked_model(model: onnx.ModelProto, blocks: list[AttentionBlock], kept: dict[int, tuple],
                 external_dir=None) -> onnx.ModelProto:
    """A copy of ``model`` with the rows of W_o that belong to dropped heads set to zero. The masked
    weights are stored in the copy; other external data stays where it is (``external_dir``)."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    own_weights(masked, [b.o_proj.weight for b in blocks])
    names = {b.index: b.o_proj.weight for b in blocks}
    for block in _masked_apart(blocks, kept):    # one weight, several blocks, different heads masked:
        own = f"{block.o_proj.weight}.onnxprune_block{block.index}"      # this block reads a copy of its own
        copy = masked.graph.initializer.add()
        copy.CopyFrom(own_constant(masked, block.o_proj.weight))
        copy.name = own
        inside = set(block.nodes)
        for node in masked.graph.node:
            if node.name in inside:
                node.input[:] = [own if i == block.o_proj.weight else i for i in node.input]
        names[block.index] = own
    for block in blocks:
        proto = own_constant(masked, names[block.index])
        arr = _masked_o(block, kept, proto, external_dir)
        if arr is not None:
            proto.CopyFrom(numpy_helper.from_array(arr, proto.name))   # inline now, even if it was external
    return masked


def masked_reference(model: onnx.ModelProto, blocks: list[AttentionBlock], kept: dict[int, tuple],
                     external_dir=None) -> onnx.ModelProto:
    """What a model pruned to ``kept`` must equal, for a model as given (float or quantized)."""
    view, qv = quant.float_view(model, external_dir)
    return reference(view, blocks, {i: BlockPlan(tuple(k)) for i, k in kept.items()}, qv, external_dir)


def reference(model: onnx.ModelProto, blocks, plans: dict, qv=None, external_dir=None) -> onnx.ModelProto:
    """The one place that chooses what a pruned model must equal. ``plans``: block index -> ``plan.BlockPlan``.
    A float model: ``masked_model``, or with maps inside the heads ``projected_model``. A quantized one
    (``qv``, its ``quant.QuantView``; ``model`` its float view): the model with the dropped heads' part of each
    output projection's input zeroed (``quant.masked``)."""
    kept = {i: p.kept_heads for i, p in plans.items()}
    if any(p.dims for p in plans.values()):
        if qv is not None:
            zeroed, ov = zeroed_queries(model, blocks, plans, qv)
            return quant.masked(qv, model, blocks, kept, zeroed, ov)
        return projected_model(model, list(blocks), plans, external_dir)
    if qv is not None:
        return quant.masked(qv, model, blocks, kept)
    return masked_model(model, list(blocks), kept, external_dir)


def zeroed_queries(model, blocks, plans: dict, qv) -> tuple[dict, dict]:
    """What the reference of a cut that keeps positions zeroes on a quantized model, whose weights stay
    quantized as they are: ({a Q (or K) projection's output: 0/1 over its positions}, {block: the V positions
    that every head keeps}). QK through a rotary embedding zeroes the queries' dropped positions; through RMS q/k
    norms the keys' too (the norms must see the zeros); OV zeroes the dropped positions of each head's context
    where the output projection reads it (``quant.masked``). Any other map would need the weights
    re-quantized: refused."""
    out, ov = {}, {}
    for block in blocks:
        plan = plans.get(block.index)
        for dims in plan.dims if plan is not None else ():
            keep = dims.keep
            if keep is not None and dims.circuit == "ov":
                ov[block.index] = keep
                continue
            roles = ("q", "k") if block.norm_means and not block.qk_below("k") else ("q",)
            names = [projection_output(model, block, r) if dims.circuit == "qk" and not block.cut_points else None
                     for r in roles]
            if keep is None or None in names:
                raise PlanError(f"a cut inside the heads would re-quantize this {qv.describe()} model's weights; "
                                "cut the float model, then quantize it")
            for role, name in zip(roles, names):
                t = block.tensor(name)
                mask = out.setdefault(name, np.ones(np.size(t.owner), np.float32))
                for unit, pos, r in packed_runs(block, t):
                    if unit >= 0 and r in (role, None):
                        zero_dropped(mask, pos, keep)
    return out, ov


def projected_model(model: onnx.ModelProto, blocks: list[AttentionBlock], plans: dict, external_dir=None
                    ) -> onnx.ModelProto:
    """The reference of a cut inside the heads: ``masked_model``, with the circuit's map written into the
    second side's projection (``cut.WRITTEN``): each kept head's positions of it become ``A_g B_hᵀ`` times
    them (``cut.reference_rows``; ``A_g`` of its KV head, ``B_h`` its own). For ``ov`` those are the output
    projection's rows (``W_o,h <- A Bᵀ W_o,h``), for ``qk`` Q's columns and bias (``W_q,h <- W_q,h B Aᵀ``):
    the same maps that the rewriter applies, written into the original's weights."""
    masked = masked_model(model, blocks, {i: p.kept_heads for i, p in plans.items()}, external_dir)
    for block in blocks:
        plan = plans.get(block.index)
        if plan is None or not plan.dims:
            continue
        for dims in plan.dims:
            if dims.circuit not in WRITTEN:
                raise PlanError(f"block {block.index} ({block.name}): no reference for circuit {dims.circuit!r}")
            if dims.circuit == "qk" and query_cut_points(masked, block):
                mask_queries(masked, block, dims.keep)       # below a q/k norm: the queries zeroed there
                continue
            for t in written(block, dims.circuit):
                proto = own_constant(masked, t.name)
                arr = project_heads(numpy_helper.to_array(proto, base_dir=str(external_dir or "")), block, t,
                                    plan.kept_heads, dims)
                proto.CopyFrom(numpy_helper.from_array(arr, proto.name))
    return masked


def query_cut_points(model: onnx.ModelProto, block) -> list[tuple]:
    """The block's cut points below a q/k norm (``block.cut_points``) on the queries' side: (node, input, axes
    after the head size)."""
    nodes = {n.name: n for n in model.graph.node}
    roles = {t.name: t.roles for t in block.tensors}
    return [(nodes[n], i, after) for n, i, after in block.cut_points
            if n in nodes and "q" in roles.get(nodes[n].output[0], ())]


def mask_queries(model: onnx.ModelProto, block, keep) -> None:
    """The reference of a QK cut below a q/k norm: the queries that the cut point reads multiplied by 0/1 over
    the head size (1 where ``keep`` keeps), the norm above it as it was."""
    from onnx import helper
    q = block.projection("q")          # the queries' type: their projection's
    dtype = onnx.helper.tensor_dtype_to_np_dtype(next(
        (i.data_type for i in model.graph.initializer if q is not None and i.name == q.weight and i.data_type in FLOATS),
        onnx.TensorProto.FLOAT))
    for node, i, trailing in query_cut_points(model, block):
        x = node.input[i]
        t = block.tensor(x)
        pos = np.asarray(t.dim_pos).reshape(-1) if t.dim_pos is not None else np.arange(block.head_dim)
        mask = np.isin(pos, keep).astype(dtype)
        name = f"{x}.onnxprune_kept{block.index}"
        model.graph.initializer.append(numpy_helper.from_array(mask.reshape((-1,) + (1,) * trailing), f"{name}.value"))
        at = list(model.graph.node).index(node)
        model.graph.node.insert(at, helper.make_node("Mul", [x, f"{name}.value"], [name], name=name))
        node.input[i] = name


FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def run(model: onnx.ModelProto, feeds: dict, external_dir=None, overrides=None,
        segment_bytes: int | None = None, providers=None) -> dict[str, np.ndarray]:
    """The outputs of ``model`` on ``feeds``, run whole, or in segments of at most ``segment_bytes`` of weights
    (``segments.run_segmented``), on ``providers`` (CPU by default)."""
    if segment_bytes:
        return run_segmented(model, feeds, external_dir, overrides, segment_bytes, providers=providers)
    sess = session(model, external_dir=external_dir, overrides=overrides, providers=providers)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def max_abs_diff(reference: dict, candidate: dict, scaled: bool = False) -> float:
    """The largest absolute difference over all outputs: ``inf`` when shapes differ or one side is
    infinite where the other is not, ``nan`` when either side holds a NaN. Equal infinities agree. Anything
    but a finite number fails every tolerance (``not error <= atol``). ``scaled``: each output's difference
    divided by its largest magnitude where that is above 1 (a cut inside the heads multiplies in another
    order, and fp32 rounds that relative to the values: an LLM's logits of 30 differ by 2e-4)."""
    worst = 0.0
    for name, ref in reference.items():
        got = candidate[name]
        if ref.shape != got.shape:
            return float("inf")
        if not ref.size or ref.dtype.kind not in "biuf":
            continue
        r, g = ref.astype(np.float64), got.astype(np.float64)
        if np.isnan(r).any() or np.isnan(g).any():
            return float("nan")
        with np.errstate(invalid="ignore"):          # inf - inf where both agree: replaced by 0
            diff = np.abs(np.where(r == g, 0.0, r - g))
        if scaled:
            finite = np.abs(r[np.isfinite(r)])
            diff = diff / max(1.0, float(finite.max()) if finite.size else 1.0)
        worst = max(worst, float(diff.max()))
    return worst


def worst_of(errors) -> float:
    """The largest of ``errors``, where a NaN is the largest (the builtin ``max`` would drop it)."""
    worst = 0.0
    for e in errors:
        if math.isnan(e):
            return e
        worst = max(worst, e)
    return worst


def kept_heads_only(arrays: dict, io_keep: dict) -> dict:
    """Inputs or outputs of the original model cut to the kept heads where the pruned model has fewer
    (a KV cache): what the pruned model takes, or should give."""
    out = {}
    for name, arr in arrays.items():
        for ax, idx in io_keep.get(name, {}).items():       # the kept heads first, then a map of their sizes
            arr = idx.apply(arr, ax) if isinstance(idx, HeadwiseMap) else np.take(arr, idx, axis=ax)
        out[name] = arr
    return out


def compare(masked: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict, io_keep: dict,
            external_dir=None, pruned_dir=None, masked_overrides=None, scaled: bool = False,
            segment_bytes: int | None = None, providers=None) -> float:
    """Largest difference between the masked original and the pruned model. Inputs and outputs whose head
    dimension shrank (a KV cache) are compared on the kept heads: the pruned model gets those heads of the
    inputs, and its outputs are set against those heads of the reference's. ``external_dir`` and
    ``pruned_dir``: where the two models' external data files are. ``masked_overrides``: masked weights
    that replace the named initializers of ``masked`` (see ``masked_weights``); ``scaled``: see
    ``max_abs_diff``; ``segment_bytes``: both models run in segments (``run``); ``providers``: where."""
    reference = run(masked, feeds, external_dir, masked_overrides, segment_bytes, providers)
    try:
        candidate = run(pruned, kept_heads_only(feeds, io_keep), pruned_dir or external_dir, None, segment_bytes,
                        providers)
    except Exception as exc:   # onnxruntime raises its own types; report one line, write nothing
        raise VerifyError(f"the pruned model does not run on onnxruntime: {str(exc).splitlines()[0][:240]}") \
            from None
    return difference(reference, candidate, feeds, io_keep, scaled)


def difference(reference: dict, candidate: dict, feeds: dict, io_keep: dict, scaled: bool = False) -> float:
    """``max_abs_diff`` of the masked original's outputs (``reference``) and the pruned model's (``candidate``) on
    ``feeds``: the reference's KV cache taken on the kept heads (``io_keep``), each cache cut to its filled
    entries first (the maps of a cut inside the heads would else mix garbage)."""
    reference = kept_heads_only(filled_cache(reference, feeds), io_keep)
    return max_abs_diff(filled_cache(reference, feeds), filled_cache(candidate, feeds), scaled)


def filled_cache(outputs: dict, feeds: dict) -> dict:
    """Outputs with each ``present`` KV cache [B, H, T, D] cut to the entries the mask says are filled: a
    sliding-window cache (ORT GenAI's Gemma 3) is a buffer of a fixed size whose other entries are never
    written, so they hold whatever memory held."""
    mask = feeds.get("attention_mask")
    if mask is None or np.ndim(mask) != 2:
        return outputs
    total = np.shape(mask)[1]
    return {k: (v[:, :, :total] if "present" in k and v.ndim == 4 and v.shape[2] > total else v)
            for k, v in outputs.items()}
