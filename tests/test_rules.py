"""Each op rule of the head flow (``onnxprune/match/rules.py``) on a small hand-built graph: the head map it
gives across its node, the rewrite site it records, and a case it refuses with its reason. Then the shape
expressions (``match/shape_expr.py``) that locate and rebuild the head count inside shape vectors.

Shapes use H = 4 heads of D = 8 (F = 32), batch 2, length 5."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.match import rules, shape_expr
from onnxprune.match.headflow import Flow
from onnxprune.match.headmap import FlowFail, HeadMap

H, D, F = 4, 8, 32
HEADS = np.arange(H)                     # owner over a [.., H, ..] axis: unit h is head h
MERGED = np.repeat(np.arange(H), D)      # owner over a [.., F, ..] axis


def make_flow(nodes, inputs: dict, inits: dict | None = None, shapes: dict | None = None, opset: int = 18):
    """A Flow over the graph of ``nodes``: ``inputs`` {name: shape} (float), ``inits`` {name: array};
    every tensor's shape from ONNX shape inference, or ``shapes``. Units 0..H-1 are the heads."""
    inits = inits or {}
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()]
    produced = {o for n in nodes for o in n.output}
    consumed = {i for n in nodes for i in n.input}
    outs = [helper.make_empty_tensor_value_info(o) for o in produced - consumed]
    g = helper.make_graph(nodes, "g", vi, outs, [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                                helper.make_opsetid("com.microsoft", 1)])
    inferred = onnx.shape_inference.infer_shapes(model)
    known = dict(shapes or {})
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if v.name not in known and v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            known[v.name] = tuple(d.dim_value for d in dims)
    for k, v in inits.items():
        known[k] = tuple(np.shape(v))
    graph = gs.import_onnx(model)
    flow = Flow(graph, known, {}, rules.RULES)
    for h in range(H):
        flow.unit({h})
    return flow, graph.tensors()


def follow(flow, tensors, name, owner, axes, direction, role=None):
    flow.assign(tensors[name], HeadMap(axes, np.asarray(owner)), direction, None, role)
    flow.run()
    return flow


def owner_of(flow, name):
    hm = flow.maps[name]
    return hm.axes, hm.owner.tolist()


def node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, name=f"{op}_node", **attrs)


def site_kinds(flow):
    return [kind for kind, _ in flow.sites]


# ------------------------------------------------------------------ one test per rule
def test_every_op_with_a_rule_is_covered_here():
    covered = {"Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze", "Expand", "Split", "Slice", "Gather",
               "Concat", "MatMul", "Gemm", "RotaryEmbedding", "Attention", "Resize", "GatherElements", "Tile",
               "QuantizeLinear", "DequantizeLinear", "ConstantOfShape", "FusedMatMul"}
    assert set(rules.RULES) - set(rules.ELEMENTWISE) - set(rules.NORMS) - set(rules.REDUCTIONS) == covered
    assert rules.rule_for("Conv") is None


def test_a_qdq_pair_of_one_scale_passes_heads_and_per_axis_scales_are_refused():
    """QDQ models quantize every activation per tensor: Q and DQ then move heads like any elementwise op.
    A per-axis scale along the head axis would have to be cut with it: refused, with the reason."""
    scalar = {"s": np.float32(0.1), "z": np.uint8(128)}
    nodes = [node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"],
                                                                             ["y"], name="dq")]
    flow, t = make_flow(nodes, {"x": (2, 5, F)}, scalar)
    follow(flow, t, "x", MERGED, (2,), "down")
    assert owner_of(flow, "q") == ((2,), MERGED.tolist()) and owner_of(flow, "y") == ((2,), MERGED.tolist())
    assert "s" not in flow.maps and "z" not in flow.maps
    flow, t = make_flow(nodes, {"x": (2, 5, F)}, scalar)
    follow(flow, t, "y", MERGED, (2,), "up")
    assert owner_of(flow, "x") == ((2,), MERGED.tolist())
    per_axis = {"s": np.full(F, 0.1, np.float32), "z": np.full(F, 128, np.uint8)}
    flow, t = make_flow([node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=2)], {"x": (2, 5, F)}, per_axis)
    with pytest.raises(FlowFail, match="per-axis scales"):
        follow(flow, t, "x", MERGED, (2,), "down")


def test_elementwise_passes_heads_and_broadcasts_a_side_input():
    flow, t = make_flow([node("Add", ["x", "b"], ["y"])], {"x": (2, H, 5, 5), "b": (1, H, 1, 5)})
    follow(flow, t, "x", HEADS, (1,), "down")
    assert owner_of(flow, "y") == ((1,), HEADS.tolist())
    assert owner_of(flow, "b") == ((1,), HEADS.tolist())       # a per-head bias: it carries heads too


def test_elementwise_refuses_a_softmax_over_the_head_axis():
    flow, t = make_flow([node("Softmax", ["x"], ["y"], axis=1)], {"x": (2, H, 5, 5)})
    with pytest.raises(FlowFail, match="normalises over the head axis"):
        follow(flow, t, "x", HEADS, (1,), "down")


def test_norm_over_the_head_size_passes_and_over_heads_is_refused():
    ln = node("LayerNormalization", ["x", "s"], ["y"], axis=-1)
    flow, t = make_flow([ln], {"x": (2, H, 5, D)}, {"s": np.ones(D, np.float32)})
    follow(flow, t, "x", HEADS, (1,), "down")
    assert owner_of(flow, "y") == ((1,), HEADS.tolist())
    flow, t = make_flow([ln], {"x": (2, 5, F)}, {"s": np.ones(F, np.float32)})
    with pytest.raises(FlowFail, match="normalises over the head axis"):
        follow(flow, t, "x", MERGED, (2,), "down")


def test_a_layer_norm_per_head_part_passes_and_keeps_its_head():
    """StableLM: Split q [B, H, S, D] into H parts, one LayerNorm each, Concat. A part is one head's only, so
    its norm mixes nothing; the part keeps that head (a size-1 axis, not dropped as a broadcast)."""
    nodes = [node("Split", ["x", "sizes"], [f"p{h}" for h in range(H)], axis=1)]
    nodes += [helper.make_node("LayerNormalization", [f"p{h}", "s"], [f"n{h}"], name=f"ln{h}", axis=-1)
              for h in range(H)]
    nodes += [node("Concat", [f"n{h}" for h in range(H)], ["y"], axis=1)]
    flow, t = make_flow(nodes, {"x": (2, H, 5, D)}, {"sizes": np.ones(H, np.int64), "s": np.ones(D, np.float32)})
    follow(flow, t, "y", HEADS, (1,), "up")
    assert owner_of(flow, "x") == ((1,), HEADS.tolist())
    assert [flow.units[u] for u in owner_of(flow, "p2")[1]] == [{2}]
    for check in flow.checks:
        check()
    # a norm over a merged [B, S, F] axis holding four heads stays refused (above), and one over a part of
    # two heads too
    half = np.array([[0, 0, 1, 1]])
    flow, t = make_flow([node("LayerNormalization", ["x", "s2"], ["y"], axis=-1)], {"x": (2, 1, 5, 4)},
                        {"s2": np.ones(4, np.float32)})
    with pytest.raises(FlowFail, match="normalises over the head axis"):
        follow(flow, t, "x", half, (1, 3), "down")


def test_the_opset_23_rms_normalization_over_the_head_size_passes():
    """No exporter here writes it (torch.onnx decomposes RMSNorm into ReduceMean), so it is built by hand."""
    rms = node("RMSNormalization", ["x", "s"], ["y"], axis=-1)
    flow, t = make_flow([rms], {"x": (2, 5, H, D)}, {"s": np.ones(D, np.float32)}, opset=23)
    follow(flow, t, "x", HEADS, (2,), "down")
    assert owner_of(flow, "y") == ((2,), HEADS.tolist())
    flow, t = make_flow([node("RMSNormalization", ["x", "s"], ["y"], axis=1)], {"x": (2, H, 5, D)},
                        {"s": np.ones((H, 5, D), np.float32)}, opset=23)
    with pytest.raises(FlowFail, match="normalises over the head axis"):
        follow(flow, t, "x", HEADS, (1,), "down")


def test_a_reduction_over_the_head_size_passes_and_over_heads_is_refused():
    """q/k RMSNorm (Qwen3, Gemma 3): ReduceMean over D keeps the heads; over H*D (OLMo-2) it mixes them."""
    red = node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)
    flow, t = make_flow([red], {"x": (2, 5, H, D)}, {"axes": np.array([-1], np.int64)})
    follow(flow, t, "y", HEADS, (2,), "up")
    assert owner_of(flow, "x") == ((2,), HEADS.tolist())
    flow, t = make_flow([node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)], {"x": (2, 5, H, D)},
                        {"axes": np.array([1], np.int64)})
    follow(flow, t, "x", HEADS, (2,), "down")
    assert owner_of(flow, "y") == ((1,), HEADS.tolist())           # keepdims 0: the axis moves down by one
    flow, t = make_flow([red], {"x": (2, 5, F)}, {"axes": np.array([-1], np.int64)})
    with pytest.raises(FlowFail, match="reduces over the head axis"):
        follow(flow, t, "x", MERGED, (2,), "down")


def test_transpose_moves_the_head_axis_both_ways():
    tr = node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])       # not its own inverse: [B,H,S,D] -> [B,S,D,H]
    flow, t = make_flow([tr], {"x": (2, H, 5, D)})
    follow(flow, t, "x", HEADS, (1,), "down")
    assert owner_of(flow, "y") == ((3,), HEADS.tolist())
    flow, t = make_flow([tr], {"x": (2, H, 5, D)})
    follow(flow, t, "y", HEADS, (3,), "up")
    assert owner_of(flow, "x") == ((1,), HEADS.tolist())


def test_reshape_splits_and_merges_the_head_axis_and_is_a_site():
    flow, t = make_flow([node("Reshape", ["x", "shape"], ["y"])], {"x": (2, 5, F)},
                        {"shape": np.array([2, 5, H, D], np.int64)})
    follow(flow, t, "x", MERGED, (2,), "down")
    assert owner_of(flow, "y") == ((2,), HEADS.tolist()) and site_kinds(flow) == ["reshape"]
    flow, t = make_flow([node("Reshape", ["x", "shape"], ["y"])], {"x": (2, 5, H, D)},
                        {"shape": np.array([2, 5, F], np.int64)})
    follow(flow, t, "y", MERGED, (2,), "up")
    assert owner_of(flow, "x") == ((2,), HEADS.tolist())


def test_reshape_refuses_axes_it_cannot_pair():
    flow, t = make_flow([node("Reshape", ["x", "shape"], ["y"])], {"x": (2, 5, F)},
                        {"shape": np.array([2, 5, H, D], np.int64)}, shapes={"y": (3, 7, 9)})
    with pytest.raises(FlowFail, match="cannot pair the axes"):
        follow(flow, t, "x", MERGED, (2,), "down")


def test_unsqueeze_and_squeeze_shift_the_head_axis():
    flow, t = make_flow([node("Unsqueeze", ["x", "axes"], ["y"])], {"x": (2, H, 5, D)},
                        {"axes": np.array([0], np.int64)})
    follow(flow, t, "x", HEADS, (1,), "down")
    assert owner_of(flow, "y") == ((2,), HEADS.tolist())
    flow, t = make_flow([node("Squeeze", ["x", "axes"], ["y"])], {"x": (2, 1, H, 5, D)},
                        {"axes": np.array([1], np.int64)})
    follow(flow, t, "x", HEADS, (2,), "down")
    assert owner_of(flow, "y") == ((1,), HEADS.tolist())


def test_unsqueeze_refuses_to_invent_the_head_axis():
    flow, t = make_flow([node("Unsqueeze", ["x", "axes"], ["y"])], {"x": (2, 5, D)},
                        {"axes": np.array([1], np.int64)}, shapes={"y": (2, H, 5, D)})
    with pytest.raises(FlowFail, match="Unsqueeze adds the head axis"):
        follow(flow, t, "y", HEADS, (1,), "up")


def test_expand_of_kv_heads_to_query_heads_makes_groups():
    """repeat_kv: [B, Hkv, 1, S, D] expanded to [B, Hkv, G, S, D]: the KV head serves its G query heads."""
    flow, t = make_flow([node("Expand", ["x", "shape"], ["y"])], {"x": (2, 2, 1, 5, D)},
                        {"shape": np.array([2, 2, 2, 5, D], np.int64)})
    group_owner = np.arange(H).reshape(2, 2)            # query head 2g + i sits at [g, i]
    follow(flow, t, "y", group_owner, (1, 2), "up", role="k")
    axes, owner = owner_of(flow, "x")
    assert axes == (1,) and [flow.units[u] for u in owner] == [{0, 1}, {2, 3}]
    assert flow.copy_axes["y"] == (2,) and site_kinds(flow) == ["expand"]


def test_split_of_a_packed_projection_and_its_refusal_downstream():
    sp = node("Split", ["x", "sizes"], ["q", "k", "v"], axis=2)
    sizes = {"sizes": np.array([F, F, F], np.int64)}
    flow, t = make_flow([sp], {"x": (2, 5, 3 * F)}, sizes)
    follow(flow, t, "q", MERGED, (2,), "up")
    axes, owner = owner_of(flow, "x")
    assert axes == (2,) and owner == MERGED.tolist() + [-1] * 2 * F and site_kinds(flow) == ["split"]
    flow, t = make_flow([sp], {"x": (2, 5, 3 * F)}, sizes)
    with pytest.raises(FlowFail, match="Split of a tensor that already carries the head axis"):
        follow(flow, t, "x", np.tile(MERGED, 3), (2,), "down")


def test_slice_picks_heads_upward_and_refuses_cutting_them_downward():
    args = {"st": np.array([0], np.int64), "en": np.array([F], np.int64), "ax": np.array([2], np.int64)}
    sl = node("Slice", ["x", "st", "en", "ax"], ["y"])
    flow, t = make_flow([sl], {"x": (2, 5, 2 * F)}, args)
    follow(flow, t, "y", MERGED, (2,), "up")
    assert owner_of(flow, "x") == ((2,), MERGED.tolist() + [-1] * F) and site_kinds(flow) == ["slice"]
    flow, t = make_flow([sl], {"x": (2, 5, 2 * F)}, args)
    with pytest.raises(FlowFail, match="Slice of a tensor along its head axis"):
        follow(flow, t, "x", np.tile(MERGED, 2), (2,), "down")


def _runtime_bound_slice(width_from: str):
    """w [2F, F] cut at rows [0, E), E read at run time from axis 2 of ``width_from``: ``p``, a [1, 1, F]
    constant tiled over the batch (fixed, though shape inference cannot tell), or ``x``, a graph input (whose sizes follow the caller's)."""
    nodes = [node("Shape", ["x"], ["sx"], start=0, end=1),
             helper.make_node("Concat", ["sx", "one", "one"], ["reps"], name="cat", axis=0),
             node("Tile", ["probe", "reps"], ["p"]),
             helper.make_node("Shape", [width_from], ["sp"], name="shape_p", start=2, end=3),
             node("Slice", ["w", "zero", "sp", "zero"], ["y"])]
    inits = {"probe": np.ones((1, 1, F), np.float32), "w": np.ones((2 * F, F), np.float32),
             "one": np.array([1], np.int64), "zero": np.array([0], np.int64)}
    flow, t = make_flow(nodes, {"x": (2, 5, F)}, inits, shapes={"p": (2, 1, F), "y": (F, F)})
    flow.values = {"sp": np.array([F]), "sx": np.array([2]), "reps": np.array([2, 1, 1])}
    return flow, t


def test_slice_bounds_read_from_a_fixed_width_count_as_constants():
    """TorchScript's nn.MultiheadAttention cuts its packed in_proj weight at Shape(q)[-1], the model width:
    fixed even when shape inference cannot say so (q is a probe tiled over the batch). A bound read from
    a size that follows the input is refused on the head axis."""
    flow, t = _runtime_bound_slice("p")
    follow(flow, t, "y", MERGED, (0,), "up")
    assert owner_of(flow, "w") == ((0,), MERGED.tolist() + [-1] * F)
    flow, t = _runtime_bound_slice("x")
    with pytest.raises(FlowFail, match="computed at run time"):
        follow(flow, t, "y", MERGED, (0,), "up")


def test_gather_of_one_section_upward_and_along_heads_refused():
    """A scalar Gather picks q out of a packed [B, S, 3, H, D]: upward it lands in section 0."""
    g = node("Gather", ["x", "i"], ["y"], axis=2)
    flow, t = make_flow([g], {"x": (2, 5, 3, H, D)}, {"i": np.array(0, np.int64)})
    follow(flow, t, "y", HEADS, (2,), "up")
    axes, owner = owner_of(flow, "x")
    assert axes == (2, 3) and owner == [HEADS.tolist(), [-1] * H, [-1] * H] and site_kinds(flow) == ["gather"]
    flow, t = make_flow([node("Gather", ["x", "i"], ["y"], axis=1)], {"x": (2, H, 5, D)},
                        {"i": np.array([0, 1], np.int64)})
    with pytest.raises(FlowFail, match="Gather along the head axis"):
        follow(flow, t, "x", HEADS, (1,), "down")


def test_concat_along_another_axis_and_along_heads_refused():
    flow, t = make_flow([node("Concat", ["past", "x"], ["y"], axis=2)], {"past": (2, H, 3, D), "x": (2, H, 5, D)})
    follow(flow, t, "x", HEADS, (1,), "down")
    assert owner_of(flow, "y") == ((1,), HEADS.tolist()) and owner_of(flow, "past") == ((1,), HEADS.tolist())
    flow, t = make_flow([node("Concat", ["a", "x"], ["y"], axis=1)], {"a": (2, H, 5, D), "x": (2, H, 5, D)})
    with pytest.raises(FlowFail, match="Concat along the head axis"):
        follow(flow, t, "x", HEADS, (1,), "down")


def test_matmul_scores_reach_q_and_k_and_the_output_projection_contracts():
    flow, t = make_flow([node("MatMul", ["q", "kt"], ["s"])], {"q": (2, H, 5, D), "kt": (2, H, D, 5)})
    follow(flow, t, "s", HEADS, (1,), "up", role="s")
    assert owner_of(flow, "q") == ((1,), HEADS.tolist()) and owner_of(flow, "kt") == ((1,), HEADS.tolist())
    assert flow.roles["q"] == {"q"} and flow.roles["kt"] == {"k"}
    w = np.zeros((F, 16), np.float32)
    flow, t = make_flow([node("MatMul", ["ctx", "w"], ["out"])], {"ctx": (2, 5, F)}, {"w": w})
    follow(flow, t, "ctx", MERGED, (2,), "down", role="o")
    assert owner_of(flow, "w") == ((0,), MERGED.tolist()) and flow.roles["w"] == {"o"}
    assert "out" not in flow.maps and [c[1] for c in flow.contractions] == ["w"]


def test_fused_matmul_scores_follow_its_transposed_b_and_refuse_other_transposes():
    """ONNX Runtime's FusedMatMul (MatMulScaleFusion): the scores q x k^T with k given as [B, H, S, D] and
    transB, and the scale in alpha; a transposed A or batch axis is refused."""
    fm = helper.make_node("FusedMatMul", ["q", "k"], ["s"], name="fm", domain="com.microsoft", alpha=0.5, transB=1)
    flow, t = make_flow([fm], {"q": (2, H, 5, D), "k": (2, H, 7, D)}, shapes={"s": (2, H, 5, 7)})
    follow(flow, t, "s", HEADS, (1,), "up", role="s")
    assert owner_of(flow, "q") == ((1,), HEADS.tolist()) and owner_of(flow, "k") == ((1,), HEADS.tolist())
    assert flow.roles["k"] == {"k"}
    w = np.zeros((16, F), np.float32)          # a weight given transposed: its columns hold the heads
    flow, t = make_flow([helper.make_node("FusedMatMul", ["ctx", "w"], ["out"], name="fm2", domain="com.microsoft",
                                          transB=1)], {"ctx": (2, 5, F)}, {"w": w}, shapes={"out": (2, 5, 16)})
    follow(flow, t, "ctx", MERGED, (2,), "down", role="o")
    assert owner_of(flow, "w") == ((1,), MERGED.tolist())
    fa = helper.make_node("FusedMatMul", ["q", "k"], ["s"], name="fm3", domain="com.microsoft", transA=1)
    flow, t = make_flow([fa], {"q": (2, H, D, 5), "k": (2, H, D, 7)}, shapes={"s": (2, H, 5, 7)})
    with pytest.raises(FlowFail, match="transposed A"):
        follow(flow, t, "s", HEADS, (1,), "up", role="s")


def test_matmul_refuses_heads_on_its_right_operand_downstream():
    flow, t = make_flow([node("MatMul", ["a", "b"], ["y"])], {"a": (2, 5, F), "b": (2, F, 16)})
    with pytest.raises(FlowFail, match="right operand carries the head axis"):
        follow(flow, t, "b", MERGED, (1,), "down")


def test_gemm_weight_rows_follow_transB():
    w = np.zeros((16, F), np.float32)
    flow, t = make_flow([node("Gemm", ["ctx", "w"], ["out"], transB=1)], {"ctx": (10, F)}, {"w": w})
    follow(flow, t, "ctx", MERGED, (1,), "down")
    assert owner_of(flow, "w") == ((1,), MERGED.tolist())
    flow, t = make_flow([node("Gemm", ["ctx", "w"], ["out"], transB=1)], {"ctx": (F, 10)},
                        {"w": np.zeros((16, 10), np.float32)})
    with pytest.raises(FlowFail, match="on its rows"):
        follow(flow, t, "ctx", MERGED, (0,), "down")


def test_rotary_embedding_passes_heads_and_needs_num_heads_in_3d():
    def rope(**attrs):
        return helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], name="rope", **attrs)
    shapes = {"y": (2, 5, F), "cos": (5, D // 2), "sin": (5, D // 2)}
    flow, t = make_flow([rope(num_heads=H)], {"x": (2, 5, F), "cos": (5, D // 2), "sin": (5, D // 2)},
                        shapes=shapes, opset=23)
    follow(flow, t, "x", MERGED, (2,), "down")
    assert owner_of(flow, "y") == ((2,), MERGED.tolist()) and site_kinds(flow) == ["attr"]
    assert rules.head_attrs(flow.graph.nodes[0], None, (0, 1), (F, F // 2)) == {"num_heads": 2}
    flow, t = make_flow([rope()], {"x": (2, 5, F), "cos": (5, D // 2), "sin": (5, D // 2)}, shapes=shapes,
                        opset=23)
    with pytest.raises(FlowFail, match="3-D RotaryEmbedding without num_heads"):
        follow(flow, t, "x", MERGED, (2,), "down")


def test_resize_over_other_axes_passes_heads_and_is_a_site():
    """BEiT resizes its [1, H, a, b] bias table over a and b: the heads pass, and the sizes are a site."""
    rs = node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear")
    flow, t = make_flow([rs], {"x": (1, H, 3, 3)}, {"sizes": np.array([1, H, 5, 5], np.int64)})
    follow(flow, t, "x", HEADS, (1,), "down")
    assert owner_of(flow, "y") == ((1,), HEADS.tolist()) and site_kinds(flow) == ["resize"]
    flow, t = make_flow([rs], {"x": (1, H, 3, 3)}, {"sizes": np.array([1, 2 * H, 5, 5], np.int64)})
    with pytest.raises(FlowFail, match="Resize scales the head axis"):
        follow(flow, t, "x", HEADS, (1,), "down")


def test_gather_elements_along_keys_passes_heads_to_data_and_indices():
    """DeBERTa-v2's c2p scores [B*H, S, 2k] gathered along the key axis with indices [B*H, S, S]."""
    ge = node("GatherElements", ["x", "idx"], ["y"], axis=-1)
    bh = np.tile(HEADS, 2)                                 # B*H, batch-major: [0, 1, 2, 3, 0, 1, 2, 3]
    flow, t = make_flow([ge], {"x": (2 * H, 5, 6)}, shapes={"idx": (2 * H, 5, 5), "y": (2 * H, 5, 5)})
    follow(flow, t, "y", bh, (0,), "up")
    assert owner_of(flow, "x") == ((0,), bh.tolist()) and owner_of(flow, "idx") == ((0,), bh.tolist())
    flow, t = make_flow([node("GatherElements", ["x", "idx"], ["y"], axis=0)], {"x": (2 * H, 5, 6)},
                        shapes={"idx": (2 * H, 5, 6), "y": (2 * H, 5, 6)})
    with pytest.raises(FlowFail, match="GatherElements along the head axis"):
        follow(flow, t, "x", bh, (0,), "down")


def test_tile_of_heads_over_the_batch_and_of_mixed_copies_refused():
    """DeBERTa-v2 tiles its position keys [H, 2k, D] over the batch to [B*H, 2k, D]: the repeats are a site
    (they may be computed as (B*H)/H); a tiled tensor whose copies hold different heads is refused."""
    tl = node("Tile", ["x", "reps"], ["y"])
    flow, t = make_flow([tl], {"x": (H, 6, D)}, {"reps": np.array([2, 1, 1], np.int64)})
    follow(flow, t, "y", np.tile(HEADS, 2), (0,), "up")
    assert owner_of(flow, "x") == ((0,), HEADS.tolist()) and site_kinds(flow) == ["tile"]
    flow, t = make_flow([tl], {"x": (H, 6, D)}, {"reps": np.array([2, 1, 1], np.int64)})
    follow(flow, t, "x", HEADS, (0,), "down")
    assert owner_of(flow, "y") == ((0,), np.tile(HEADS, 2).tolist())
    flow, t = make_flow([tl], {"x": (H, 6, D)}, {"reps": np.array([2, 1, 1], np.int64)})
    with pytest.raises(FlowFail, match="different heads in its copies"):
        follow(flow, t, "y", np.repeat(HEADS, 2), (0,), "up")


def test_constant_of_shape_ends_the_heads_and_its_shape_vector_is_a_site():
    """T5's cross-attention position bias is zeros of [1, H, S, T] made by ConstantOfShape: reached from the
    scores, nothing above it carries heads, and its shape vector (which holds H) is a site; reached from its
    shape input, it is refused."""
    cs = node("ConstantOfShape", ["shape"], ["y"])
    flow, t = make_flow([cs], {}, {"shape": np.array([1, H, 5, 5], np.int64)}, shapes={"y": (1, H, 5, 5)})
    follow(flow, t, "y", HEADS, (1,), "up")
    assert site_kinds(flow) == ["constant_of_shape"] and "shape" not in flow.maps
    flow, t = make_flow([cs], {}, {"shape": np.array([1, H, 5, 5], np.int64)}, shapes={"y": (1, H, 5, 5)})
    with pytest.raises(FlowFail, match="ConstantOfShape's shape input"):
        follow(flow, t, "shape", HEADS, (0,), "down")


def test_a_second_attention_op_in_one_block_is_refused():
    att = node("Attention", ["x", "x", "x"], ["y"])
    flow, t = make_flow([att], {"x": (2, H, 5, D)}, shapes={"y": (2, H, 5, D)}, opset=23)
    with pytest.raises(FlowFail, match="a second Attention op"):
        follow(flow, t, "x", HEADS, (1,), "down")


# ------------------------------------------------------------------ shape expressions
def _shape_graph():
    """A Reshape target as exporters build it: Concat(Unsqueeze(Gather(Shape(x), 0)), [-1], Mul(B, H))."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["b"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"], name="unsq"),
             helper.make_node("Mul", ["b", "heads"], ["bh"], name="mul"),
             helper.make_node("Unsqueeze", ["bh", "ax0"], ["bh1"], name="unsq2"),
             helper.make_node("Concat", ["b1", "minus1", "heads1", "bh1"], ["vec"], name="concat", axis=0)]
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "heads": np.array(H, np.int64),
             "minus1": np.array([-1], np.int64), "heads1": np.array([H], np.int64)}
    flow, t = make_flow(nodes, {"x": (2, 5, F)}, inits)
    return flow, t


def test_shape_expressions_locate_each_element():
    flow, t = _shape_graph()
    vec = t["vec"]
    assert shape_expr.locate(vec, 0, flow.shapes) == shape_expr.Dim("x", 0)
    assert shape_expr.locate(vec, 1, flow.shapes) == shape_expr.Const(-1)
    assert shape_expr.locate(vec, 2, flow.shapes) == shape_expr.Const(H)
    bh = shape_expr.locate(vec, 3, flow.shapes)
    assert bh == shape_expr.Arith("Mul", H, shape_expr.Dim("x", 0))
    assert shape_expr.leaf(bh) == (shape_expr.Dim("x", 0), ["Mul"]) and shape_expr.evaluate(bh, 2) == 2 * H
    assert "Mul by 4" in shape_expr.describe(bh)
    ones = helper.make_node("ConstantOfShape", ["s"], ["ones"], name="cos",
                            value=numpy_helper.from_array(np.array([1], np.int64)))
    flow2, t2 = make_flow([helper.make_node("Shape", ["x"], ["s"], name="shape"), ones], {"x": (2, 5, F)})
    assert shape_expr.locate(t2["ones"], 2, flow2.shapes) == shape_expr.Const(1)   # Expand's no-op shape
    runtime = shape_expr.locate(t["x"], 0, flow.shapes)
    assert isinstance(runtime, shape_expr.Unknown) and "graph input" in runtime.why


def test_a_split_of_a_shape_vector_locates_each_part():
    """ONNX Runtime's optimizer turns Gathers of a shape vector into one Split: each part is its slice."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Split", ["s", "sizes"], ["p0", "p1"], name="split", axis=0)]
    flow, t = make_flow(nodes, {"x": (2, 5, F)}, {"sizes": np.array([1, 2], np.int64)},
                        shapes={"p0": (1,), "p1": (2,)})
    assert shape_expr.locate(t["p0"], 0, flow.shapes) == shape_expr.Dim("x", 0)
    assert shape_expr.locate(t["p1"], 1, flow.shapes) == shape_expr.Dim("x", 2)


def test_shape_expressions_rebuild_without_touching_shared_tensors():
    flow, t = _shape_graph()
    graph = flow.graph
    before = {n.name for n in graph.nodes}
    new = shape_expr.rebuild(graph, t["vec"], {2: 2, 3: 2 * 2}, flow.shapes, {"bh": np.array(2 * H)})
    assert new is not t["vec"] and {n.name for n in graph.nodes} > before        # copies, not edits
    assert shape_expr.const_value(t["heads1"]).tolist() == [H]                  # the shared constant kept
    concat = new.inputs[0]
    assert shape_expr.const_value(concat.inputs[2]).tolist() == [2]             # H -> 2
    mul = concat.inputs[3].inputs[0].inputs[0].inputs[0]
    assert mul.op == "Mul" and int(shape_expr.const_value(mul.inputs[1])) == 2   # B*H -> B*2
    with pytest.raises(ValueError, match="cannot write 7"):
        shape_expr.rebuild(graph, t["bh"], {None: 7}, flow.shapes, {"bh": np.array(2 * H)})
